"""Every `leantrain compress` method on one base model, in one table: file size, parameters, decoding tokens/s at
batch 1 and 8 with the KV cache, and validation loss with its delta from the base, all measured in this process
on the same validation windows.

Rows: the base (fp32); PTQ int8 weight-only, int8 dynamic, int4 grouped weight-only (torchao); QAT against PTQ
on equal terms: the base fine-tuned --ft-steps steps in fp32 then PTQ int4, and the base fine-tuned the same
steps with `[quant] qat = "int4"` then `compress --method convert`, both at --qat-group-size (64: coarser
groups than the int4 row's 32, so the gap QAT closes is large enough to measure on a model this small), with
the share of the PTQ gap it recovers; pruning (50% unstructured, 2:4, structured 25%
and 50%), each before and after a short fine-tune through the normal trainer (the unstructured and 2:4
masks held by `[prune]` during it), next to the base fine-tuned for the same steps; and a distilled student of
about half the base's parameters next to the same student trained alone for the same tokens. Pruning and
distillation rows appear when their modules are in this build (leantrain.compress.prune, `[distill]`).

    python bench/compress.py            # ~4 minutes on 2 CPU cores
    python bench/compress.py --quick    # quantization rows only, ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _data import ROOT, cpu_name, dataset, run_overrides

sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from leantrain import api  # noqa: E402
from leantrain.compress.measure import decode_tokens_per_s, val_loss, val_windows, weight_bytes  # noqa: E402

BASE = {"n_layers": 4, "dim": 192, "n_heads": 8, "n_kv_heads": 2, "ffn_dim": 512}
STUDENT = {"n_layers": 3, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 352}
FT = "base + {n}-step fine-tune"
PTQ_FT = "  PTQ int4 g{g} of it"
QAT_FP = "QAT int4 {n}-step fine-tune (fp32 forward)"
QAT_INT4 = "  QAT int4 g{g} (convert)"




def train(name: str, out: Path, ov: dict) -> Path:
    t0 = time.perf_counter()
    result = api.train(api.load_config(overrides=ov), out / name)
    print(f"  trained {name}: {result.step} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return out / name


def compress(src: Path, out: Path, method: str, **kw: object) -> Path:
    t0 = time.perf_counter()
    api.compress(src, out, method, speed_tokens=0, eval_batches=1, **kw)
    print(f"  compressed {out.name} ({method}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def have_pruning() -> bool:
    try:
        from leantrain.compress.prune import apply_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def have_distill() -> bool:
    from leantrain.config import Config

    return hasattr(Config(), "distill")


def file_mb(folder: Path) -> float:
    """Weights file of the newest checkpoint of a run or compress output."""
    latest = (folder / "checkpoints" / "latest").read_text().strip()
    return weight_bytes(folder / "checkpoints" / latest) / 1e6


def measure(rows: list[tuple[str, Path]], windows: list, new_tokens: int, rounds: int) -> list[dict]:
    """Val loss on the same windows, then decode speeds in interleaved rounds (best of `rounds` after a warm-up
    round), so that a slow moment of the machine does not land on one model only."""
    got = []
    for name, folder in rows:
        m = api.load_model(folder).model
        got.append({"name": name, "model": m, "mb": file_mb(folder), "params": sum(p.numel() for p in m.parameters()),
                    "val_loss": val_loss(m, windows), "b1": 0.0, "b8": 0.0})
    for i in range(rounds + 1):
        for r in got:
            b1 = decode_tokens_per_s(r["model"], 1, new_tokens)
            b8 = decode_tokens_per_s(r["model"], 8, new_tokens)
            if i:  # round 0 warms up
                r["b1"], r["b8"] = max(r["b1"], b1), max(r["b8"], b8)
    for r in got:
        del r["model"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default: data/stdlib, else a small one made here)")
    ap.add_argument("--steps", type=int, default=200, help="base training steps")
    ap.add_argument("--ft-steps", type=int, default=40, help="fine-tune steps: QAT, fp32 control, after pruning")
    ap.add_argument("--ft-lr", type=float, default=3e-4, help="fine-tune learning rate")
    ap.add_argument("--qat-group-size", type=int, default=64, help="int4 group size of the QAT vs PTQ rows")
    ap.add_argument("--student-steps", type=int, default=100, help="student steps, with and without a teacher")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per timing")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per model (the best is kept)")
    ap.add_argument("--quick", action="store_true", help="quantization rows only")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    t_start = time.perf_counter()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = dataset(args.data, out)
        ov = run_overrides(data, args.steps, args.seq, args.batch, 3e-3, model=BASE)
        base = train("base", out, ov)
        rows = [("base fp32", base)]
        for method in ("int8", "int8-dynamic", "int4"):
            rows.append((f"PTQ {method}", compress(base, out / method, method)))
        lr, g = args.ft_lr, args.qat_group_size
        base_ft = train("base-ft", out, run_overrides(data, args.ft_steps, args.seq, args.batch, lr,
                                                  train={"init_from": str(base)}))
        qat = train("qat-ft", out, run_overrides(data, args.ft_steps, args.seq, args.batch, lr,
                                             train={"init_from": str(base)}, quant={"qat": "int4", "group_size": g}))
        rows.append((FT.format(n=args.ft_steps), base_ft))
        rows.append((PTQ_FT.format(g=g), compress(base_ft, out / "base-ft-int4", "int4", group_size=g)))
        rows.append((QAT_FP.format(n=args.ft_steps), qat))
        rows.append((QAT_INT4.format(g=g), compress(qat, out / "qat-int4", "convert")))
        if have_pruning() and not args.quick:
            for label, method, opts, hold in [
                    ("50% unstructured", "prune-magnitude", {"sparsity": 0.5}, {"method": "magnitude"}),
                    ("2:4", "prune-2:4", {}, {"method": "2:4"}),
                    ("structured 25%", "prune-structured", {"heads_fraction": 0.25, "channels_fraction": 0.25}, None),
                    ("structured 50%", "prune-structured", {"heads_fraction": 0.5, "channels_fraction": 0.5}, None)]:
                name = label.replace(" ", "-").replace("%", "").replace(":", "")
                pruned = compress(base, out / name, method, options=opts)
                rows.append((label, pruned))
                extra = {"train": {"init_from": str(pruned)}}
                if hold:  # keep the pruned weights at zero while fine-tuning: masks due at once, held after
                    extra["prune"] = {**hold, "sparsity": 0.5, "start_step": 0, "end_step": 1, "every": 1}
                rows.append((f"{label} + {args.ft_steps}-step fine-tune", train(f"{name}-ft", out, run_overrides(
                    data, args.ft_steps, args.seq, args.batch, lr, **extra))))
        if have_distill() and not args.quick:
            rows.append((f"student alone ({args.student_steps} steps)", train("student", out, run_overrides(
                data, args.student_steps, args.seq, args.batch, 3e-3, model=STUDENT))))
            distilled = run_overrides(
                data, args.student_steps, args.seq, args.batch, 3e-3, model=STUDENT,
                distill={"teacher": str(base), "alpha": 0.5, "temperature": 2.0})
            rows.append((f"student distilled ({args.student_steps} steps)", train("student-distilled", out, distilled)))
        windows = val_windows(api.load_config(overrides=ov), 8)
        got = measure(rows, windows, args.new_tokens, args.rounds)
    b = got[0]
    print(f"\n{'model':<44} {'file MB':>8} {'size x':>6} {'params':>10} {'tok/s b1':>9} {'x':>5} {'tok/s b8':>9} "
          f"{'x':>5} {'val loss':>9} {'delta':>8}")
    for r in got:
        print(f"{r['name']:<44} {r['mb']:>8.2f} {b['mb'] / r['mb']:>6.2f} {r['params']:>10,} {r['b1']:>9.0f} "
              f"{r['b1'] / b['b1']:>5.2f} {r['b8']:>9.0f} {r['b8'] / b['b8']:>5.2f} {r['val_loss']:>9.4f} "
              f"{r['val_loss'] - b['val_loss']:>+8.4f}")
    by = {r["name"]: r for r in got}
    g, n = args.qat_group_size, args.ft_steps
    fp, ptq = by[FT.format(n=n)]["val_loss"], by[PTQ_FT.format(g=g)]["val_loss"]
    qat_fp, qat_real = by[QAT_FP.format(n=n)]["val_loss"], by[QAT_INT4.format(g=g)]["val_loss"]
    gap = ptq - fp
    share = (ptq - qat_real) / gap if gap > 0 else float("nan")
    print(f"\nQAT vs PTQ, int4 g{g}, both from the base after {n} fine-tune steps: PTQ int4 costs {gap:+.4f} nats "
          f"over the fp32 fine-tune, QAT int4 {qat_real - fp:+.4f}: QAT recovers {share:.0%} of the PTQ gap "
          f"((PTQ - QAT) / (PTQ - fp32)); the QAT weights lose {qat_real - qat_fp:+.4f} nats to real quantization.")
    students = [r for r in got if r["name"].startswith("student")]
    if len(students) == 2:
        print(f"student/base params {students[0]['params'] / b['params']:.2f}; distilled - alone val loss "
              f"{students[1]['val_loss'] - students[0]['val_loss']:+.4f} (negative: the teacher helped)")
    print(f"val loss: {len(windows)} windows of {args.batch} x {args.seq} tokens; tokens/s: greedy decoding with the "
          f"KV cache, {args.new_tokens} tokens after a 16-token prompt, best of {args.rounds} rounds. "
          f"Total {time.perf_counter() - t_start:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
