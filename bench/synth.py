"""Synthetic data: how much of what a small model writes passes the checks, what constraining costs, and what
validated synthetic data does to training.

1. Validity: a small model is trained on a slice of the stdlib corpus, then `leantrain.synth` draws Python
   candidates (seeded with the slice's function signatures; checks: ast + compile, ruff) and JSON candidates
   for a schema, unconstrained and constrained; prints the share that passes the checks, the share kept after
   curation, and generation tokens/s (constrained / unconstrained is the cost of the mask).
2. Effect on training (skip with --no-training): three models of the same shape trained for the same steps
   (same token budget) on the real slice alone, real + validated synthetic (synthetic.jsonl), and real +
   unvalidated synthetic (every candidate: synthetic.jsonl + rejected.jsonl); val loss on the real held-out
   split of the full dataset.

    python bench/synth.py                      # data/stdlib if prepared, else a small stdlib dataset
    python bench/synth.py --steps 300 --count 512
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import leantrain  # noqa: E402
from _data import cpu_name, dataset, report_ratio, run_overrides  # noqa: E402
from leantrain.corpus.readers import Document  # noqa: E402
from leantrain.tokens.dataset import TokenDataset  # noqa: E402
from leantrain.tokens.prepare import prepare_dataset  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
MODEL = {"n_layers": 2, "dim": 128, "n_heads": 4, "n_kv_heads": 4}


def real_slice(data: str, docs: int) -> list[Document]:
    """The first `docs` documents of the dataset's train split, decoded (the real corpus of this bench)."""
    ds = TokenDataset(data)
    tok = ds.tokenizer()
    out: list[Document] = []
    for shard in ds.shards("train"):
        ends = np.flatnonzero(np.asarray(shard) == ds.eot_id)
        start = 0
        for end in ends.tolist():
            if end > start:
                out.append(Document(f"real-{len(out)}", tok.decode(np.asarray(shard[start:end]).tolist()), "real"))
                if len(out) == docs:
                    return out
            start = end + 1
    return out


def tokens_dataset(docs: list[Document], out: Path, tokenizer: str) -> str:
    prepare_dataset(lambda: iter(docs), out, tokenizer_path=tokenizer, val_fraction=0.05)
    return str(out)


def train(data: str, run_dir: Path, args: argparse.Namespace) -> Path:
    cfg = leantrain.load_config(overrides=run_overrides(data, args.steps, 128, 8, 3e-3, model=dict(MODEL),
                                                         checkpoint={"every": args.steps}))
    leantrain.train(cfg, run_dir)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default data/stdlib, else a small one)")
    ap.add_argument("--real-docs", type=int, default=60, help="documents of the real slice (60)")
    ap.add_argument("--steps", type=int, default=400, help="training steps of every model (400)")
    ap.add_argument("--count", type=int, default=256, help="Python candidates (256)")
    ap.add_argument("--json-count", type=int, default=32, help="JSON candidates, each way (32)")
    ap.add_argument("--no-training", action="store_true", help="validity only")
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        s = Path(scratch)
        data = dataset(args.data, s)
        tokenizer = str(Path(data) / "tokenizer.json")
        real = real_slice(data, args.real_docs)
        real_ds = tokens_dataset(real, s / "real-ds", tokenizer)
        print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}; real slice {len(real)} docs of {data}; "
              f"model {MODEL}, seq 128, batch 8, {args.steps} steps", flush=True)
        gen_run = train(real_ds, s / "run-real", args)
        val_real = leantrain.evaluate(gen_run, data, split="val")

        py = leantrain.synth(gen_run, s / "py", kind="python", count=args.count, ruff=True, max_new_tokens=128)
        free = leantrain.synth(gen_run, s / "json-free", kind="json", count=args.json_count, json_schema=SCHEMA,
                               constrain=False, max_new_tokens=48, temperature=1.0)
        con = leantrain.synth(gen_run, s / "json-con", kind="json", count=args.json_count, json_schema=SCHEMA,
                              max_new_tokens=48, temperature=1.0)
        print(f"\n{'kind':<8} {'decoding':<12} {'candidates':>10} {'pass checks':>11} {'kept':>6} {'tokens/s':>9}")
        for kind, mode, r in (("python", "free", py), ("json", "free", free), ("json", "constrained", con)):
            syn = r.card["synthetic"]
            print(f"{kind:<8} {mode:<12} {r.generated:>10} {syn['acceptance']['checks']:>11.1%} "
                  f"{syn['acceptance']['overall']:>6.1%} {r.manifest['generation']['tokens_per_s']:>9.0f}")
        checks = " ".join(f"{c['check']} " + ("-" if c["acceptance"] is None else f"{c['acceptance']:.1%}")
                      for c in py.card["synthetic"]["checks"])  # None: no candidate got as far as this check
        print(f"python checks: {checks}")
        ratio = con.manifest["generation"]["tokens_per_s"] / free.manifest["generation"]["tokens_per_s"]
        print(f"JSON valid: free {free.card['synthetic']['acceptance']['checks']:.1%} -> constrained "
              f"{con.card['synthetic']['acceptance']['checks']:.1%}; tokens/s constrained / free {ratio:.2f}")
        report_ratio("constrained_tokens_per_s", ratio, "unconstrained JSON decoding",
                     valid_free=free.card["synthetic"]["acceptance"]["checks"],
                     valid_constrained=con.card["synthetic"]["acceptance"]["checks"],
                     python_valid=py.card["synthetic"]["acceptance"]["checks"])
        if not args.no_training:
            def synthetic(*names: str) -> list[Document]:
                return [Document(r["id"], r["text"], "synthetic") for n in names
                        for r in map(json.loads, (s / "py" / n).read_text().splitlines()) if r["text"].strip()]

            validated, unvalidated = synthetic("synthetic.jsonl"), synthetic("synthetic.jsonl", "rejected.jsonl")
            rows = [("real alone", len(real), 0, val_real)]
            for name, extra in (("real + validated", validated), ("real + unvalidated", unvalidated)):
                data_dir = tokens_dataset(real + extra, s / f"ds-{len(rows)}", tokenizer)
                run = train(data_dir, s / f"run-{len(rows)}", args)
                rows.append((name, len(real), len(extra), leantrain.evaluate(run, data, split="val")))
            print(f"\n{'training data':<20} {'real docs':>9} {'synthetic':>9} {'val loss (real)':>15} {'vs real':>8}")
            for name, n_real, n_syn, loss in rows:
                print(f"{name:<20} {n_real:>9} {n_syn:>9} {loss:>15.4f} {loss / val_real:>8.3f}")
            report_ratio("val_loss_real_plus_validated", rows[1][3] / val_real, "real alone", better="lower")
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
