"""The training loop on a real tiny model and real data: learning, accumulation, resume, sampling."""

import json

import pytest
import torch

from helpers import StopAt, tiny_config
from leantrain.config import load_config
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer


def tiny_cfg(data_path, **over):
    return tiny_config(data_path, **over)
def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def test_loss_falls_and_run_dir_is_complete(dataset, tmp_path):
    cfg = tiny_cfg(dataset, train__steps=40, train__eval_every=20, optim__lr=1e-2, train__sample_tokens=20,
                   checkpoint__every=20)
    summary = Trainer(cfg, tmp_path / "run").fit()
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 1.0  # from ~ln(512) = 6.2 down a long way
    assert last["val_loss"] < records[19]["val_loss"] + 0.5 and "val_loss" not in records[0]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes"):
        assert key in last
    assert last["tokens"] == 40 * 4 * 64 and 0 < last["mfu"] < 1
    assert summary["sample"] and (run / "samples.txt").read_text().count("=== step 40") == 1
    assert load_config(run / "config.toml") == cfg
    plan = json.loads((run / "plan.json").read_text())
    assert plan["total_tokens"] == 40 * 4 * 64 and plan["params"] > 0
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events[0] == "start" and events[-1] == "end" and events.count("checkpoint") == 2


def test_grad_accumulation_equals_big_batch(dataset, tmp_path):
    big = Trainer(tiny_cfg(dataset, train__micro_batch_size=8, train__steps=3), tmp_path / "a")
    acc = Trainer(tiny_cfg(dataset, train__micro_batch_size=2, train__grad_accum_steps=4, train__steps=3),
                  tmp_path / "b")
    big.fit()
    acc.fit()
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    for p, q in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_accumulation_normalises_by_all_targets_of_the_step(dataset, tmp_path):
    """Micro-batches with different numbers of masked targets must weigh every token equally."""
    tr = Trainer(tiny_cfg(dataset), tmp_path / "run", resume=False)
    (x1, y1), (x2, y2) = tr.loader.next_step()[0], tr.loader.next_step()[0]
    y1 = y1.clone()
    y1[:, :48] = -100  # first micro-batch keeps few targets
    tr.model.zero_grad()
    loss_acc, _ = tr.forward_backward([(x1, y1), (x2, y2)])
    grads_acc = [p.grad.clone() for p in tr.model.parameters()]
    tr.model.zero_grad()
    loss_big, _ = tr.forward_backward([(torch.cat([x1, x2]), torch.cat([y1, y2]))])
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads_acc, tr.model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_bit_for_bit(dataset, tmp_path, dtype):
    # stopping at step 5, between log lines (every 3), also checks the logged loss window resumes
    cfg = tiny_cfg(dataset, precision__dtype=dtype, checkpoint__every=5, log__every=3)
    Trainer(cfg, tmp_path / "straight").fit()
    first = Trainer(cfg, tmp_path / "resumed")
    first.observers.append(StopAt(first, 5))
    summary = first.fit()
    assert summary["stopped"] == "SIGTERM" and summary["step"] == 5
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.step == 5
    second.fit()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    events = [e["event"] for e in read_jsonl(tmp_path / "resumed" / "events.jsonl")]
    assert "preempted" in events and "resume" in events


def test_resume_from_older_checkpoint_discards_later_metrics(dataset, tmp_path):
    cfg = tiny_cfg(dataset, checkpoint__every=4, checkpoint__keep=3)
    Trainer(cfg, tmp_path / "run").fit()
    import shutil

    for name in ("step-0000012", "step-0000008"):  # as if the process died after step 7's metrics
        shutil.rmtree(tmp_path / "run" / "checkpoints" / name)
    again = Trainer(cfg, tmp_path / "run")
    assert again.step == 4
    assert max(losses(tmp_path / "run")) == 4
    assert len(read_jsonl(tmp_path / "run" / "metrics.discarded.jsonl")) == 8


def test_vocab_larger_than_model_is_a_clear_error(dataset, tmp_path):
    from leantrain.errors import DataError

    with pytest.raises(DataError, match="model.vocab_size"):
        Trainer(tiny_cfg(dataset, model__vocab_size=100), tmp_path / "run")


def test_train_step_is_a_whole_optimizer_step(dataset, tmp_path):
    """forward/backward, clip, guard, optimizer and schedule in one call; an lr override replaces the schedule."""
    with Trainer(tiny_cfg(dataset, train__steps=4), tmp_path / "run", resume=False) as tr:
        before = [p.detach().clone() for p in tr.model.parameters()]
        first = tr.train_step(tr.loader.next_step())
        assert not first.skipped and tr.step == 1 and tr.tokens == first.tokens == 4 * 64
        assert first.lr == tr.optimizer.param_groups[0]["lr"] > 0  # warmup's first lr
        assert all(p.grad is None for p in tr.model.parameters())  # the update is taken, gradients cleared
        assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters(), strict=True))
        second = tr.train_step(tr.loader.next_step(), lr=0.0123)
        assert second.lr == 0.0123 and all(g["lr"] == 0.0123 for g in tr.optimizer.param_groups)
        assert torch.isfinite(second.loss) and second.grad_norm > 0 and tr.step == 2


def test_peak_is_measured_again_once_when_a_step_beats_it(dataset, tmp_path):
    tr = Trainer(tiny_cfg(dataset, train__steps=3, train__eval_every=0), tmp_path / "run")
    tr.meter.peak_flops = 1.0  # as if the cached probe had run on busy cores
    tr.fit()
    events = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "peak_reprobed"]
    assert len(events) == 1 and events[0]["peak_flops"] > 1.0
    assert all(0 < r["mfu"] < 1 for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")[1:])
