"""leantrain's KV-cache generation against Hugging Face transformers' `generate` on the exported model.

Trains the tiny recipe's model for 2 steps (speed does not depend on the weights), exports it
(`api.export`, HF format) and loads both: leantrain's Transformer from the run, transformers'
AutoModelForCausalLM from the export, in the same dtype (fp32, then bf16 weights). Prompts are token ids
cut from the validation split, all of one length. Greedy decoding of exactly --tokens new tokens:

  batch 1: `leantrain.model.generate` (one prompt, the call `leantrain generate` makes) vs `model.generate`
  batch 8: leantrain's batched decoder (`serve.engine.Engine` in this process, the server's continuous
           batching without HTTP) vs `model.generate` on the 8 prompts as one batch (no padding needed)

Each cell is run --repeats times, alternating leantrain and transformers, after a warm-up; it prints the
median tokens/s (new tokens of all rows / wall time, prefill included), the ratio leantrain / transformers
and whether the greedy token ids are identical row by row.

    python bench/generate_vs_hf.py                       # 32-token prompts, 64 new tokens, fp32 and bf16
    python bench/generate_vs_hf.py --tokens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import cpu_name, dataset, report_ratio  # noqa: E402


def engine_generate(engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Greedy continuations of `prompts`, all submitted at once to a started Engine; waits for the last."""
    from leantrain.serve.engine import Sampling

    done = threading.Semaphore(0)
    out: list[list[int]] = [[] for _ in prompts]

    def sink_for(i: int):
        def sink(token: int | None, reason: str | None) -> None:
            if token is not None:
                out[i].append(token)
            if reason is not None:
                done.release()
        return sink

    for i, p in enumerate(prompts):
        engine.submit(p, Sampling(tokens, temperature=0.0), sink_for(i))
    for _ in prompts:
        done.acquire()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default data/stdlib, else a small one in a temp dir)")
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per row (64)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="leantrain-genhf-") as scratch:
        bench(args, Path(scratch))


def bench(args: argparse.Namespace, scratch: Path) -> None:
    from transformers import AutoModelForCausalLM

    from leantrain import api
    from leantrain.model.generate import generate
    from leantrain.serve.engine import Engine
    from leantrain.tokens.dataset import TokenDataset

    data = dataset(args.data, scratch)
    cfg = api.load_config(recipe=args.recipe, overrides={
        "data.path": data, "train.steps": 2, "train.eval_every": 2, "train.eval_steps": 1, "train.sample_tokens": 0,
        "checkpoint.every": 2, "log.progress": "none", "precision.dtype": "fp32"})
    run, hf_dir = scratch / "run", scratch / "hf"
    print(f"training {args.recipe} for 2 steps and exporting it (speed does not depend on the weights) ...",
          flush=True)
    api.train(cfg, run)
    api.export(run, hf_dir, format="hf", dtype="fp32")
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    val = np.concatenate([np.asarray(s) for s in TokenDataset(data).shards("val")])
    starts = rng.integers(0, len(val) - args.prompt_tokens, max(batches))
    prompts = [val[s:s + args.prompt_tokens].astype(np.int64).tolist() for s in starts]
    kwargs = {"do_sample": False, "max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "pad_token_id": 0}
    m = cfg.model
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; model: {args.recipe} "
          f"({m.n_layers} layers, dim {m.dim}, vocab {m.vocab_size}); prompt {args.prompt_tokens} tokens, "
          f"{args.tokens} new tokens, greedy; median of {args.repeats}")
    print("| dtype | batch | leantrain | leantrain tok/s | transformers tok/s | ratio | same greedy ids |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        ours = api.load_model(run).model.to(dtype).eval()
        theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        engine = Engine(ours, max_batch=max(batches))
        engine.start()
        try:
            for batch in batches:
                rows = prompts[:batch]
                ids = torch.tensor(rows, dtype=torch.long)

                def run_ours(ours=ours, rows=rows, engine=engine) -> list[list[int]]:
                    if len(rows) == 1:
                        return [generate(ours, rows[0], args.tokens, temperature=0)]
                    return engine_generate(engine, rows, args.tokens)

                def run_theirs(theirs=theirs, ids=ids) -> list[list[int]]:
                    with torch.no_grad():
                        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                    return out[:, ids.size(1):].tolist()

                run_ours(), run_theirs()  # warm-up: first-call allocations and kernel choice, excluded
                times: dict[str, list[float]] = {"ours": [], "theirs": []}
                outs = {}
                for _ in range(args.repeats):
                    for who, fn in (("ours", run_ours), ("theirs", run_theirs)):
                        t0 = time.perf_counter()
                        outs[who] = fn()
                        times[who].append(time.perf_counter() - t0)
                made = batch * args.tokens
                rate = {who: made / statistics.median(t) for who, t in times.items()}
                same = sum(a == b for a, b in zip(outs["ours"], outs["theirs"], strict=True))
                how = "generate" if batch == 1 else "serve engine"
                print(f"| {name} | {batch} | {how} | {rate['ours']:.0f} | {rate['theirs']:.0f} | "
                      f"{rate['ours'] / rate['theirs']:.2f}x | {same}/{batch} rows |", flush=True)
                report_ratio(f"{name} batch {batch} tokens/s vs transformers generate", rate["ours"] / rate["theirs"],
                             "transformers generate", tokens_per_s=rate["ours"], hf_tokens_per_s=rate["theirs"])
        finally:
            engine.close()


if __name__ == "__main__":
    main()
