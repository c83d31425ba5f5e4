"""One prepared GPU check: a ~1B-parameter Llama-shaped model in bf16 and fp8, in under 5 minutes.

Checks that a training step runs and its loss is finite, then times steps and prints tokens/s,
MFU (against the table peak in leantrain.device) and peak memory per precision, and the
fp8/bf16 speed ratio. fp8 uses torchao's float8 training (`pip install torchao`) on GPUs with
compute capability >= 8.9 and is skipped cleanly elsewhere.

    python bench/gpu_check.py                  # bf16 and fp8, compiled, 10 timed steps each
    python bench/gpu_check.py --no-compile --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leantrain.config import ModelConfig, OptimConfig
from leantrain.device import peak_flops
from leantrain.model import Transformer, flops_per_token, param_count
from leantrain.train.optim import build_optimizer

ONE_B = ModelConfig(n_layers=16, dim=2048, n_heads=16, n_kv_heads=8, seq_len=2048, vocab_size=32768,
                    ffn_dim=5632, tie_embeddings=False)


def run(precision: str, args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ONE_B)
    if precision == "fp8":
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError:
            return {"skipped": "torchao is not installed"}
        if torch.cuda.get_device_capability() < (8, 9):
            return {"skipped": "fp8 needs compute capability >= 8.9"}
        # every block linear; the output head stays bf16 (its shape and accuracy are sensitive)
        convert_to_float8_training(model, module_filter_fn=lambda m, name: name != "output")
    step_model = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, OptimConfig(lr=1e-4), device)
    x = torch.randint(0, ONE_B.vocab_size, (args.batch, ONE_B.seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    if not torch.isfinite(loss):
        return {"error": f"non-finite loss {loss.item()}"}
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tps = args.batch * ONE_B.seq_len / dt
    peak, source = peak_flops(device, torch.bfloat16)
    return {"tokens_per_s": tps, "mfu": tps * flops_per_token(ONE_B) / peak, "peak_source": source,
            "step_s": dt, "warmup_s": warm_s, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--json", help="write results here too")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs on a GPU machine")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}: {param_count(ONE_B) / 1e9:.2f}B params, "
          f"batch {args.batch} x {ONE_B.seq_len}, compile={args.compile}")
    results = {}
    for precision in ("bf16", "fp8"):
        r = run(precision, args)
        results[precision] = r
        torch.cuda.empty_cache()
        if "tokens_per_s" in r:
            print(f"  {precision}: {r['tokens_per_s']:,.0f} tok/s  MFU {r['mfu'] * 100:.1f}%  "
                  f"peak mem {r['peak_mem_gib']:.1f} GiB  step {r['step_s'] * 1e3:.0f} ms  loss {r['loss']:.3f}")
        else:
            print(f"  {precision}: {r}")
    if "tokens_per_s" in results["bf16"] and "tokens_per_s" in results.get("fp8", {}):
        print(f"  fp8 / bf16 tokens/s: {results['fp8']['tokens_per_s'] / results['bf16']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
