"""`pip install .` gives a wheel that works outside the repository: built from a copy of the sources,
installed into a fresh virtual environment, and run from a folder far from the checkout.

The fresh environment gets its dependencies (torch and the rest) through a .pth line naming this
environment's site-packages instead of installing them again: a full install of the wheel with its
dependencies took 39 s here from the local package mirror, and on a machine that only sees PyPI it
would download torch. Site only reads .pth files in a site directory, not in directories a .pth adds,
so this environment's editable leantrain (a .pth naming the checkout's src/) stays out of the fresh
one: the wheel's own copy is what runs, which the test checks.
"""

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "leantrain"


def _sh(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel .` builds, from a copy of the checkout (the build writes into its source)."""
    src = tmp_path_factory.mktemp("pkgsrc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    # offline with the setuptools installed here; where there is none (a Python 3.12+ venv), pip fetches it
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline, src, "-w", dist)
    (whl,) = dist.glob("leantrain-*.whl")
    return whl


def test_wheel_carries_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = [p.relative_to(PACKAGE).as_posix() for p in files]
    missing = [m for m in missing if f"leantrain/{m}" not in names]
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"
    assert {"leantrain/hardware.toml", "leantrain/recipes/tiny.toml", "leantrain/plan/calibration.json"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "leantrain = leantrain.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_into_a_fresh_venv_and_trains_outside_the_repo(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py, bindir = env_dir / "bin" / "python", env_dir / "bin"
    _sh(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = Path(_sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (purelib / "leantrain-test-deps.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    _sh(sys.executable, "-m", "pip", "--python", py, "check")  # the wheel's requirements are all met

    work = tmp_path / "elsewhere"  # a folder outside the checkout, as a user's would be
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{bindir}:{env['PATH']}"

    def leantrain(*args):
        return _sh(bindir / "leantrain", *args, cwd=work, env=env)

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert leantrain("--version").strip() == f"leantrain {version}"
    where = _sh(py, "-c", "import leantrain; print(leantrain.__file__)", cwd=work, env=env).strip()
    assert Path(where).is_relative_to(env_dir), f"leantrain imported from {where}, not from the fresh venv"

    corpus = work / "corpus"  # a few real documents: standard-library sources
    corpus.mkdir()
    for module in sorted(Path(json.__file__).parent.glob("*.py")) + [Path(shutil.__file__), Path(venv.__file__)]:
        shutil.copy(module, corpus / module.name)
    leantrain("data", "prepare", "corpus", "--out", "data", "--vocab-size", "512", "--workers", "1")
    leantrain("train", "--run-dir", "run", "--data.path=data", "--model.n_layers=1", "--model.dim=32",
              "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32", "--model.vocab_size=512",
              "--train.steps=5", "--train.micro_batch_size=2", "--train.eval_every=5", "--train.eval_steps=1",
              "--train.sample_tokens=0", "--precision.dtype=fp32", "--checkpoint.every=5", "--log.every=1",
              "--log.progress=none")
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s][-1] == 5
    assert (work / "run" / "checkpoints" / "latest").exists()
    assert leantrain("generate", "run", "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0")
