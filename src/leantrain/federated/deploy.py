"""The Flower app folder `flwr run` submits to a SuperLink (deployment engine): a pyproject.toml whose
components are leantrain's ServerApp and ClientApp (installed with leantrain, so the folder holds no code)."""

from __future__ import annotations

import json
from pathlib import Path

from leantrain.files import write_durable

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "leantrain-federation"
version = "1.0.0"
description = "leantrain federated training (written by leantrain.federated.deploy)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "leantrain"

[tool.flwr.app.components]
serverapp = "leantrain.federated.app:server_app"
clientapp = "leantrain.federated.app:client_app"

[tool.flwr.app.config]
config = {config}
run-dir = {run_dir}
overrides = {overrides}
"""


def write_app(folder: str | Path, config: str | Path | None, run_dir: str | Path, overrides: str = "") -> Path:
    """Write the app folder for `flwr run FOLDER CONNECTION`; returns its pyproject.toml. `config` is the
    leantrain TOML (None: defaults and overrides only), `overrides` space separated section.field=value."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    text = PYPROJECT.format(config=json.dumps(str(Path(config).resolve()) if config else ""),
                            run_dir=json.dumps(str(Path(run_dir).resolve())), overrides=json.dumps(overrides))
    write_durable(out / "pyproject.toml", text)
    return out / "pyproject.toml"
