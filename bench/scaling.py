"""Data-parallel scaling on this machine: the same global batch as 1 process and as 2 torchrun ranks.

Trains the same config (same global batch, same steps) three ways, each in fresh processes: one
process with all the threads (`--threads`), 2 ranks with DDP and 2 ranks with FSDP2 (each rank
`--threads / 2` threads). Prints tokens/s over the steps after warm-up and the ratio against the
single process. On one CPU host the ranks share the same cores and memory bandwidth, so a ratio near
1 is the ceiling there; on GPUs each rank brings its own device and the ratio measures the
communication cost. The modes run in alternating order for `--rounds` rounds so a machine that
speeds up or slows down during the benchmark does not favour one of them.

    python bench/scaling.py                      # tiny recipe, 30 steps, 2 threads
    python bench/scaling.py --tp                 # + 2-rank tensor parallel and 4-rank FSDP2 x TP rows
    python bench/scaling.py --recipe small --steps 20 --rounds 2
    python bench/scaling.py --ep                 # moe-tiny: + 2-rank FSDP2 with expert parallel (ep = 2)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from checkpoint_overhead import dataset  # noqa: E402

MODES = {
    "1 process": (1, {}),
    "2 ranks DDP": (2, {"parallel.dp_replicate": 2, "parallel.dp_shard": 1}),
    "2 ranks FSDP2": (2, {"parallel.dp_shard": 2}),
    "2 ranks TP": (2, {"parallel.tp": 2, "parallel.dp_shard": 1}),
    "4 ranks FSDP2xTP": (4, {"parallel.tp": 2, "parallel.dp_shard": 2}),
    "2 ranks FSDP2+EP2": (2, {"parallel.dp_shard": 2, "parallel.ep": 2}),
}
TP_MODES = ("2 ranks TP", "4 ranks FSDP2xTP")
EP_MODES = ("2 ranks FSDP2+EP2",)


def run(mode: str, args: argparse.Namespace, data: str, scratch: Path, i: int) -> float:
    ranks, extra = MODES[mode]
    dp = ranks // extra.get("parallel.tp", 1)  # tensor-parallel ranks share their data-parallel group's batch
    run_dir = scratch / f"run-{i}"
    over = {"data.path": data, "train.steps": args.steps, "train.threads": max(1, args.threads // ranks),
            "train.micro_batch_size": args.global_batch // dp, "model.tie_embeddings": args.tie,
            "train.eval_every": 0, "train.eval_steps": 1,
            "train.sample_tokens": 0, "checkpoint.every": 0, "log.every": 1, "log.progress": "none", **extra}
    cli = ["-m", "leantrain.cli", "train", "--recipe", args.recipe, "--run-dir", str(run_dir),
           *[f"--{k}={v}" for k, v in over.items()]]
    if ranks == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *cli]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r["step"] > args.warmup]
    return statistics.median(r["tokens_per_s"] for r in timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per step over all ranks")
    p.add_argument("--threads", type=int, default=2, help="threads of the single process; ranks share them")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--tp", action="store_true", help="also tensor parallel (2 ranks) and FSDP2 x TP (4 ranks); "
                   "every mode then runs with untied embeddings, which tensor parallel needs")
    p.add_argument("--ep", action="store_true", help="a mixture-of-experts recipe (moe-tiny unless --recipe names "
                   "another) and a 2-rank FSDP2 + expert-parallel row (ep = 2); no tensor-parallel rows")
    args = p.parse_args()
    args.tie = "false" if args.tp else "true"
    if args.ep:
        args.tp, args.recipe = False, "moe-tiny" if args.recipe == "tiny" else args.recipe
    if not args.tp:
        for mode in TP_MODES:
            del MODES[mode]
    if not args.ep:
        for mode in EP_MODES:
            del MODES[mode]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = dataset(args.data, scratch)
        results: dict[str, list[float]] = {m: [] for m in MODES}
        order = list(MODES)
        for r in range(args.rounds):
            for j, mode in enumerate(order if r % 2 == 0 else order[::-1]):
                results[mode].append(run(mode, args, data, scratch, r * len(MODES) + j))
                print(f"round {r + 1} {mode}: {results[mode][-1]:,.0f} tok/s", flush=True)
    base = statistics.median(results["1 process"])
    print(f"\n{args.recipe}, global batch {args.global_batch}, {args.steps} steps ({args.warmup} warm-up), "
          f"{args.threads} threads in all")
    for mode, values in results.items():
        tps = statistics.median(values)
        print(f"{mode:>17}: {tps:10,.0f} tok/s   ratio {tps / base:.2f}")


if __name__ == "__main__":
    main()
