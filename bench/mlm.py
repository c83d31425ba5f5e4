"""Masked language modelling after a tiny budget: masked-token accuracy on held-out text, and what MLM costs.

One process, three real training runs through the normal trainer on the same data, model shape, seed and steps:

1. mlm, span 3: model.objective = mlm with the defaults (15% of the tokens, spans of mean length 3).
2. mlm, span 1: the same with single-token masks (BERT's layout).
3. causal: the same model as a decoder, the tokens/s baseline.

For each MLM run, `leantrain.api.evaluate_masked` scores the masked tokens of --eval-batches validation
windows (held-out documents; the masks are fixed, the same for every run): masked cross-entropy and accuracy,
next to two baselines on the same masked positions, measured here: the untrained model (chance) and always
answering the commonest token of the training split (unigram). Printed: tokens/s (ratio to causal), masked
loss, masked accuracy and its ratio to the unigram baseline.

    python bench/mlm.py          # ~1.5 minutes on 2 CPU cores (data/stdlib, or a small stdlib dataset)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _data import ROOT, cpu_name, dataset, report_ratio, run_overrides

sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from leantrain import api  # noqa: E402
from leantrain.config import DataConfig  # noqa: E402
from leantrain.tokens.dataset import TokenDataset  # noqa: E402
from leantrain.tokens.loader import val_batches  # noqa: E402
from leantrain.tokens.masking import MASK, SpanMasker  # noqa: E402

MODEL = {"n_layers": 4, "dim": 128, "n_heads": 4, "n_kv_heads": 2}


def unigram_accuracy(data: str, mask_id: int, rate: float, span: int, seq: int, batch: int, batches: int) -> float:
    """Accuracy of always answering the training split's commonest token, on evaluate_masked's masked positions."""
    ds = TokenDataset(data)
    counts = sum(np.bincount(np.asarray(s), minlength=ds.vocab_size) for s in ds.shards("train"))
    windows = SpanMasker(mask_id, ds.vocab_size, rate, span, seed=0).val_batches(
        val_batches(ds.shards("val"), seq, batch, batches))
    labels = torch.cat([y[y != -100] for _, y in windows])
    return (labels == int(np.argmax(counts))).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default: data/stdlib, else a small one made here)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(args.data, Path(tmp))
        vocab = TokenDataset(data).vocab_size
        model = {**MODEL, "vocab_size": -(-(vocab + 1) // 64) * 64}  # room for <|mask|>, a multiple of 64
        print(f"MLM bench · {cpu_name()} · {torch.get_num_threads()} threads · {args.steps} steps x {args.batch} x "
              f"{args.seq} tokens · model {MODEL} · data {data}", flush=True)
        rows = {}
        for name, objective, span in (("mlm, span 3", "mlm", 3), ("mlm, span 1", "mlm", 1), ("causal", "causal", 0)):
            ov = run_overrides(data, args.steps, args.seq, args.batch, args.lr, model={**model, "objective": objective})
            ov["data"].update({"mask_span": span} if span else {})
            run = Path(tmp) / name.replace(", ", "-").replace(" ", "")
            result = api.train(api.load_config(overrides=ov), run)
            row = {"tokens_per_s": result.metrics["tokens_per_s"]}
            if objective == "mlm":
                scores = api.evaluate_masked(run, batch_size=args.batch, batches=args.eval_batches)
                untrained = api.load_model(run)
                torch.manual_seed(0)
                untrained.model.init_weights()  # the same shape at its step-0 weights: the chance baseline
                chance = api.evaluate_masked(untrained, batch_size=args.batch, batches=args.eval_batches)
                mask_id = untrained.tokenizer.token_to_id(MASK)
                row |= {**scores, "chance": chance["masked_accuracy"],
                        "unigram": unigram_accuracy(data, mask_id, DataConfig.mask_rate, span, args.seq, args.batch,
                                                    args.eval_batches)}
            rows[name] = row
            print(f"  trained {name} in {time.perf_counter() - t_start:.0f} s", flush=True)
    causal = rows["causal"]["tokens_per_s"]
    print("\n| run | tokens/s | vs causal | masked loss | masked acc | chance | unigram | acc / unigram |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        if "masked_accuracy" in r:
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / causal:.2f}x | {r['loss']:.3f} | "
                  f"{r['masked_accuracy'] * 100:.1f}% | {r['chance'] * 100:.1f}% | {r['unigram'] * 100:.1f}% | "
                  f"{r['masked_accuracy'] / r['unigram']:.2f}x |")
        else:
            print(f"| {name} | {r['tokens_per_s']:,.0f} | 1.00x | - | - | - | - | - |")
    print(f"\n{rows['mlm, span 3']['masked_tokens']} masked validation tokens per run; "
          f"whole bench {time.perf_counter() - t_start:.0f} s")
    best = rows["mlm, span 3"]
    report_ratio("masked accuracy vs unigram (span 3)", best["masked_accuracy"] / best["unigram"], "unigram",
                 masked_accuracy=best["masked_accuracy"], tokens_per_s=best["tokens_per_s"])


if __name__ == "__main__":
    main()
