"""Checkpoint save and load speed against the disk's own sequential write and read speed, in the same run.

Builds a ~29M-parameter model (the small recipe at dim 512, 8 layers) with its AdamW state, trains it one
step, then per repeat: saves a checkpoint and loads it into the same model, and before and after that
writes and reads back a plain file of the checkpoint's bytes the way `dd` does (8 MiB buffered writes,
fsync; 8 MiB reads; the median of all of them is the disk's figure). Two
kinds, each in fresh processes: the full format in one process, and the sharded format
(torch.distributed.checkpoint) by 2 gloo ranks under FSDP2. Save = snapshot + write + fsync + rename,
as a training run does it; load = read + verify every file's sha256 + put the tensors into the model and
optimizer, as a resume does it. Before every read (the plain file's and the checkpoint's) the files are
dropped from the page cache with posix_fadvise(DONTNEED), so reads come from the disk (a VM's host may
still cache its disk image). Prints GB/s for ours and the plain file and the ratio, plus sha256's speed on
one core (every byte saved or loaded is hashed).

    python bench/checkpoint_io.py                       # both kinds, 3 repeats (~2 min on 2 cores)
    python bench/checkpoint_io.py --only full --repeats 1 --dim 256 --layers 4
    python bench/checkpoint_io.py --dir /mnt/nvme       # the disk of another folder
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _data import cpu_name, dataset, report_ratio  # bench/ is on sys.path when a bench runs as a script

KINDS = ("full", "sharded")
BLOCK = 8 << 20  # dd's bs=8M


def drop_cached(path: Path) -> None:
    """Evict a file (or every file under a folder) from the page cache; its pages are clean (fsynced)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_file_speed(path: Path, payload: bytes) -> tuple[float, float]:
    """(write s, read s) of `payload` to a new file, as `dd bs=8M conv=fsync` then `dd bs=8M` after a drop.

    The payload is the checkpoint's own bytes: a disk or VM image that compresses or skips zeros would
    flatter one side if the two wrote different data (random bytes wrote at 0.7x the speed here)."""
    buf, size = memoryview(payload), len(payload)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        done = 0
        while done < size:
            done += os.write(fd, buf[done: done + BLOCK])
        os.fsync(fd)
    finally:
        os.close(fd)
    write_s = time.perf_counter() - t0
    drop_cached(path)
    into = bytearray(BLOCK)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(into):
            pass
    read_s = time.perf_counter() - t0
    path.unlink()
    return write_s, read_s


def sha256_speed(nbytes: int = 64 << 20) -> float:
    buf = os.urandom(nbytes)
    t0 = time.perf_counter()
    hashlib.sha256(buf).digest()
    return nbytes / (time.perf_counter() - t0)


def worker(args: argparse.Namespace) -> None:
    """One kind: train one step, then per repeat the plain file (rank 0), a save and a load, timed."""
    import torch.distributed as dist

    from leantrain.config import load_config
    from leantrain.train.checkpoint import read_checkpoint, restore, restore_full, snapshot
    from leantrain.train.trainer import Trainer

    sharded = args.worker == "sharded"
    heads = max(1, args.dim // 64)
    cfg = load_config(recipe="small", overrides={
        "data": {"path": args.data},
        "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": heads, "n_kv_heads": heads, "seq_len": 64},
        "train": {"steps": 1, "micro_batch_size": 1, "eval_every": 0, "eval_steps": 1, "sample_tokens": 0,
                  "threads": 1 if sharded else 2, "compile": "false"},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"every": 0, "keep": args.repeats + 2, "format": "sharded" if sharded else "full"},
        "log": {"every": 1, "progress": "none", "grad_health_every": 0},
        **({"parallel": {"dp_shard": 2}} if sharded else {}),
    })
    scratch = Path(args.scratch)
    with Trainer(cfg, scratch / f"run-{args.worker}", resume=False) as trainer:
        trainer.fit()  # one step, so the optimizer holds its state; the end-of-run save warms the writer up
        ck, model, opt, lay = trainer.checkpointer, trainer.model, trainer.optimizer, trainer.layout
        state = {"tokens": trainer.tokens, "loader": trainer.loader.state_dict()}

    def sync() -> float:
        if lay.distributed:
            dist.barrier()
        return time.perf_counter()

    files = sorted(p for p in ck.path_for(1).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    payload = b"".join(p.read_bytes() for p in files) if lay.is_rank0 else b""
    rows = []
    for r in range(args.repeats):
        # the plain file before and after each save and load, so neither goes first on a disk that changes pace
        plain = [plain_file_speed(scratch / f"plain-{r}.bin", payload) if lay.is_rank0 else (0.0, 0.0)]
        step = 100 + r
        t0 = sync()
        if sharded:
            ck.save_sharded(step, model, opt, state)
        else:
            ck.write(snapshot(step, model, opt, state))
        save_s = sync() - t0
        path = ck.path_for(step)
        if lay.is_rank0:
            drop_cached(path)
        t0 = sync()
        snap = read_checkpoint(path, ck.require)
        (restore_full if lay.distributed else restore)(snap, model, opt)
        load_s = sync() - t0
        del snap
        sync()
        plain.append(plain_file_speed(scratch / f"plain-{r}.bin", payload) if lay.is_rank0 else (0.0, 0.0))
        rows += [{"save_s": save_s, "load_s": load_s, "plain_write_s": w, "plain_read_s": rd} for w, rd in plain]
    if lay.is_rank0:
        print(json.dumps({"kind": args.worker, "bytes": size, "params": trainer.plan["params"],
                          "ranks": lay.world_size, "rows": rows}), flush=True)


def run_kind(kind: str, args: argparse.Namespace, data: str, scratch: Path) -> dict:
    me = [__file__, "--worker", kind, "--data", data, "--scratch", str(scratch), "--dim", str(args.dim),
          "--layers", str(args.layers), "--repeats", str(args.repeats)]
    if kind == "sharded":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *me]
    else:
        cmd = [sys.executable, *me]
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                       if kind == "sharded" else None)
    if r.returncode != 0:
        sys.exit(f"{kind} run failed:\n{r.stderr[-3000:]}")
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    print(f"  {kind:8} {time.perf_counter() - t0:6.1f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(KINDS), help="comma-separated kinds: full, sharded (both)")
    p.add_argument("--repeats", type=int, default=3, help="saves and loads per kind; medians are printed (3)")
    p.add_argument("--dim", type=int, default=512, help="model width (512: ~29M params, ~350 MB with AdamW state)")
    p.add_argument("--layers", type=int, default=8, help="model layers (8)")
    p.add_argument("--data", help="token dataset (default data/stdlib, prepared in a temp dir if missing)")
    p.add_argument("--dir", help="folder on the disk to measure (default: the temp folder)")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    kinds = [k for k in args.only.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        p.error(f"unknown kind {', '.join(bad)}; choose from {', '.join(KINDS)}")

    with tempfile.TemporaryDirectory(prefix="ckpt-io-", dir=args.dir) as tmp:
        scratch = Path(tmp)
        data = dataset(args.data, scratch)
        results = [run_kind(kind, args, data, scratch / kind) for kind in kinds]
    sha = sha256_speed()
    first = results[0]
    print(f"\ncheckpoint save/load · {first['params'] / 1e6:.1f}M params + AdamW state · "
          f"{first['bytes'] / 1e6:,.0f} MB per checkpoint · {cpu_name()} ({os.cpu_count()} cores) · "
          f"{args.dir or tempfile.gettempdir()} · median of {args.repeats} · reads after posix_fadvise(DONTNEED)")
    head = (f"{'kind':18} {'save GB/s':>9} {'dd write GB/s':>13} {'ratio':>6}   {'load GB/s':>9} "
            f"{'dd read GB/s':>12} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for res in results:
        n = res["bytes"]
        gbps = {k: n / statistics.median(r[k] for r in res["rows"]) / 1e9
                for k in ("save_s", "load_s", "plain_write_s", "plain_read_s")}
        save_ratio, load_ratio = gbps["save_s"] / gbps["plain_write_s"], gbps["load_s"] / gbps["plain_read_s"]
        label = f"{res['kind']} ({res['ranks']} {'rank' if res['ranks'] == 1 else 'ranks'})"
        print(f"{label:18} {gbps['save_s']:>9.2f} {gbps['plain_write_s']:>13.2f} {save_ratio:>5.2f}x   "
              f"{gbps['load_s']:>9.2f} {gbps['plain_read_s']:>12.2f} {load_ratio:>5.2f}x")
        report_ratio(f"{res['kind']} checkpoint save GB/s vs dd write", save_ratio,
                     "dd-style write of the checkpoint's bytes to one file (8 MiB writes + fsync)",
                     save_gbps=gbps["save_s"], dd_write_gbps=gbps["plain_write_s"], bytes=n)
        report_ratio(f"{res['kind']} checkpoint load GB/s vs dd read", load_ratio,
                     "dd-style read of that file, page cache dropped",
                     load_gbps=gbps["load_s"], dd_read_gbps=gbps["plain_read_s"], bytes=n)
    print(f"\nsha256 on one core: {sha / 1e9:.2f} GB/s (every byte saved is hashed into the manifest, every byte "
          "loaded is checked against it)")


if __name__ == "__main__":
    main()
