"""Large batches: LAMB keeps the loss curve stable at 8x the batch where AdamW at the scaled lr does not.

The usual recipe for an 8x larger batch is to scale the lr with it (linearly: 8x). AdamW's step is
the same size for every tensor, so at 8x the lr the tensors whose weights are small against that step
(here: all of them, initialised at std 0.02) jump about and the loss spikes; LAMB rescales each
tensor's step by ||w|| / ||update||, so every tensor moves by the same fraction of its size.

A small model (2 layers, dim 128, seq 128, on data/stdlib) so it runs in a few minutes on 2 CPU cores;
short warmup (5 steps) and the guard off, so instability shows instead of being skipped:

    python bench/large_batch.py                      # adamw at 1x, adamw and lamb at 8x
    python bench/large_batch.py --steps 80 --scale 16

Per run: the final training and val loss, the largest rise of the training loss above its running
minimum after warmup (a spike), and how many steps rose more than 10% above that minimum.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run(name: str, optim: dict, batch: int, args: argparse.Namespace, tmp: Path) -> dict:
    from leantrain.config import load_config
    from leantrain.train.trainer import Trainer

    cfg = load_config(overrides={
        "model": {"n_layers": 2, "dim": 128, "n_heads": 4, "n_kv_heads": 4, "seq_len": 128, "vocab_size": 8192},
        "data": {"path": args.data},
        "train": {"steps": args.steps, "micro_batch_size": batch, "seed": args.seed, "eval_every": 0,
                  "eval_steps": 4, "sample_tokens": 0},
        "optim": {"warmup_steps": args.warmup, "schedule": "cosine", **optim},
        "guard": {"policy": "off"},
        "checkpoint": {"every": 0},
        "log": {"every": 1, "progress": "none", "grad_health_every": 0},
    })
    run_dir = tmp / name.replace(" ", "-")
    t0 = time.perf_counter()
    summary = Trainer(cfg, run_dir, resume=False).fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    best, rise, spikes = math.inf, 0.0, 0
    for i, loss in enumerate(losses):
        if i >= args.warmup and math.isfinite(best):
            rise = max(rise, loss - best) if math.isfinite(loss) else math.inf
            spikes += not math.isfinite(loss) or loss > 1.1 * best
        if math.isfinite(loss):
            best = min(best, loss)
    return {"name": name, "batch": batch, "lr": optim["lr"], "final_loss": losses[-1], "val_loss": summary["val_loss"],
            "max_rise": rise, "spikes": spikes, "losses": losses, "wall_s": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="steps of every run (60)")
    p.add_argument("--batch", type=int, default=4, help="the small batch, sequences of 128 tokens (4)")
    p.add_argument("--scale", type=int, default=8, help="how many times larger the large batch is (8)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's lr at the small batch (3e-3)")
    p.add_argument("--lamb-lr", type=float, default=None, help="LAMB's lr at the large batch (default: the scaled lr)")
    p.add_argument("--warmup", type=int, default=5, help="warmup steps (5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--json", help="also write the runs to this file")
    args = p.parse_args()

    big, scaled = args.batch * args.scale, args.lr * args.scale
    plan = [
        (f"adamw {args.batch}", {"name": "adamw", "lr": args.lr}, args.batch),
        (f"adamw {big}", {"name": "adamw", "lr": scaled}, big),
        (f"lamb {big}", {"name": "lamb", "lr": args.lamb_lr or scaled}, big),
    ]
    results = []
    with tempfile.TemporaryDirectory(prefix="large-batch-") as tmp:
        for name, optim, batch in plan:
            results.append(run(name, optim, batch, args, Path(tmp)))
            print(f"  {name}: done in {results[-1]['wall_s']:.0f} s", flush=True)
    print(f"\n{args.steps} steps, warmup {args.warmup}, cosine; lr scaled linearly with the batch "
          f"({args.lr:g} x {args.scale} = {scaled:g})")
    print(f"{'run':12} {'batch':>5} {'lr':>8} {'final loss':>10} {'val loss':>9} {'max rise':>9} {'spikes':>6}  "
          "loss every 10 steps")
    for r in results:
        curve = " ".join(f"{x:.2f}" for x in r["losses"][9::10])
        print(f"{r['name']:12} {r['batch']:>5} {r['lr']:>8.3g} {r['final_loss']:>10.4f} {r['val_loss']:>9.4f} "
              f"{r['max_rise']:>9.3f} {r['spikes']:>6}  {curve}")
    print("max rise: largest training-loss rise above its running minimum after warmup; spikes: steps more than "
          "10% above it")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
