"""Checkpoint files: round trip, tied weights, damage detection and fallback, failed writes."""

import json
import os
import random
import sys
import threading

import numpy as np
import pytest
import torch

from helpers import trained_tied
from leantrain.errors import CheckpointError
from leantrain.train.checkpoint import Checkpointer, read_checkpoint, restore, set_rng_state, snapshot


def _trained(seed=0):
    return trained_tied(seed, steps=3)


def _save(ck, step, m, opt, **state):
    return ck.write(snapshot(step, m, opt, {"tokens": step * 10, **state}))


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    m, opt = _trained()
    ck = Checkpointer(tmp_path, keep=3)
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    path = _save(ck, 3, m, opt)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    assert (tmp_path / "latest").read_text().strip() == path.name
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optim.safetensors",
                                                      "state.json"]
    m2, opt2 = _trained(seed=1)
    snap = read_checkpoint(path)
    restore(snap, m2, opt2)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert m2.out.weight is m2.emb.weight  # tie survives
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))
    set_rng_state(snap.state["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]


def test_keep_prunes_only_after_new_is_whole(tmp_path):
    m, opt = _trained()
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(ck, step, m, opt)
    assert [p.name for p in ck.list()] == ["step-0000002", "step-0000003"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    m, opt = _trained()
    ck = Checkpointer(tmp_path, keep=3)
    _save(ck, 1, m, opt)
    newest = _save(ck, 2, m, opt)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    path, snap, warnings = ck.load_latest()
    assert path.name == "step-0000001" and snap.step == 1
    assert len(warnings) == 1 and "step-0000002" in warnings[0] and "damaged" in warnings[0]


def test_no_usable_checkpoint_is_an_error_and_nothing_is_removed(tmp_path):
    m, opt = _trained()
    ck = Checkpointer(tmp_path, keep=3)
    p = _save(ck, 1, m, opt)
    (p / "optim.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.load_latest()
    assert (p / "optim.safetensors").exists()


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m, opt = _trained()
    ck = Checkpointer(tmp_path, keep=1)
    good = _save(ck, 1, m, opt)
    import leantrain.train.checkpoint.full as mod

    def disk_full(path, data, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "write_durable", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are intact"):
        _save(ck, 2, m, opt)
    monkeypatch.undo()
    assert [p.name for p in ck.list()] == [good.name]
    assert not list(tmp_path.glob(".tmp-*"))
    assert ck.load_latest()[1].step == 1


def test_state_is_json_and_tensors_are_safetensors(tmp_path):
    m, opt = _trained()
    p = _save(Checkpointer(tmp_path, keep=1), 1, m, opt, loader={"step": 4})
    state = json.loads((p / "state.json").read_text())
    assert state["loader"] == {"step": 4} and state["aliases"] == {"out.weight": "emb.weight"}
    assert (p / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not a pickle


@pytest.mark.parametrize("how", ["sync", "background", "sharded"])
def test_save_writes_what_write_of_a_snapshot_writes(tmp_path, how):
    """`Checkpointer.save(step, state)`, given model and optimizer once, is the one call a loop needs;
    in every mode it restores to the same model and optimizer as `write(snapshot(...))`."""
    m, opt = _trained()
    ck = Checkpointer(tmp_path / how, keep=2, model=m, optimizer=opt, format="sharded" if how == "sharded" else "full",
                      background=how == "background")
    path = ck.save(3, {"tokens": 30, "loader": {"step": 3}})
    ck.wait()
    assert path == ck.path_for(3) and (tmp_path / how / "latest").read_text().strip() == path.name
    m2, opt2 = _trained(seed=1)
    _, snap, warnings = ck.load_latest()
    restore(snap, m2, opt2)
    assert warnings == [] and snap.step == 3 and snap.state["tokens"] == 30
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for k, s in opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], opt2.state_dict()["state"][k]["exp_avg"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_background_writer_yields_the_cores_but_the_training_thread_keeps_its_priority(tmp_path):
    """The async writer runs at nice 19, in its own thread only: the caller (the training loop) keeps its
    priority, and the checkpoint is written whole."""
    m, opt = _trained()
    ck = Checkpointer(tmp_path, keep=2, model=m, optimizer=opt, background=True)
    seen = []
    write = ck.write

    def noting_write(snap):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return write(snap)

    ck.write = noting_write
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ck.save(4, {"tokens": 40, "loader": {"step": 4}})
    ck.wait()
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    assert ck.load_latest()[1].step == 4
