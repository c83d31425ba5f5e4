"""Checkpoints read only what their manifest lists, inside their own folder, and only regular files.

Each test tampers with a real checkpoint the way a careless or hostile hand would (a manifest naming
`../x` or an absolute path, a symlink or a FIFO in place of a file, an extra file, a file that matches
its checksum but is not safetensors, a state without the keys a resume needs) and checks that loading
falls back to the previous checkpoint with a warning, or ignores the stranger with one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_config, trained_tied
from leantrain.errors import CheckpointError
from leantrain.files import write_durable
from leantrain.train.checkpoint import Checkpointer, read_checkpoint, restore, snapshot
from leantrain.train.telemetry import read_jsonl
from leantrain.train.trainer import Trainer


def _trained(seed=0):
    return trained_tied(seed, steps=2)


def _two_checkpoints(root: Path) -> tuple[Checkpointer, Path]:
    """A Checkpointer with step 1 and step 2 (the newest, returned) written by the real writer."""
    m, opt = _trained()
    ck = Checkpointer(root / "checkpoints", keep=3)
    for step in (1, 2):
        ck.write(snapshot(step, m, opt, {"tokens": step * 10, "loader": {"step": step}}))
    return ck, ck.path_for(2)


def _relist(ckpt: Path, edit) -> None:
    """Rewrite the manifest after `edit(files)` changed its entries (what a tamperer would do)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest["files"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _falls_back(ck: Checkpointer, *words: str) -> None:
    path, snap, warnings = ck.load_latest()
    assert path.name == "step-0000001" and snap.step == 1
    assert len(warnings) == 1 and "step-0000002" in warnings[0] and "damaged" in warnings[0]
    for w in words:
        assert w in warnings[0], warnings[0]


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, where):
    """A manifest listing a file outside the checkpoint (with its true checksum) must not make loading read it."""
    ck, newest = _two_checkpoints(tmp_path)
    secret = tmp_path / "checkpoints" / "secret.txt"
    secret.write_bytes(b"not the checkpoint's")
    name = "../secret.txt" if where == "dotdot" else str(secret)
    _relist(newest, lambda files: files.update({name: _entry(secret.read_bytes())}))
    _falls_back(ck, "outside the checkpoint folder")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_checkpoint(newest)


def test_symlink_to_a_file_outside_is_refused(tmp_path):
    ck, newest = _two_checkpoints(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((newest / "model.safetensors").read_bytes())  # same bytes: the checksum matches
    (newest / "model.safetensors").unlink()
    (newest / "model.safetensors").symlink_to(outside)
    _falls_back(ck, "model.safetensors", "symlink")


def test_symlinked_folder_on_the_way_is_refused(tmp_path):
    ck, newest = _two_checkpoints(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not the checkpoint's")
    (newest / "sub").symlink_to(outside)
    _relist(newest, lambda files: files.update({"sub/secret.txt": _entry(b"not the checkpoint's")}))
    _falls_back(ck, "sub/secret.txt")


def test_fifo_listed_in_the_manifest_is_refused_without_being_opened(tmp_path):
    """Reading a FIFO would block for ever (nobody writes to it). A watcher opens the write end the
    moment anyone opens the read end, so a reader that does open it is unblocked and caught."""
    ck, newest = _two_checkpoints(tmp_path)
    fifo = newest / "optim.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)
    opened, done = [], threading.Event()

    def watch():
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
            except OSError:
                time.sleep(0.001)
                continue
            opened.append(True)
            os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _falls_back(ck, "optim.safetensors", "not a regular file")
    finally:
        done.set()
        watcher.join()
    assert not opened, "the FIFO was opened"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left as it was


def test_unlisted_file_is_ignored_and_named(tmp_path):
    ck, newest = _two_checkpoints(tmp_path)
    (newest / "stranger.safetensors").write_bytes(b"not read")
    path, snap, warnings = ck.load_latest()
    assert path == newest and snap.step == 2
    assert len(warnings) == 1 and "stranger.safetensors" in warnings[0] and "does not list" in warnings[0]
    assert read_checkpoint(newest).warnings == warnings


def test_unparseable_safetensors_with_a_correct_checksum_falls_back(tmp_path):
    ck, newest = _two_checkpoints(tmp_path)
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{this is not js}" + b"\x00" * 32
    (newest / "model.safetensors").write_bytes(garbage)
    _relist(newest, lambda files: files.update({"model.safetensors": _entry(garbage)}))
    _falls_back(ck, "model.safetensors", "cannot be parsed")


def _safetensors_file(header, data: bytes = b"\x00" * 8) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


def _t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("garbage", [
    b"\xff" * 8 + b"\x00" * 8,  # a header length past the end of the file
    _safetensors_file(b"[1]"),  # a header that is not an object
    _safetensors_file(b"[" * 200_000 + b"]" * 200_000),  # nested past the JSON parser's recursion limit
    _safetensors_file({"w": _t("X9", [2], 0, 8)}),  # an unknown dtype
    _safetensors_file({"w": _t(["F32"], [2], 0, 8)}),  # a dtype that is not a string
    _safetensors_file({"w": _t("F32", [4], 0, 8)}),  # offsets that do not match the shape
    _safetensors_file({"w": _t("F32", [0, 2**63], 0, 0)}),  # a dimension past int64
    _safetensors_file({"w": _t("F32", [2], 0, 8), "v": _t("F32", [1], 4, 8)}),  # overlapping tensors
    _safetensors_file({"w": _t("F32", [1], 0, 4), "v": _t("F32", [1], 8, 12)}, b"\x00" * 12),  # a gap
    _safetensors_file({"w": _t("F32", [1], 0, 4)}),  # bytes no tensor covers
])
def test_malformed_safetensors_with_a_correct_checksum_fall_back(tmp_path, garbage):
    ck, newest = _two_checkpoints(tmp_path)
    (newest / "optim.safetensors").write_bytes(garbage)
    _relist(newest, lambda files: files.update({"optim.safetensors": _entry(garbage)}))
    _falls_back(ck, "optim.safetensors", "cannot be parsed")


def test_checkpoint_tensors_are_read_without_a_copy_and_match_the_safetensors_library(tmp_path):
    from safetensors.torch import load as st_load

    from leantrain.train.checkpoint.full import safetensors_chunks, tensors_from_safetensors

    # 3 bf16 values (6 bytes) put the fp32 and int64 tensors after them off their alignment
    tensors = {"a": torch.randn(3, dtype=torch.bfloat16), "b": torch.randn(2, 5), "c": torch.zeros(0, 4),
               "d": torch.arange(7, dtype=torch.int64), "e": torch.tensor([True, False])}
    buf = bytearray(b"".join(bytes(c) for c in safetensors_chunks(tensors)))
    got, ref = tensors_from_safetensors(buf), st_load(bytes(buf))
    assert sorted(got) == sorted(ref) == sorted(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == ref[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], ref[name]) and torch.equal(got[name], t)
    base = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    inside = {n for n, t in got.items() if t.numel() and base <= t.data_ptr() < base + len(buf)}
    assert inside == {"a", "e"}  # views into the file's bytes; b and d start off their alignment, so copied
    with pytest.raises(BufferError):  # the bytes under the views cannot be resized away while they live
        buf.extend(b"\x00" * 4096)


@pytest.mark.parametrize("change", ["longer", "shorter", "flipped"])
def test_reading_and_hashing_in_chunks_still_catches_every_damage(tmp_path, monkeypatch, change):
    from leantrain.train.checkpoint import manifest

    # many chunks, each large enough (>= 2 KiB) that hashlib releases the GIL, so hashing overlaps the reads
    monkeypatch.setattr(manifest, "CHUNK", 4096)
    _, _, newest = _large_checkpoint(tmp_path)
    path = newest / "model.safetensors"
    data = bytearray(path.read_bytes())
    info = _entry(bytes(data))
    assert bytes(manifest.read_listed(newest, "model.safetensors", info)) == data
    manifest.verify_listed(newest, "model.safetensors", info)
    if change == "longer":
        data += b"\x00" * 70_000  # past the expected size by more than one spare buffer
    elif change == "shorter":
        del data[-1]
    else:
        data[len(data) // 2] ^= 1
    path.write_bytes(data)
    for check in (manifest.read_listed, manifest.verify_listed):
        with pytest.raises(CheckpointError, match="fails its checksum") as err:
            check(newest, "model.safetensors", info)
        if change != "flipped":
            assert f"({len(data)} bytes, expected {info['bytes']})" in str(err.value)


def _large_checkpoint(root: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Path]:
    """A checkpoint whose files pass 1 MiB (~1.4 MB of weights, twice that of AdamW state)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.Linear(600, 7))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 600)).sum().backward()
    opt.step()
    ck = Checkpointer(root / "checkpoints", keep=2)
    return model, opt, ck.write(snapshot(1, model, opt, {"tokens": 1, "loader": {"step": 1}}))


def test_a_large_checkpoint_round_trips_through_mapped_buffers_and_damage_is_still_caught(tmp_path):
    from leantrain.train.checkpoint import manifest

    model, opt, path = _large_checkpoint(tmp_path)
    info = manifest.read(path)["files"]["model.safetensors"]
    assert info["bytes"] > 1 << 20  # past the size read into a MAP_POPULATE mapping
    snap = read_checkpoint(path)
    for name, t in model.state_dict().items():
        assert torch.equal(snap.model[name], t)
    assert torch.equal(snap.optim["0/exp_avg"], opt.state[model[0].weight]["exp_avg"])
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0x40
    (path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors fails its checksum"):
        read_checkpoint(path)


def test_unparseable_state_with_a_correct_checksum_falls_back(tmp_path):
    ck, newest = _two_checkpoints(tmp_path)
    garbage = b"[1, 2"
    (newest / "state.json").write_bytes(garbage)
    _relist(newest, lambda files: files.update({"state.json": _entry(garbage)}))
    _falls_back(ck, "state.json")


@pytest.mark.parametrize("key", ["rng", "param_groups", "loader", "tokens"])
def test_state_without_expected_keys_falls_back(tmp_path, key):
    """The format's own keys (rng, param_groups, ...) are always required; a trainer also needs tokens and
    the loader's position, so its Checkpointer requires them."""
    ck, newest = _two_checkpoints(tmp_path)
    ck = Checkpointer(ck.root, keep=3, require=("tokens", "loader"))
    state = json.loads((newest / "state.json").read_text())
    del state[key]
    data = json.dumps(state).encode()
    (newest / "state.json").write_bytes(data)
    _relist(newest, lambda files: files.update({"state.json": _entry(data)}))
    _falls_back(ck, "state.json lacks", key)


def test_sharded_checkpoint_reads_only_its_listed_shards(tmp_path):
    """DCP's reader would take every *.safetensors in the shards folder; a stranger there (here a
    shard with other values under the same keys) must neither be read nor go unmentioned."""
    m, opt = _trained()
    ck = Checkpointer(tmp_path / "checkpoints", keep=3)
    path = ck.save_sharded(1, m, opt, {"tokens": 10, "loader": {}})
    other, other_opt = _trained(seed=3)
    other_dir = ck.save_sharded(2, other, other_opt, {"tokens": 20, "loader": {}})
    (shard,) = (other_dir / "shards").glob("*.safetensors")
    (path / "shards" / "zz-stranger.safetensors").write_bytes(shard.read_bytes())
    snap = read_checkpoint(path)
    assert len(snap.warnings) == 1 and "shards/zz-stranger.safetensors" in snap.warnings[0]
    fresh, fresh_opt = _trained(seed=1)
    restore(snap, fresh, fresh_opt)
    for a, b in zip(m.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_files_written_have_ordinary_permissions(tmp_path):
    """write_durable (every rewritten file) and checkpoints: 0666/0777 less the umask, not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        write_durable(tmp_path / "a.txt", "x")
        _, newest = _two_checkpoints(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    for p in [newest, *newest.iterdir(), newest.parent / "latest"]:
        assert stat.S_IMODE(os.stat(p).st_mode) == (0o755 if p.is_dir() else 0o644), p
    old = os.umask(0o077)
    try:
        write_durable(tmp_path / "b.txt", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_trainer_resume_skips_a_newest_checkpoint_without_loader_state(dataset, tmp_path):
    """A resume used to end in a KeyError traceback on such a checkpoint; it now falls back, loudly."""
    cfg = tiny_config(dataset, train__steps=12, train__eval_every=0, train__threads=1, checkpoint__every=6,
                      checkpoint__keep=3)
    run = tmp_path / "run"
    Trainer(cfg, run).fit()
    newest = run / "checkpoints" / "step-0000012"
    state = json.loads((newest / "state.json").read_text())
    del state["loader"]
    data = json.dumps(state).encode()
    (newest / "state.json").write_bytes(data)
    _relist(newest, lambda files: files.update({"state.json": _entry(data)}))
    with Trainer(cfg, run, resume=True) as trainer:
        assert trainer.step == 6
    damaged = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint_damaged"]
    assert len(damaged) == 1 and "step-0000012" in damaged[0]["message"] and "loader" in damaged[0]["message"]


def test_run_files_and_exports_have_ordinary_permissions(dataset, tmp_path):
    """0644 files and 0755 folders under umask 022 (not the 0600 of a mkstemp-style temporary file)."""
    from leantrain.export.hf import export_hf

    cfg = tiny_config(dataset, train__steps=2, train__eval_every=0, train__threads=1, checkpoint__every=2)
    old = os.umask(0o022)
    try:
        Trainer(cfg, tmp_path / "run").fit()
        export_hf(tmp_path / "run", tmp_path / "export")
    finally:
        os.umask(old)
    wrong = {}
    for top in (tmp_path / "run", tmp_path / "export"):
        for p in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            if p.is_file() and mode != 0o644 or p.is_dir() and mode != 0o755:
                wrong[str(p.relative_to(tmp_path))] = oct(mode)
    assert wrong == {}
    assert (tmp_path / "export" / "config.json").is_file() and (tmp_path / "run" / "config.toml").is_file()
