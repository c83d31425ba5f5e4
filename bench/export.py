"""Exported models against leantrain: ONNX fp32, ONNX int8 (dynamic quantization) and GGUF sizes.

Exports one trained run (--run, or a fresh tiny-recipe run of --steps steps on data/stdlib) as ONNX fp32 and
ONNX int8, then prints per model: file size, greedy decoding tokens/s at batch 1 and batch 8 (KV cache,
--tokens new tokens after a --prompt-tokens prompt, median of --repeats, warm-up excluded), val loss on the
same windows, and the ratios to leantrain (PyTorch eager with its KV cache, the same greedy loop batched).
Also checks that ONNX fp32 greedy text equals leantrain's, and writes GGUF f32 / f16 / q8_0 and prints their
sizes; with llama-cpp-python installed (--llama-cpp), it decodes the f32 GGUF with llama.cpp and compares its
greedy text with leantrain's (the check CI cannot run: there is no llama-cpp-python wheel for it).

    python bench/export.py --run runs/tiny-XXXX          # an existing run
    python bench/export.py --steps 100                   # train the tiny recipe first (~1-2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import dataset  # noqa: E402
from leantrain import api  # noqa: E402
from leantrain.device import cpu_model  # noqa: E402
from leantrain.export.onnx_runtime import OnnxLM  # noqa: E402
from leantrain.model.generate import generate  # noqa: E402
from leantrain.tokens.dataset import TokenDataset  # noqa: E402
from leantrain.tokens.loader import val_batches  # noqa: E402
from leantrain.train.runs import load_trained  # noqa: E402


@torch.no_grad()
def torch_greedy(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    """leantrain's cached greedy decoding for a batch of equal-length prompts (generate() takes one prompt)."""
    cache = model.new_cache()
    ids, out = prompts, []
    for _ in range(n):
        nxt = model(ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = nxt
    return torch.cat(out, 1).tolist()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a trained run directory (default: train the tiny recipe for --steps)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--data", help="token dataset (default data/stdlib, else a small one)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--llama-cpp", action="store_true", help="also decode the f32 GGUF with llama-cpp-python")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-export-"))
    run = args.run
    if run is None:
        run = str(scratch / "run")
        print(f"training the tiny recipe for {args.steps} steps into {run} ...", flush=True)
        api.train(api.load_config(recipe="tiny", overrides={
            "train.steps": args.steps, "log.progress": "none", "data.path": dataset(args.data, scratch)}), run)
    model, tok, cfg, step, _ = load_trained(run)
    m = cfg.model
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} torch threads; model: "
          f"{m.arch} {m.n_layers}x{m.dim}, vocab {m.vocab_size}, seq_len {m.seq_len}, "
          f"{sum(p.numel() for p in model.parameters()):,} params, step {step}")
    outs = {"onnx fp32": scratch / "onnx", "onnx int8": scratch / "onnx-int8"}
    for name, out in outs.items():
        t0 = time.perf_counter()
        api.export(run, out, format="onnx", quantize="int8" if "int8" in name else None)
        print(f"exported {name} in {time.perf_counter() - t0:.1f} s", flush=True)

    ds = TokenDataset(cfg.data.path)
    windows = val_batches(ds.shards("val"), m.seq_len, 8, args.val_batches, name="val")
    with torch.no_grad():
        base_loss = statistics.fmean(float(model(x, y)) for x, y in windows)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, min(m.vocab_size, tok.get_vocab_size()), (8, args.prompt_tokens), generator=gen)

    rows = []
    base_tps = {}
    for b in (1, 8):
        s = timed(lambda b=b: torch_greedy(model, prompts[:b], args.tokens), args.repeats)
        base_tps[b] = b * args.tokens / s
    rows.append(("leantrain (torch)", None, base_tps[1], base_tps[8], base_loss))
    ref_text = generate(model, prompts[0].tolist(), args.tokens, temperature=0)
    same = {}
    for name, out in outs.items():
        lm = OnnxLM(out)
        tps = {}
        for b in (1, 8):
            p = prompts[:b].tolist()
            s = timed(lambda p=p, lm=lm: lm.generate(p, args.tokens, eos_id=None), args.repeats)
            tps[b] = b * args.tokens / s
        loss = statistics.fmean(lm.loss(x.numpy(), y.numpy()) for x, y in windows)
        same[name] = lm.generate([prompts[0].tolist()], args.tokens, eos_id=None)[0] == ref_text
        rows.append((name, (out / "model.onnx").stat().st_size, tps[1], tps[8], loss))

    print(f"\ngreedy decoding, {args.prompt_tokens}-token prompts + {args.tokens} new tokens, KV cache; val loss on "
          f"{args.val_batches}x8 windows of {m.seq_len}")
    print(f"{'model':<18} {'file MB':>8} {'tok/s b1':>9} {'x torch':>8} {'tok/s b8':>9} {'x torch':>8} "
          f"{'val loss':>9} {'delta':>8}")
    for name, size, t1, t8, loss in rows:
        mb = f"{size / 1e6:.2f}" if size else "-"
        print(f"{name:<18} {mb:>8} {t1:>9.0f} {t1 / base_tps[1]:>8.2f} {t8:>9.0f} {t8 / base_tps[8]:>8.2f} "
              f"{loss:>9.4f} {loss - base_loss:>+8.4f}")
    fp32, int8 = rows[1], rows[2]
    print(f"int8 vs fp32 ONNX: file {int8[1] / fp32[1]:.2f}x, tokens/s b1 {int8[2] / fp32[2]:.2f}x, "
          f"b8 {int8[3] / fp32[3]:.2f}x, val loss {int8[4] - fp32[4]:+.4f}")
    print(f"greedy text equal to leantrain's: {same}")

    sizes = {}
    for kind, kw in [("f32", {"dtype": "fp32"}), ("f16", {"dtype": "fp16"}), ("q8_0", {"quantize": "q8_0"})]:
        out = scratch / f"gguf-{kind}"
        api.export(run, out, format="gguf", **kw)
        sizes[kind] = (out / "model.gguf").stat().st_size
    print("GGUF sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    if args.llama_cpp:
        try:
            import llama_cpp
        except ImportError:
            print("llama-cpp-python is not installed: pip install llama-cpp-python, then rerun with --llama-cpp")
        else:
            llm = llama_cpp.Llama(str(scratch / "gguf-f32" / "model.gguf"), n_ctx=m.seq_len, verbose=False)
            got = []
            for t in llm.generate(prompts[0].tolist(), temp=0.0, top_k=1, reset=True):
                got.append(t)
                if len(got) == args.tokens:
                    break
            print(f"llama.cpp greedy text equals leantrain's: {got == ref_text}")
    print(f"(files under {scratch})")


if __name__ == "__main__":
    main()
