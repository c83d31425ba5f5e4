"""Federated training on Flower's simulation engine against centralised training, at the same total tokens.

Rows (all on the same data, model, seed and tokens):
  centralised          one Trainer run of rounds x clients x local_steps steps (val every clients x local_steps)
  fedavg iid           FedAvg, IID partitions
  fedavg / fedprox     Dirichlet(alpha) label skew over source groups, alpha = 0.1 and 1.0
  lora full / lora     full-model vs LoRA-only federation (LoRA rank 8; bytes per round is the point)
  dp eps~8 / eps~1     FedAvg with client-level DP (clip + Gaussian noise), noise solved for the epsilon
  secagg iid / lora    FedAvg through Flower's SecAgg+ (the server sees only the sum), full model and LoRA-only

Prints final validation loss, the loss after each round, bytes per round each way, epsilon, the median
seconds per round (the first round, with its imports and warm-up, left out) and wall time.

    python bench/federated.py                       # ~3-4 minutes on 2 CPU cores
    python bench/federated.py --rounds 10 --clients 8 --dim 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _data import ROOT, cpu_name, dataset

sys.path.insert(0, str(ROOT / "src"))



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default data/stdlib or a small one made here)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--only", help="comma list of row names to run")
    args = ap.parse_args()

    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    from leantrain import api

    scratch = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    data = dataset(args.data, scratch)
    c, r, k = args.clients, args.rounds, args.local_steps
    base = {"model": {"n_layers": 2, "dim": args.dim, "n_heads": 4, "n_kv_heads": 2, "seq_len": 64,
                      "vocab_size": 8192},
            "data": {"path": data}, "train": {"micro_batch_size": 4, "eval_steps": 4, "sample_tokens": 0},
            "optim": {"lr": 3e-3, "warmup_steps": 0}, "precision": {"dtype": "fp32"},
            "log": {"progress": "none"}, "federated": {"clients": c, "rounds": r, "local_steps": k}}

    def cfg(**sections):
        merged = json.loads(json.dumps(base))
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
        return api.load_config(overrides=merged)

    rows = {
        "fedavg iid": {"federated": {"partition": "iid"}},
        "fedavg dir0.1": {"federated": {"partition": "dirichlet", "alpha": 0.1}},
        "fedprox dir0.1": {"federated": {"partition": "dirichlet", "alpha": 0.1, "strategy": "fedprox",
                                         "proximal_mu": 0.1}},
        "fedavg dir1.0": {"federated": {"partition": "dirichlet", "alpha": 1.0}},
        "fedprox dir1.0": {"federated": {"partition": "dirichlet", "alpha": 1.0, "strategy": "fedprox",
                                         "proximal_mu": 0.1}},
        "fedadam iid": {"federated": {"partition": "iid", "strategy": "fedadam", "server_lr": 0.01}},
        "lora full": {"finetune": {"lora_rank": 8}},
        "lora only": {"finetune": {"lora_rank": 8}, "federated": {"lora_only": True}},
        "dp eps~8": {"federated": {"dp_epsilon": 8.0, "dp_clip": 0.5}},
        "dp eps~1": {"federated": {"dp_epsilon": 1.0, "dp_clip": 0.5}},
        "secagg iid": {"federated": {"partition": "iid", "secure_aggregation": True}},
        "secagg lora only": {"finetune": {"lora_rank": 8},
                             "federated": {"lora_only": True, "secure_aggregation": True}},
    }
    only = set(args.only.split(",")) if args.only else None
    print(f"CPU: {cpu_name()}; {c} clients x {r} rounds x {k} local steps, dim {args.dim}, data {data}", flush=True)
    results = []
    if only is None or "centralised" in only:
        t0 = time.perf_counter()
        res = api.train(cfg(train={"steps": r * c * k, "eval_every": c * k}, checkpoint={"every": 0}),
                        scratch / "central")
        curve = [json.loads(line).get("val_loss") for line in (scratch / "central" / "metrics.jsonl").open()]
        results.append({"name": "centralised", "val_loss": res.val_loss, "curve": [v for v in curve if v],
                        "bytes_round": 0, "eps": None, "wall_s": time.perf_counter() - t0, "tokens": res.tokens})
        print(f"centralised: val_loss {res.val_loss:.4f} ({res.tokens:,} tokens)", flush=True)
    for name, over in rows.items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        run = scratch / name.replace(" ", "-").replace("~", "")
        out = api.federate(cfg(**over), run)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        round_s = [x["round_s"] for x in lines[2:]] or [x["round_s"] for x in lines[1:]]
        results.append({"name": name, "val_loss": out["val_loss"], "curve": [x["val_loss"] for x in lines[1:]],
                        "bytes_round": out["bytes_sent"] / r, "bytes_back": out["bytes_received"] / r,
                        "round_s": statistics.median(round_s), "eps": out.get("dp_epsilon"),
                        "noise": out.get("noise_multiplier"), "wall_s": time.perf_counter() - t0,
                        "tokens": out["tokens"]})
        print(f"{name}: val_loss {out['val_loss']:.4f} ({out['tokens']:,} tokens)", flush=True)

    central = next((x["val_loss"] for x in results if x["name"] == "centralised"), None)
    print()
    print("| run | final val loss | vs centralised | val loss per round | MB sent per round | MB back per round "
          "| epsilon (delta 1e-5) | noise mult. | s per round | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in results:
        rel = f"{x['val_loss'] - central:+.3f}" if central is not None else "n/a"
        eps = f"{x['eps']:.2f}" if x["eps"] is not None else "-"
        noise = f"{x['noise']:.2f}" if x.get("noise") else "-"
        curve = " ".join(f"{v:.3f}" for v in x["curve"])
        back = f"{x['bytes_back'] / 1e6:.3f}" if "bytes_back" in x else "0.000"
        per_round = f"{x['round_s']:.2f}" if "round_s" in x else "-"
        print(f"| {x['name']} | {x['val_loss']:.4f} | {rel} | {curve} | {x['bytes_round'] / 1e6:.3f} | {back} "
              f"| {eps} | {noise} | {per_round} | {x['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
