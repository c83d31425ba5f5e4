"""Structured pruning (+ fine-tune recovery) and knowledge distillation, measured on one base model.

One process, real training runs through the normal trainer on the same data and validation windows:

1. base: a GQA Llama model (8 query heads over 2 kv heads) trained for --steps steps; it is also the teacher.
2. `compress --method prune-structured` at 25% and 50% (heads and MLP channels), then a short fine-tune of
   each pruned folder through `train --init-from` (--ft-steps), next to the base fine-tuned for the same steps.
   Printed: parameters (all, and of the blocks), val loss, decode tokens/s at batch 1 (KV cache) and
   forward tokens/s at batch 8, each as a ratio to the base measured in the same process.
3. distillation: a student of about half the teacher's parameters trained --student-steps steps with
   `--distill.teacher` (T = 1, alpha = 0.5) and the same student trained without one, same seed, same batches.

    python bench/prune_distill.py          # ~3-4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from _data import ROOT, dataset, run_overrides

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from leantrain import api  # noqa: E402
from leantrain.model.generate import generate  # noqa: E402
from leantrain.model.sparsity import prunable_weights  # noqa: E402

TEACHER = {"n_layers": 4, "dim": 192, "n_heads": 8, "n_kv_heads": 2, "ffn_dim": 512}
STUDENT = {"n_layers": 3, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 352}



def overrides10(*args, **kw) -> dict:
    """run_overrides logging every 10 steps."""
    return run_overrides(*args, log_every=10, **kw)


def train(name: str, out: Path, ov: dict) -> tuple[Path, float]:
    run = out / name
    t0 = time.perf_counter()
    result = api.train(api.load_config(overrides=ov), run)
    print(f"  trained {name}: {result.step} steps in {time.perf_counter() - t0:.0f} s, val loss {result.val_loss:.4f}",
          flush=True)
    return run, result.val_loss


@torch.no_grad()
def speed(model: torch.nn.Module, seq: int, new_tokens: int = 64) -> tuple[float, float]:
    """(decode tokens/s at batch 1 with the KV cache, forward tokens/s at batch 8) of one timed round."""
    prompt = list(range(1, 9))
    x = torch.randint(0, 8192, (8, seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    generate(model, prompt, new_tokens, temperature=0)
    decode = new_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    model(x)
    return decode, x.numel() / (time.perf_counter() - t0)


def measure(runs: list[tuple[str, Path]], seq: int, rounds: int) -> list[dict]:
    """Val loss of every model, then their speeds in interleaved rounds (best of `rounds`, after a warm-up
    round), so a slow moment of the machine does not land on one model."""
    rows = []
    for name, run in runs:
        m = api.load_model(run)
        rows.append({"name": name, "model": m.model.eval(), "params": sum(p.numel() for p in m.model.parameters()),
                     "block_params": sum(w.numel() for w in prunable_weights(m.model).values()),
                     "val_loss": api.evaluate(m), "decode_tps": 0.0, "fwd_tps": 0.0})
    for i in range(rounds + 1):
        for r in rows:
            decode, fwd = speed(r["model"], seq)
            if i:  # round 0 warms up
                r["decode_tps"], r["fwd_tps"] = max(r["decode_tps"], decode), max(r["fwd_tps"], fwd)
    for r in rows:
        del r["model"]
        r["decode_x"], r["fwd_x"] = r["decode_tps"] / rows[0]["decode_tps"], r["fwd_tps"] / rows[0]["fwd_tps"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default: data/stdlib, else a small one made here)")
    ap.add_argument("--steps", type=int, default=300, help="base / teacher training steps")
    ap.add_argument("--ft-steps", type=int, default=40, help="fine-tune steps after pruning")
    ap.add_argument("--student-steps", type=int, default=200, help="student steps, with and without a teacher")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4, help="timed speed rounds per model (best is kept)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = dataset(args.data, out)
        print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
              f"torch {torch.__version__}", flush=True)
        base_run, _ = train("base", out, overrides10(data, args.steps, args.seq, args.batch, 3e-3, model=TEACHER))
        runs = [("base", base_run)]
        lr, ft = 3e-4, {"seed": 8}  # about the base's final lr; another seed: batches the base saw less recently
        run, _ = train("base-ft", out, overrides10(data, args.ft_steps, args.seq, args.batch, lr,
                                                 train={"init_from": str(base_run), **ft}))
        runs.append((f"base + {args.ft_steps}-step fine-tune", run))
        for frac in (0.25, 0.5):
            pruned = out / f"p{int(frac * 100)}"
            api.compress(base_run, pruned, "prune-structured", options={"heads_fraction": frac,
                                                                        "channels_fraction": frac}, speed_tokens=0)
            runs.append((f"structured {int(frac * 100)}%", pruned))
            run, _ = train(f"p{int(frac * 100)}-ft", out, overrides10(data, args.ft_steps, args.seq, args.batch, lr,
                                                                    train={"init_from": str(pruned), **ft}))
            runs.append((f"structured {int(frac * 100)}% + {args.ft_steps}-step fine-tune", run))
        plain, _ = train("student", out, overrides10(data, args.student_steps, args.seq, args.batch, 3e-3,
                                                   model=STUDENT))
        runs.append((f"student alone ({args.student_steps} steps)", plain))
        t0 = time.perf_counter()
        distilled, _ = train("student-distilled", out, overrides10(
            data, args.student_steps, args.seq, args.batch, 3e-3, model=STUDENT,
            distill={"teacher": str(base_run), "alpha": 0.5, "temperature": 1.0}))
        runs.append((f"student distilled ({args.student_steps} steps)", distilled))
        distill_s = time.perf_counter() - t0
        rows = measure(runs, args.seq, args.rounds)
        base = rows[0]
    print(f"\n{'model':<40} {'params':>9} {'blocks':>9} {'val loss':>9} {'delta':>7} {'decode b1':>10} "
          f"{'x':>5} {'fwd b8':>9} {'x':>5}")
    for r in rows:
        print(f"{r['name']:<40} {r['params']:>9,} {r['block_params']:>9,} {r['val_loss']:>9.4f} "
              f"{r['val_loss'] - base['val_loss']:>+7.3f} {r['decode_tps']:>10.0f} {r.get('decode_x', 1.0):>5.2f} "
              f"{r['fwd_tps']:>9.0f} {r.get('fwd_x', 1.0):>5.2f}")
    student, dist = rows[-2], rows[-1]
    print(f"\nstudent/teacher params: {student['params'] / base['params']:.2f}; distilled - plain student val loss: "
          f"{dist['val_loss'] - student['val_loss']:+.4f} (negative: the teacher helped); distilled run "
          f"{distill_s:.0f} s. Total {time.perf_counter() - t_start:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
