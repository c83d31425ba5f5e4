"""KV-cache generation against recomputing the whole context for every token.

Builds the tiny recipe's model (random weights: speed does not depend on them), warms both paths
up, then times `generate` of N new tokens (default 200, greedy) with use_cache=False and with the
cache, alternating, `--repeats` times each, and prints the median seconds, tokens/s, the ratio
cached / uncached and whether the two produced the same token ids. Model build and warm-up are
excluded from the times.

    python bench/generate.py                 # tiny recipe, 200 tokens, fp32
    python bench/generate.py --dtype bf16    # under bf16 autocast, as the end-of-run sample on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from leantrain.config import load_config
from leantrain.model import Transformer, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=4, help="length of the (random) prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    args = ap.parse_args()

    cfg = load_config(recipe=args.recipe).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,)).tolist()
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext())

    def run(use_cache: bool, n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with amp:
            out = generate(model, prompt, n, temperature=args.temperature, seed=0, use_cache=use_cache)
        return time.perf_counter() - t0, out

    run(False, 8)  # warm-up: first-call allocations and kernel selection, excluded
    run(True, 8)
    times: dict[bool, list[float]] = {False: [], True: []}
    outs: dict[bool, list[int]] = {}
    for _ in range(args.repeats):
        for use_cache in (False, True):
            dt, outs[use_cache] = run(use_cache, args.tokens)
            times[use_cache].append(dt)
    print(f"model: recipe {args.recipe} ({cfg.n_layers} layers, dim {cfg.dim}, seq_len {cfg.seq_len}, "
          f"vocab {cfg.vocab_size}), {args.dtype}, {torch.get_num_threads()} threads, "
          f"prompt {args.prompt_tokens} tokens, {args.tokens} new tokens, temperature {args.temperature}, "
          f"median of {args.repeats}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for use_cache, name in ((False, "uncached"), (True, "cached")):
        runs = ", ".join(f"{t:.3f}" for t in times[use_cache])
        print(f"{name:9} {med[use_cache]:7.3f} s  {len(outs[use_cache]) / med[use_cache]:8.1f} tokens/s  ({runs})")
    print(f"ratio cached / uncached: {med[True] / med[False]:.3f} ({med[False] / med[True]:.1f}x faster); "
          f"same token ids: {outs[True] == outs[False]}")


if __name__ == "__main__":
    main()
