"""The Flower app for the deployment engine: `flwr run` starts `server_app` in the SuperLink's ServerApp
process and `client_app` in each SuperNode's ClientApp process.

The run config (`[tool.flwr.app.config]` of the app's pyproject.toml, written by `deploy.write_app`, or
`flwr run --run-config`) names the leantrain config file (`config`), the run directory (`run-dir`) and
optional dotted overrides (`overrides`, space separated `section.field=value`). Each SuperNode gives its
client's `partition-id` in `--node-config`, and, where the data lives on that machine only, `data-path`
(its partition as a token dataset) and `work-dir`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from leantrain.federated.client import client_app

server_app = ServerApp()

__all__ = ["client_app", "server_app"]


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """One federation on the Grid the SuperLink gives us; what it did is in the run directory."""
    from leantrain.api import load_config
    from leantrain.federated.run import PARTITIONS, finish, prepare_run
    from leantrain.federated.server import FederatedServer

    rc = context.run_config
    overrides = shlex.split(str(rc.get("overrides", "")))
    cfg = load_config(str(rc["config"]) or None, overrides=overrides)
    run_dir = str(rc["run-dir"])
    lock, partitions = prepare_run(cfg, run_dir)
    try:
        summary = FederatedServer(cfg, run_dir, f"{run_dir}/{PARTITIONS}").run(grid)
    finally:
        lock.release()
    finish(Path(run_dir), summary, partitions)
