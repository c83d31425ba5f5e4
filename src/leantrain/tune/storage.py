"""Where a study lives: its folder (trials, config, marker, lock) and its Optuna storage.

The folder STUDY_DIR holds `.leantrain-study` (the marker: study name and storage), `config.toml` (the
base config with its `[tune]` section), `study.db` (SQLite, the default storage), `trials/NNNN/` (one run
directory per trial), `best.toml` and `report.html`. Every worker process holds a shared flock on
`STUDY_DIR/.lock`; a resume that can take it exclusively knows no worker of this folder is alive, so the
trials still marked running were killed and can be failed and retried at once (otherwise Optuna's
heartbeat does it after a grace period, which also covers workers on other machines).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError, LeantrainError
from leantrain.files import write_durable

MARKER = ".leantrain-study"
LOCK = ".lock"
OWN = {MARKER, LOCK, "config.toml", "study.db", "trials", "best.toml", "report.html", "workers"}


def quiet_optuna() -> Any:
    """Import optuna with its logging and experimental-feature warnings off: the CLI prints its own line per trial,
    and a failed trial's reason is in its user attributes (Optuna would log each with a traceback)."""
    try:
        import optuna
    except ImportError:
        raise LeantrainError("leantrain tune needs Optuna: pip install 'leantrain[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def masked(url: str) -> str:
    """A storage URL fit to print or keep: the password replaced by ***."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def storage_url(arg: str | None, study_dir: Path) -> str:
    """The SQLAlchemy URL of the study's storage: STUDY_DIR/study.db by default; postgresql:// goes through
    psycopg 3 (SQLAlchemy's default PostgreSQL driver is psycopg2)."""
    if not arg:
        return f"sqlite:///{(study_dir / 'study.db').resolve()}"
    scheme, sep, rest = arg.partition("://")
    if not sep:
        raise ConfigError(f"--storage {masked(arg)} is not a database URL; use postgresql://USER@HOST:PORT/DB or "
                          "sqlite:///PATH")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if scheme.split("+")[0] in ("postgresql", "sqlite", "mysql"):
        return arg
    raise ConfigError(f"--storage {masked(arg)}: scheme {scheme}:// is not supported; use postgresql://USER@HOST:"
                      "PORT/DB (or sqlite:///PATH, mysql://...)")


def open_storage(url: str, heartbeat_s: int, max_retries: int) -> Any:
    """Optuna's RDB storage with heartbeats: a trial whose worker died is failed after 2 x heartbeat_s and
    retried (up to max_retries). An unreachable server is one line, in seconds, not a hang."""
    optuna = quiet_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite"):
        connect = {"timeout": 60}  # workers of one folder take turns on the file lock
    elif url.startswith("postgresql"):
        connect = {"connect_timeout": 10}
    else:
        connect = {}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(url, engine_kwargs={"connect_args": connect} if connect else None,
                                  heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                      max_retry=max_retries))
            except Exception as e:  # noqa: BLE001 - sorted out below
                # workers started together on a fresh database race to create Optuna's tables (PostgreSQL:
                # "duplicate key value violates unique constraint"); the loser finds them made on a retry
                if attempt == 4 or "duplicate key" not in str(getattr(e, "orig", None) or e.__cause__ or e):
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")
    except ImportError as e:
        raise LeantrainError(f"storage {masked(url)} needs a database driver that is missing ({e}); for PostgreSQL: "
                             "pip install 'psycopg[binary]'") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's connection and URL errors: one line, not a traceback
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ is not None:
            why = str(getattr(e.__cause__, "orig", None) or e.__cause__).strip().splitlines()[0]
        raise LeantrainError(f"cannot reach the study storage {masked(url)} ({why}); check that the database server "
                             "runs and the URL's user, host, port and database are right") from None


def read_marker(study_dir: Path) -> dict[str, Any]:
    """The marker of a study folder; a folder without one is not a study leantrain made."""
    p = study_dir / MARKER
    if not study_dir.is_dir():
        raise LeantrainError(f"{study_dir} does not exist; pass the folder `leantrain tune` wrote (--out)")
    if not p.is_file():
        raise LeantrainError(f"{study_dir} is not a study folder (no {MARKER}); pass the folder `leantrain tune` "
                             "wrote (--out)")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LeantrainError(f"{p} cannot be read ({e}); the study folder is damaged") from None


def check_new_study_dir(study_dir: Path) -> None:
    """A new study goes into a new or empty folder; one that holds a study says how to continue it."""
    if study_dir.exists() and not study_dir.is_dir():
        raise LeantrainError(f"--out {study_dir} is a file; pass a folder for the study")
    if not study_dir.is_dir():
        return
    entries = sorted(p.name for p in study_dir.iterdir())
    if (study_dir / MARKER).is_file():
        raise LeantrainError(f"{study_dir} holds a study already; continue it with `leantrain tune --resume "
                             f"{study_dir}` or pass a new --out")
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise LeantrainError(f"--out {study_dir} holds files leantrain did not write ({shown}); pass a new or "
                             "empty folder so nothing of yours is overwritten")


def write_marker(study_dir: Path, study_name: str, storage: str | None) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    info = {"leantrain_study": 1, "study_name": study_name, "storage": masked(storage) if storage else None,
            "created": round(time.time(), 3)}
    write_durable(study_dir / MARKER, json.dumps(info) + "\n")


class StudyLock:
    """A shared flock on STUDY_DIR/.lock for as long as this worker process runs trials of the folder."""

    def __init__(self, study_dir: Path):
        self.fd = os.open(study_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)

    def sole(self) -> bool:
        """Take the lock exclusively if no other worker holds it; True when this process is alone. Either way the
        lock is left shared."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        return alone

    def hold(self) -> StudyLock:
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.release()
