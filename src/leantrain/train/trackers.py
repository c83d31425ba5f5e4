"""Experiment trackers: the run's metrics lines, resolved config and report, also handed to TensorBoard, MLflow,
W&B (offline) or trackio (local), as HF Trainer and Lightning do.

Each is optional: its library is imported only when `[log] trackers` names it, so a missing one is a one-line
error before the run directory exists, and a run without trackers never pays for the imports. `Trackers` is one
observer of the trainer (rank 0 only, like every observer) that fans out to the chosen ones. The values are the
very dict written to metrics.jsonl, never recomputed. A tracker that raises is dropped with one warning and
training goes on: metrics.jsonl stays the complete record. Where each one writes: docs/tracking.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from leantrain.config import Config, to_toml
from leantrain.errors import ConfigError, LeantrainError
from leantrain.train.rundir import write_run_file

STATE_FILE = "trackers.json"  # each tracker's run id, so a resumed run continues the same tracker run
PROJECT = "leantrain"  # MLflow experiment, W&B project and trackio project, unless the user's env names another
EXTRA = "pip install 'leantrain[track]'"


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as {"section.key": value}: the hyperparameters every tracker shows."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, tuple | list):
            out[prefix] = ",".join(map(str, value))
        else:
            out[prefix] = value

    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            walk(f"{section}.{key}", value)
    return out


def flat_metrics(record: dict[str, Any]) -> dict[str, int | float]:
    """The numbers of one metrics.jsonl line, per-block dicts as "grad_norms/layers.0"; `step` is the x axis."""
    out: dict[str, int | float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if _number(v)})
        elif _number(value):
            out[key] = value
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# ---- the trackers ------------------------------------------------------------------------
# Each: __init__ imports its library (ImportError: not installed); start() opens its run and returns the
# state to keep for a resume; log() takes one metrics line; finish() adds the artifacts and closes.


class TensorBoard:
    """Event files under RUN_DIR/tensorboard (torch.utils.tensorboard's SummaryWriter); hyperparameters in the
    HParams tab; no artifact store, so the report and checkpoint paths are a text entry."""

    name = "tensorboard"

    def __init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_cls = SummaryWriter
        self.writer: Any = None

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], config_toml: str, state: dict[str, Any],
              first_step: int) -> dict[str, Any]:
        from torch.utils.tensorboard.summary import hparams

        # a resumed run hides what the lost steps after its checkpoint had logged, as metrics.jsonl does
        self.writer = self._writer_cls(log_dir=str(run_dir / "tensorboard"), purge_step=first_step or None)
        self.writer.add_text("config", "    " + config_toml.replace("\n", "\n    "), first_step)
        hp = {k: v for k, v in params.items() if isinstance(v, int | float | str | bool)}
        for summary in hparams(hp, {"loss": 0.0, "val_loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()
        return {}

    def log(self, step: int, metrics: dict[str, int | float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged, and a failing disk shows up here

    def finish(self, status: str, summary: dict[str, Any], report: Path | None, checkpoint: Path | None) -> None:
        step = int(summary.get("step") or 0)
        lines = [f"status: {status}", f"report: {report or 'not written'}",
                 f"final checkpoint: {checkpoint or 'none'}"]
        self.writer.add_text("run", "\n\n".join(lines), step)
        self.writer.add_text("summary", "    " + json.dumps(summary, indent=1).replace("\n", "\n    "), step)
        self.writer.close()


class MLflow:
    """MLflow's client: the server or store at MLFLOW_TRACKING_URI when set, else a SQLite store with its
    artifacts inside RUN_DIR/mlflow (never the current folder). Experiment MLFLOW_EXPERIMENT_NAME or leantrain."""

    name = "mlflow"

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client_cls = MlflowClient
        self.client: Any = None
        self.run_id = ""

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], config_toml: str, state: dict[str, Any],
              first_step: int) -> dict[str, Any]:
        import logging

        from mlflow.entities import Param

        # a stopped server fails a call after a few seconds, not after MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        store = run_dir.resolve() / "mlflow"
        if not uri:
            store.mkdir(exist_ok=True)
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
        self.client = self._client_cls(tracking_uri=uri or f"sqlite:///{store / 'mlflow.db'}")
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self.client.create_experiment(
                name, artifact_location=None if uri else (store / "artifacts").as_uri())
        where = uri or "run_dir"  # the run directory's own store follows the folder if it moves
        logged: dict[str, str] = {}
        if state.get("tracking_uri") == where and state.get("run_id"):  # resumed: the same MLflow run goes on
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags={
                "leantrain.run_dir": str(run_dir.resolve())}).info.run_id
        # MLflow keeps a parameter's first value: a resumed run with a changed config logs only new keys
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(fresh), 100):  # the API's batch limit
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])
        self.client.log_text(self.run_id, config_toml, "config.toml")
        return {"tracking_uri": where, "run_id": self.run_id}

    def log(self, step: int, metrics: dict[str, int | float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def finish(self, status: str, summary: dict[str, Any], report: Path | None, checkpoint: Path | None) -> None:
        self.client.log_dict(self.run_id, {**summary, "checkpoint": str(checkpoint) if checkpoint else None},
                             "summary.json")
        if report is not None:
            self.client.log_artifact(self.run_id, str(report))
        if checkpoint is not None:
            self.client.set_tag(self.run_id, "leantrain.checkpoint", str(checkpoint))
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints "View run at" links; the CLI owns the terminal
            self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))


class WandB:
    """W&B in offline mode, always (no network, whatever WANDB_MODE says): RUN_DIR/wandb/offline-run-*/, which
    `wandb sync` uploads later. The report is a file artifact, the checkpoint a reference artifact (its path)."""

    name = "wandb"

    def __init__(self) -> None:
        import wandb

        self._wandb = wandb
        self.run: Any = None

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], config_toml: str, state: dict[str, Any],
              first_step: int) -> dict[str, Any]:
        wandb = self._wandb
        run_id = state.get("id") or uuid.uuid4().hex[:8]  # W&B's run id form: 8 lowercase letters and digits
        settings = wandb.Settings(mode="offline", console="off", silent=True, x_disable_stats=True,
                                  x_disable_machine_info=True, disable_git=True, save_code=False)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, id=run_id,
                              resume="allow", dir=str(run_dir), config=params, settings=settings,
                              reinit="create_new")
        return {"id": run_id}

    def log(self, step: int, metrics: dict[str, int | float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, status: str, summary: dict[str, Any], report: Path | None, checkpoint: Path | None) -> None:
        wandb = self._wandb
        self.run.summary.update({k: v for k, v in summary.items() if _number(v)})
        if report is not None:
            artifact = wandb.Artifact(f"{self.run.id}-report", type="report")
            artifact.add_file(str(report))
            self.run.log_artifact(artifact)
        if checkpoint is not None:
            artifact = wandb.Artifact(f"{self.run.id}-checkpoint", type="model",
                                      metadata={"path": str(checkpoint), "step": summary.get("step")})
            artifact.add_reference(checkpoint.resolve().as_uri(), name=checkpoint.name, checksum=False)
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status != "failed" else 1)


class Trackio:
    """trackio's local store: the folder TRACKIO_DIR names, else trackio's default (~/.cache/huggingface/trackio),
    project leantrain, one run per run directory, named after it. Never a Space or a server."""

    name = "trackio"

    def __init__(self) -> None:
        for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
            if os.environ.get(var):
                raise ConfigError(f"log.trackers: trackio logs locally only, but {var} is set (that would send the "
                                  f"metrics over the network); unset {var}, and push the local project later with "
                                  "`trackio sync`")
        import trackio

        self._trackio = trackio
        self.run: Any = None

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], config_toml: str, state: dict[str, Any],
              first_step: int) -> dict[str, Any]:
        # a new run directory is a new trackio run even if another folder had the same name; a resumed one goes on
        # with the newest trackio run of its name (trackio resumes by name)
        resume = "allow" if state.get("id") else "never"
        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints its own banner; the CLI owns the terminal
            self.run = self._trackio.init(project=PROJECT, name=run_name, config=params, resume=resume, embed=False,
                                          auto_log_gpu=False, auto_log_cpu=False)
        return {"project": PROJECT, "name": run_name, "id": self.run.id}

    def log(self, step: int, metrics: dict[str, int | float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, status: str, summary: dict[str, Any], report: Path | None, checkpoint: Path | None) -> None:
        trackio = self._trackio
        with contextlib.redirect_stdout(io.StringIO()):
            if report is not None:
                artifact = trackio.Artifact(f"{self.run.name}-report", type="report",
                                            metadata={"status": status, **summary})
                artifact.add_file(report)
                self.run.log_artifact(artifact)
            if checkpoint is not None:  # a reference: the path (and size), never a copy of the weights
                artifact = trackio.Artifact(f"{self.run.name}-checkpoint", type="model",
                                            metadata={"path": str(checkpoint), "step": summary.get("step")})
                artifact.add_reference(checkpoint.as_uri(), name=checkpoint.name, checksum=False)
                self.run.log_artifact(artifact)
            if trackio.context_vars.current_run.get() is self.run:  # trackio.finish also clears it, so that
                trackio.finish()  # trackio's exit hook does not finish (and announce) the run a second time
            else:
                self.run.finish()


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}
_PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


# ---- the observer ------------------------------------------------------------------------


class Trackers:
    """One trainer observer for all the chosen trackers. Made before the Trainer (the imports happen here),
    opened on the run's `start` event (only rank 0 gets events), closed by `close()` once report.html is written.

    `tell` names the observers that hear a mid-run failure as a `tracker_failed` event (the run log, the
    terminal); a failure after the run's end (while closing) is returned by `close()` instead.
    """

    def __init__(self, names: tuple[str, ...] | list[str], cfg: Config, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.pending = [_load(name) for name in names]
        self.active: list[Any] = []
        self.listeners: list[Any] = []
        self.summary: dict[str, Any] | None = None
        self.step = 0
        self.late_warnings: list[str] = []

    def tell(self, observers: list[Any]) -> None:
        self.listeners = [o for o in observers if o is not self]

    # -- observer protocol --
    def on_event(self, event: dict[str, Any]) -> None:
        self.step = event.get("step", self.step)
        if event["event"] == "start" and self.pending:
            self._start(int(event.get("step", 0)))

    def on_step(self, record: dict[str, Any]) -> None:
        self.step = record["step"]
        metrics = flat_metrics(record)
        for tracker in list(self.active):
            self._call(tracker, "log", record["step"], metrics)

    def on_end(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    # -- lifecycle --
    def _start(self, step: int) -> None:
        state_path = self.run_dir / STATE_FILE
        try:
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        except (OSError, ValueError):
            state = {}
        params, config_toml = flat_config(self.cfg), to_toml(self.cfg)
        run_name = self.run_dir.resolve().name
        first_step = step + 1 if step else 0
        for tracker in self.pending:
            self.active.append(tracker)
            ok, kept = self._call(tracker, "start", self.run_dir, run_name, params, config_toml,
                                  state.get(tracker.name, {}), first_step)
            if ok:
                state[tracker.name] = kept
        self.pending = []
        with contextlib.suppress(LeantrainError):  # without it a resume opens new tracker runs; nothing worse
            write_run_file(self.run_dir, STATE_FILE, json.dumps(state, indent=1) + "\n")

    def close(self, report: str | Path | None = None) -> list[str]:
        """Add the report and the final checkpoint's path as artifacts and end every tracker's run (finished,
        stopped by a signal, or failed when the run never reached its end). Returns the warnings of trackers
        that failed while closing. Safe to call again."""
        s = self.summary
        status = "failed" if s is None else "stopped" if s.get("stopped") else "finished"
        report = Path(report) if report is not None and Path(report).is_file() else None
        summary = {k: v for k, v in (s or {"step": self.step}).items() if k != "sample"}
        checkpoint = _latest_checkpoint(self.run_dir)
        for tracker in list(self.active):
            self._call(tracker, "finish", status, summary, report, checkpoint)
        self.active, self.pending = [], []
        late, self.late_warnings = self.late_warnings, []
        return late

    def _call(self, tracker: Any, method: str, *args: Any) -> tuple[bool, Any]:
        """Call one tracker; if it raises, drop it with one warning (the training goes on)."""
        try:
            return True, getattr(tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 - any library's failure: the run must not stop for a tracker
            if tracker in self.active:
                self.active.remove(tracker)
            message = (f"{tracker.name} tracker failed ({_one_line(e)}); it is dropped for the rest of this run "
                       "and training goes on (metrics.jsonl has every line)")
            self._warn(tracker.name, message)
            return False, None

    def _warn(self, name: str, message: str) -> None:
        if self.summary is not None or not self.listeners:  # the run log is closed: the caller reports it
            self.late_warnings.append(message)
            return
        for o in self.listeners:
            o.on_event({"event": "tracker_failed", "step": self.step, "tracker": name, "message": message})


def _load(name: str) -> Any:
    """The tracker `name`, its library imported now; not installed is a one-line error naming the extra."""
    try:
        return KINDS[name]()
    except ImportError as e:
        missing = getattr(e, "name", None) or _PACKAGE[name]
        raise ConfigError(f"log.trackers includes {name!r} but {missing} cannot be imported ({_one_line(e)}); "
                          f"install it with: {EXTRA}, or drop {name} from log.trackers") from None


def _latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint (the `latest` pointer the checkpointer writes last), as an absolute path."""
    try:
        name = (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    path = (run_dir / "checkpoints" / name).resolve()
    return path if name and path.is_dir() else None


def open_trackers(cfg: Config, run_dir: str | Path) -> Trackers | None:
    """The trackers `cfg.log.trackers` asks for (None when it asks for none). Call it before the Trainer: a
    tracker library that is missing stops the run here, before its run directory is made."""
    return Trackers(cfg.log.trackers, cfg, run_dir) if cfg.log.trackers else None

