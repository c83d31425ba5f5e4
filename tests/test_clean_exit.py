"""Every background worker a run starts (prefetch thread, checkpoint writer, power poller) has ended before
the process exits, on success, signal and error paths: a native thread still running at interpreter
shutdown can abort the process with "terminate called without an active exception"."""

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import tiny_config
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer

# runs the real CLI in this process's interpreter; at exit (after Python joined its non-daemon threads)
# any thread still alive is named on stderr, so a leak fails the test every time, not only when it crashes
DRIVER = """
import atexit, runpy, sys, threading
def _alive():
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if left:
        sys.stderr.write(f"threads alive at exit: {left}\\n")
atexit.register(_alive)
sys.argv = ["leantrain", *sys.argv[1:]]
runpy.run_module("leantrain.cli", run_name="__main__")
"""

TINY = ["--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.seq_len=32",
        "--model.vocab_size=512", "--train.micro_batch_size=2", "--train.eval_every=0", "--train.eval_steps=1",
        "--train.sample_tokens=0", "--optim.warmup_steps=1", "--log.progress=none", "--energy.meter=off",
        "--checkpoint.every=1", "--checkpoint.async=true", "--data.prefetch=on"]


def _train(dataset, run_dir, stop: bool) -> subprocess.CompletedProcess:
    """One short training in its own process; `stop` sends SIGTERM once the first metrics line is written."""
    steps = 10_000 if stop else 3
    args = [sys.executable, "-c", DRIVER, "train", "--run-dir", str(run_dir), f"--data.path={dataset}",
            f"--train.steps={steps}", *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop:
        deadline = time.monotonic() + 120
        while not read_jsonl(run_dir / "metrics.jsonl") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_twenty_short_trainings_exit_cleanly(dataset, tmp_path):
    """16 runs to the end and 4 stopped by SIGTERM, two processes at a time (one per core)."""
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: _train(dataset, tmp_path / f"run{i}", stop=i % 5 == 4), range(20)))
    for i, r in enumerate(results):
        assert r.returncode == 0, (i, r.stderr[-3000:])
        assert "terminate called" not in r.stderr and "threads alive" not in r.stderr, (i, r.stderr[-3000:])
    stopped = [i for i, r in enumerate(results) if "stopped by SIGTERM" in r.stdout]
    assert stopped == [4, 9, 14, 19]


class _Fails:
    """An observer that raises at a given step, as a failing tracker or a full disk would."""

    def on_step(self, record):
        if record["step"] == 2:
            raise OSError("no space left on device")

    def on_event(self, event):
        pass

    def on_end(self, summary):
        pass


def _workers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("leantrain-", "checkpoint-"))]


def test_error_in_fit_stops_the_workers(dataset, tmp_path):
    assert _workers() == []
    cfg = tiny_config(dataset, data__prefetch="on", checkpoint__async=True, checkpoint__every=1, train__steps=5)
    trainer = Trainer(cfg, tmp_path / "run", observers=[_Fails()])
    assert "leantrain-prefetch" in _workers()
    with pytest.raises(OSError, match="no space"):
        trainer.fit()
    assert _workers() == []


def test_trainer_as_context_manager_stops_the_workers(dataset, tmp_path):
    cfg = tiny_config(dataset, data__prefetch="on", train__steps=3)
    with Trainer(cfg, tmp_path / "run") as trainer:
        result = trainer.train_step(trainer.loader.next_step())
        assert not result.skipped and result.tokens == 4 * 64 and trainer.step == 1
    assert _workers() == []
