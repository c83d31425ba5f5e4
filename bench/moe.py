"""Dense vs mixture-of-experts at equal active FLOPs, on the same data and the same tokens.

Three real training runs through the Trainer, each in its own process (so each peak-memory reading is its own):
the `tiny` recipe (dense), `moe-tiny` (8 experts, top-2, expert width = tiny's / 2: about tiny's FLOPs per
token) with the Switch aux loss, and `moe-tiny` with DeepSeek-V3's loss-free bias. Same seed, same batches.
Prints validation loss at equal tokens (and the evaluations' wall times, for equal-time reading), tokens/s,
peak memory, MoE step time / dense step time (target <= 1.3x) and the expert load max/mean after warm-up.

    python bench/moe.py                    # ~3 minutes on 2 CPU cores
    python bench/moe.py --steps 300 --batch 16   # the recipes' full runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _data import ROOT, dataset

VARIANTS = {"dense": ("tiny", {}), "moe-aux": ("moe-tiny", {"moe_balance": "aux"}),
            "moe-bias": ("moe-tiny", {"moe_balance": "bias"})}


def child(name: str, data: str, steps: int, batch: int, seq: int, out: Path) -> None:
    """One run; writes its metrics lines as JSON to `out`."""
    sys.path.insert(0, str(ROOT / "src"))
    from leantrain.config import load_config
    from leantrain.train.telemetry import read_jsonl
    from leantrain.train.trainer import Trainer

    recipe, model = VARIANTS[name]
    cfg = load_config(recipe=recipe, overrides={
        "model": {"seq_len": seq, **model}, "data": {"path": data},
        "train": {"steps": steps, "micro_batch_size": batch, "eval_every": max(1, steps // 4), "eval_steps": 4,
                  "sample_tokens": 0},
        "optim": {"warmup_steps": max(1, steps // 10)}, "checkpoint": {"every": 0},
        "log": {"every": 1, "progress": "none"}})
    run = out.parent / f"run-{name}"
    Trainer(cfg, run, resume=False).fit()
    out.write_text(json.dumps(read_jsonl(run / "metrics.jsonl")))


def summarise(name: str, records: list[dict]) -> dict:
    warm = records[len(records) // 4:]  # after warm-up: compile-free eager, caches hot, routing settled
    tps = statistics.median(r["tokens_per_s"] for r in warm)
    evals = [(r["tokens"], r["elapsed_s"], r["val_loss"]) for r in records if "val_loss" in r]
    row = {"name": name, "val_loss": evals[-1][2], "evals": evals, "tokens_per_s": tps,
           "peak_mem_mb": records[-1]["peak_mem_bytes"] / 2**20, "loss": records[-1]["loss"],
           "wall_s": records[-1]["elapsed_s"]}
    if "moe_load_max_over_mean" in records[-1]:
        row["load_max_over_mean"] = statistics.mean(r["moe_load_max_over_mean"] for r in warm)
        row["load_last"] = statistics.mean(r["moe_load_max_over_mean"] for r in records[-5:])
        row["moe_dropped"] = statistics.mean(r["moe_dropped"] for r in warm)
    return row


def interleaved_step_ratio(batch: int, seq: int, steps: int = 8) -> tuple[float, float, str]:
    """Median forward+backward seconds of tiny and moe-tiny on the same batch, timed alternately in this process
    (same threads, same allocator, drift hits both), under the dtype the trainer picks here."""
    import time

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from leantrain.config import load_config
    from leantrain.device import describe_device
    from leantrain.model import Attention, Transformer

    info = describe_device("cpu", "auto", "auto", seq_len=seq, measure_peak=False)
    dtype = info.dtype
    models = [Transformer(load_config(recipe=r, overrides={"model": {"seq_len": seq}}).model) for r in VARIANTS_RECIPES]
    for m in models:  # the attention kernel the trainer picks for this device and dtype
        for a in m.modules():
            if isinstance(a, Attention):
                a.kernel = info.attention
    x = torch.randint(0, 8192, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[], []]
    for i in range(steps + 2):
        for m, t in zip(models, times, strict=True):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            m.zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up steps
                t.append(time.perf_counter() - t0)
    dense, moe = statistics.median(times[0]), statistics.median(times[1])
    return dense, moe, str(dtype).removeprefix("torch.")


VARIANTS_RECIPES = ("tiny", "moe-tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch size")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--data", help="token dataset (default data/stdlib, made by `make demo`)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.steps, args.batch, args.seq, Path(args.out))
        return

    scratch = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    data = dataset(args.data, scratch)
    rows = []
    for name in VARIANTS:
        out = scratch / f"{name}.json"
        subprocess.run([sys.executable, __file__, "--child", name, "--data", data, "--steps", str(args.steps),
                        "--batch", str(args.batch), "--seq", str(args.seq), "--out", str(out)], check=True)
        rows.append(summarise(name, json.loads(out.read_text())))
    import torch

    dense = rows[0]
    d_s, m_s, dtype = interleaved_step_ratio(args.batch, args.seq)
    tokens = args.steps * args.batch * args.seq
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps x {args.batch} x "
          f"{args.seq} = {tokens:,} tokens per run, same data and seed; data {data}")
    print(f"{'run':9s} {'val loss':>9s} {'train loss':>10s} {'tokens/s':>9s} {'step/dense':>10s} {'peak MB':>8s} "
          f"{'load max/mean':>13s} {'(last 5)':>8s} {'dropped':>7s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['name']:9s} {r['val_loss']:9.4f} {r['loss']:10.4f} {r['tokens_per_s']:9.0f} "
              f"{dense['tokens_per_s'] / r['tokens_per_s']:10.3f} {r['peak_mem_mb']:8.0f} "
              f"{r.get('load_max_over_mean', float('nan')):13.3f} {r.get('load_last', float('nan')):8.3f} "
              f"{r.get('moe_dropped', float('nan')):7.3f} "
              f"{r['wall_s']:7.1f}")
    print(f"interleaved fwd+bwd in one process ({dtype}, {args.batch} x {args.seq}): dense {d_s * 1e3:.0f} ms, "
          f"moe {m_s * 1e3:.0f} ms, moe/dense {m_s / d_s:.3f} (target <= 1.3)")
    print("validation loss at each evaluation (tokens, elapsed s, val loss): equal tokens across a row, "
          "equal time by reading the elapsed column")
    for r in rows:
        print(f"  {r['name']:9s} " + "  ".join(f"{t:,}/{s:.0f}s/{v:.3f}" for t, s, v in r["evals"]))


if __name__ == "__main__":
    main()
