"""Experiment trackers: one tiny `leantrain train` writing to all four at once, each read back with that library's
own reader (TensorBoard's EventAccumulator, the MLflow client against a live `mlflow server` on 127.0.0.1, the
records of W&B's offline .wandb file decoded with W&B's protobuf schema, trackio's local store), each holding
the very loss values of metrics.jsonl, the config as hyperparameters and the report as an artifact. Then a
real failure: the MLflow server is stopped mid-run, and the run logs one warning and trains to its end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import tiny_config
from leantrain import api
from leantrain.train.telemetry import read_jsonl

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("trackio")
pytest.importorskip("tensorboard")

STEPS = 6
TINY = ["--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=2", "--model.seq_len=32",
        "--model.vocab_size=512", f"--train.steps={STEPS}", "--train.micro_batch_size=2", "--train.eval_every=3",
        "--train.eval_steps=1", "--train.sample_tokens=0", "--checkpoint.every=3", "--precision.dtype=fp32",
        "--log.every=1", "--log.progress=none", "--energy.meter=estimate"]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (free port, SQLite backend and artifacts under `root`); `url`
    (re)starts it, `stop()` ends it, as a failing tracking server would."""

    def __init__(self, root: Path):
        self.root, self.proc, self.port = root, None, 0

    @property
    def url(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        return f"http://127.0.0.1:{self.port}"

    def _start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120  # bounded: a server that never answers fails the test, it does not hang
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / f'server-{self.port}.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health within 120 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of chunks with a
    7-byte header each) of `wandb_internal_pb2.Record` messages, W&B's own schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


TRACKIO_READ = """
import json, sys
import trackio
from trackio.sqlite_storage import SQLiteStorage
name = sys.argv[1]
runs = [r for r in trackio.Api().runs("leantrain") if r.name == name]
logs = SQLiteStorage.get_logs("leantrain", name)
arts = SQLiteStorage.get_run_artifacts("leantrain", name, runs[0].id if runs else None)
print(json.dumps({"runs": len(runs), "id": runs[0].id if runs else None, "config": runs[0].config if runs else None,
                  "logs": logs, "artifacts": arts}, default=str))
"""


def test_all_four_trackers_read_back(dataset, tmp_path, mlflow_server):
    run = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url, "TRACKIO_DIR": str(tmp_path / "trackio"),
           "HOME": str(home), "WANDB_MODE": "online",  # leantrain forces offline: no login, no network
           "LEANTRAIN_CACHE_DIR": os.environ.get("LEANTRAIN_CACHE_DIR", str(tmp_path / "cache"))}
    env.pop("WANDB_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "leantrain.cli", "train", "--run-dir", str(run),
                        f"--data.path={dataset}", *TINY, "--log.trackers=tensorboard,mlflow,wandb,trackio"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "tracker_failed"] == []
    assert "Trackio" not in r.stdout, r.stdout  # trackio's banner is kept off the terminal
    lines = read_jsonl(run / "metrics.jsonl")
    loss = {m["step"]: m["loss"] for m in lines}
    val = {m["step"]: m["val_loss"] for m in lines if "val_loss" in m}
    assert sorted(loss) == list(range(1, STEPS + 1)) and sorted(val) == [3, 6]
    assert all("energy_j" in m and "co2_g" in m for m in lines)
    final = (run / "checkpoints" / "latest").read_text().strip()
    assert final == f"step-{STEPS:07d}"
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "home", "run", "trackio"}  # nothing in the cwd
    state = json.loads((run / "trackers.json").read_text())
    assert set(state) == {"tensorboard", "mlflow", "wandb", "trackio"}

    # TensorBoard: its EventAccumulator over RUN_DIR/tensorboard (scalars are stored as float32)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tb_loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert tb_loss == pytest.approx(loss, rel=1e-6) and sorted(tb_loss) == sorted(loss)
    assert {e.step: e.value for e in acc.Scalars("val_loss")} == pytest.approx(val, rel=1e-6)
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes", "energy_j", "co2_g", "cost_usd"):
        assert [e.step for e in acc.Scalars(key)] == sorted(loss), key
    hp = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["model.dim"].number_value == 32
    assert hp.session_start_info.hparams["optim.name"].string_value == "adamw"
    assert "report.html" in acc.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()

    # MLflow: the client, against the live server the run logged to
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    got = client.get_run(state["mlflow"]["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert {m.step: m.value for m in client.get_metric_history(got.info.run_id, "loss")} == loss  # exact: doubles
    assert {m.step: m.value for m in client.get_metric_history(got.info.run_id, "val_loss")} == val
    assert got.data.params["model.dim"] == "32"
    assert got.data.params["log.trackers"] == "tensorboard,mlflow,wandb,trackio"
    assert got.data.tags["leantrain.checkpoint"] == str((run / "checkpoints" / final).resolve())
    assert {"report.html", "summary.json", "config.toml"} <= {a.path for a in client.list_artifacts(got.info.run_id)}
    assert not (run / "mlflow").exists()  # MLFLOW_TRACKING_URI was set: nothing of MLflow's in the run directory

    # W&B: the offline run's .wandb file, inside the run directory
    files = list((run / "wandb").glob(f"offline-run-*-{state['wandb']['id']}/run-{state['wandb']['id']}.wandb"))
    assert len(files) == 1, list((run / "wandb").rglob("*"))
    history, config, artifacts, exit_code = {}, {}, {}, None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[items["_step"]] = items
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
        elif kind == "artifact":
            artifacts[rec.artifact.type] = [(c.path, c.ref) for c in rec.artifact.manifest.contents]
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    assert {s: h["loss"] for s, h in history.items()} == loss
    assert {s: h["val_loss"] for s, h in history.items() if "val_loss" in h} == val
    assert config["model.dim"] == 32 and config["train.steps"] == STEPS
    assert artifacts["report"][0][0] == "report.html"
    where = (run / "checkpoints" / final).resolve()  # a reference artifact: the checkpoint's files, by path
    assert (f"{final}/model.safetensors", (where / "model.safetensors").as_uri()) in artifacts["model"]
    assert all(ref.startswith(where.as_uri() + "/") for _, ref in artifacts["model"])
    assert exit_code == 0

    # trackio: its local store (TRACKIO_DIR), through trackio's own API in a process of its own
    out = subprocess.run([sys.executable, "-c", TRACKIO_READ, "run"], capture_output=True, text=True, timeout=120,
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    tr = json.loads(out.stdout.strip().splitlines()[-1])
    assert tr["runs"] == 1 and tr["id"] == state["trackio"]["id"] and tr["config"]["model.dim"] == 32
    assert {row["step"]: row["loss"] for row in tr["logs"] if "loss" in row} == loss
    assert {row["step"]: row["val_loss"] for row in tr["logs"] if "val_loss" in row} == val
    names = json.dumps(tr["artifacts"])
    assert "run-report" in names and "run-checkpoint" in names


class StopServerAt:
    """Stops the MLflow server after a step, as a tracking server that goes down mid-run."""

    def __init__(self, server, step):
        self.server, self.step, self.events = server, step, []

    def on_step(self, record):
        if record["step"] == self.step:
            self.server.stop()

    def on_event(self, event):
        self.events.append(event)

    def on_end(self, summary):
        pass


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(dataset, tmp_path, mlflow_server, monkeypatch):
    """The MLflow server stops after step 2: the next log call fails (after MLflow's few retries), the tracker is
    dropped with ONE `tracker_failed` event, TensorBoard keeps logging, and training reaches its last step."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # leantrain's defaults, undone after the test
    cfg = tiny_config(dataset, train__steps=STEPS, train__eval_every=3, checkpoint__every=3,
                      log__trackers=["mlflow", "tensorboard"])
    stop = StopServerAt(mlflow_server, 2)
    result = api.train(cfg, tmp_path / "run", observers=[stop])
    assert result.step == STEPS and result.warnings == []
    failed = [e for e in stop.events if e["event"] == "tracker_failed"]
    assert len(failed) == 1 and failed[0]["tracker"] == "mlflow" and failed[0]["step"] == 2, failed
    assert "mlflow tracker failed" in failed[0]["message"] and "training goes on" in failed[0]["message"]
    logged = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "tracker_failed"]
    assert len(logged) == 1
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, STEPS + 1))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1))


class SigtermAt:
    """Sends this process SIGTERM after a step: the trainer checkpoints and stops, as when a job is preempted."""

    def __init__(self, step):
        self.step = step

    def on_step(self, record):
        if record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_event(self, event):
        pass

    def on_end(self, summary):
        pass


def test_without_a_tracking_uri_mlflow_stays_in_the_run_directory_and_a_resume_continues_its_run(
        dataset, tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI: a SQLite store with its artifacts inside RUN_DIR/mlflow, nothing in the current
    folder. Stopped by SIGTERM at step 3 the MLflow run is KILLED; the resumed run continues the same MLflow run
    to FINISHED, and TensorBoard's resumed writer leaves each step once."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cfg = tiny_config(dataset, train__steps=STEPS, train__eval_every=3, checkpoint__every=0,
                      log__trackers=["mlflow", "tensorboard"])
    first = api.train(cfg, run, observers=[SigtermAt(3)])
    assert first.stopped == "SIGTERM" and first.step == 3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    second = api.train(cfg, run)
    assert second.step == STEPS and second.stopped is None and second.warnings == []
    assert json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"] == run_id
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    loss = {m["step"]: m["loss"] for m in read_jsonl(run / "metrics.jsonl")}
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == loss
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "report.html" in artifacts and (run / "mlflow" / "artifacts").is_dir()
    assert {p.name for p in tmp_path.iterdir()} == {"run"}  # no mlruns/ or mlflow.db in the current folder
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1))


def test_a_missing_tracker_library_is_one_line_before_the_run_directory(dataset, tmp_path):
    """trackio not importable (as if not installed): exit 2, one line naming the extra, no run folder made."""
    argv = ["train", "--run-dir", str(tmp_path / "run"), f"--data.path={dataset}", *TINY,
            "--log.trackers=tensorboard,trackio"]
    code = f"import sys; sys.modules['trackio'] = None; from leantrain.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "trackio" in lines[0] and "leantrain[track]" in lines[0]
    assert not (tmp_path / "run").exists()


def test_trackio_refuses_a_remote_target(dataset, tmp_path, monkeypatch, capsys):
    """trackio would send the metrics to a Space: refused in one line, before the run folder is made."""
    from leantrain.cli import main

    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/space")
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"--data.path={dataset}", *TINY,
                 "--log.trackers=trackio"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "TRACKIO_SPACE_ID" in lines[0] and "trackio sync" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_cli_start_does_not_import_tracker_libraries():
    """Trackers off (the default): none of their libraries is imported by the CLI or by loading a config."""
    code = ("import contextlib, io, sys\nfrom leantrain.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['config', '--recipe', 'tiny'])\n"
            "print([m for m in ('mlflow', 'wandb', 'trackio', 'tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
