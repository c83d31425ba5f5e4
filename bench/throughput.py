"""Training throughput: leantrain against a plain PyTorch loop and Hugging Face's Trainer.

Every contender trains the same Llama-shaped model (default: 6 layers, dim 384, 6 heads,
seq_len 256, micro-batch 16, vocab 8192) for the same steps, each in a fresh subprocess so
threads, allocator state and peak memory are its own. Prints tokens/s, MFU (against the
measured bf16 matmul peak) and peak memory per contender, and the ratios against each baseline.

    python bench/throughput.py                     # all contenders, 20 timed steps after 5 warm-up
    python bench/throughput.py --recipe tiny       # the demo model instead
    python bench/throughput.py --only leantrain,plain-fp32 --steps 40

Contenders:
  leantrain    leantrain's Trainer at its defaults (bf16 where fast, fused AdamW, sliced loss,
               matmul attention on CPU) with train.compile = false: what a short run gets
  leantrain-compile  the same with train.compile = true (compile time excluded, reported apart): what
               train.compile = auto picks for a run long enough to pay the compile back (the bench
               prints the decision for the recipe's own run length)
  plain-fp32   a textbook PyTorch loop and Llama written below: fp32, torch.optim.AdamW defaults
  plain-bf16   the same loop with torch.autocast(bfloat16)
  hf-fp32      transformers.Trainer + LlamaForCausalLM of the same shape (needs `pip install .[bench]`)
  hf-bf16      the same with bf16=True
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["leantrain", "leantrain-compile", "plain-fp32", "plain-bf16", "hf-fp32", "hf-bf16"]


def model_config(args):
    """The model shape every contender trains: the recipe's, with any --set model.* overrides."""
    from leantrain.config import load_config

    return load_config(recipe=args.recipe, overrides=[f"--{kv}" for kv in args.set]).model


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        yield x[:, :-1].contiguous(), x[:, 1:].contiguous()


# ---- the plain PyTorch baseline: what a user writes from a tutorial ------------------------

class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def plain_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PlainBlock(nn.Module):
    def __init__(self, dim, n_heads, hidden):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = PlainRMSNorm(dim), PlainRMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        q, k = plain_rope(q, cos, sin), plain_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PlainLlama(nn.Module):
    def __init__(self, vocab, dim, n_layers, n_heads, hidden, seq_len):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(PlainBlock(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = PlainRMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight
        hd = dim // n_heads
        inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(seq_len).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def run_plain(args, dtype: torch.dtype) -> dict:
    from leantrain.model import ffn_hidden_dim

    m = model_config(args)
    torch.manual_seed(0)
    model = PlainLlama(m.vocab_size, m.dim, m.n_layers, m.n_heads, ffn_hidden_dim(m), m.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for x, y in random_batches(args.warmup + args.steps, args.batch, m.seq_len, m.vocab_size):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_times": times[args.warmup:], "tokens_per_step": args.batch * m.seq_len, "final_loss": loss.item()}


# ---- leantrain -----------------------------------------------------------------------------

def run_leantrain(args, compile: bool = False) -> dict:
    from leantrain.config import load_config, parse_overrides
    from leantrain.train.trainer import Trainer

    data = Path(args.data)
    if not (data / "meta.json").exists():
        raise SystemExit(f"leantrain needs a token dataset at {data}: run `make data/stdlib/meta.json`")
    with tempfile.TemporaryDirectory() as run_dir:
        shape = parse_overrides([f"--{kv}" for kv in args.set]).get("model", {})
        cfg = load_config(recipe=args.recipe, overrides={
            "model": shape,
            "data": {"path": str(data)},
            "train": {"steps": args.warmup + args.steps, "micro_batch_size": args.batch, "eval_every": 0,
                      "eval_steps": 1, "sample_tokens": 0, "threads": args.threads,
                      "compile": compile},
            "checkpoint": {"every": 0}, "log": {"every": 1, "progress": "none", "grad_health_every": 0},
            **({"precision": {"dtype": args.leantrain_dtype}} if args.leantrain_dtype else {}),
        })
        times: list[float] = []
        prof = None
        if args.profile:  # the steps right after warm-up, each op's own CPU time (torch.profiler)
            from torch.profiler import ProfilerActivity, profile, schedule

            prof = profile(activities=[ProfilerActivity.CPU],
                           schedule=schedule(wait=args.warmup, warmup=1, active=args.profile, repeat=1))
            prof.start()

        class Clock:
            last = None

            def on_step(self, r):
                now = time.perf_counter()
                if Clock.last is not None:
                    times.append(now - Clock.last)
                Clock.last = now
                if prof is not None:
                    prof.step()

            def on_event(self, e):
                pass

            def on_end(self, s):
                pass

        trainer = Trainer(cfg, run_dir, observers=[Clock()], resume=False)
        summary = trainer.fit()
    out = {"step_times": times[args.warmup - 1:-1], "tokens_per_step": args.batch * cfg.model.seq_len,
           "final_loss": summary["loss"], "dtype": str(trainer.dtype)}
    if prof is not None:
        prof.stop()
        out["profile"] = profile_table(prof, args.profile)
    # times[i] is the wall time of step i+2 (log every step; the last one also runs eval)
    return out


def profile_table(prof, steps: int, top: int = 14) -> str:
    """The ops that took the most of the profiled steps' CPU time (self time: children not counted)."""
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows) or 1
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f"    {'op':44} {'ms/step':>8} {'share':>6}"]
    for e in rows[:top]:
        lines.append(f"    {e.key[:44]:44} {e.self_cpu_time_total / 1e3 / steps:8.1f} "
                     f"{100 * e.self_cpu_time_total / total:5.1f}%")
    return "\n".join(lines)


def auto_decision(args) -> str:
    """What train.compile = auto decides for the recipe's own run length (the bench itself is too short)."""
    from leantrain.config import load_config
    from leantrain.device import describe_device
    from leantrain.plan.planner import run_estimate
    from leantrain.train.compile_choice import choose_compile

    recipe = args.recipe
    cfg = load_config(recipe=recipe, overrides=[f"--data.path={args.data}", *[f"--{kv}" for kv in args.set]])
    info = describe_device(torch.device("cpu"), cfg.precision.dtype, cfg.train.attention, cfg.model.seq_len,
                           cfg.train.threads, 1, measure_peak=True)
    choice = choose_compile(cfg, "cpu", run_estimate(cfg, info).get("train_time_s"), "-")
    return (f"train.compile = auto for recipe {recipe}'s own {cfg.train.steps} steps: "
            f"{'compiles' if choice.on else 'stays eager'} ({choice.reason})")


# ---- Hugging Face Trainer ------------------------------------------------------------------

def run_hf(args, bf16: bool) -> dict:
    try:
        from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    except ImportError:
        return {"skipped": "transformers is not installed (pip install -e '.[bench]')"}
    from leantrain.model import ffn_hidden_dim

    m = model_config(args)
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=ffn_hidden_dim(m),
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.seq_len,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg)
    n = args.warmup + args.steps
    rows = [{"input_ids": x[0], "labels": x[0]} for x, _ in random_batches(n * args.batch, 1, m.seq_len,
                                                                            m.vocab_size)]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=n,
                                  learning_rate=1e-3, use_cpu=True, bf16=bf16, report_to=[], save_strategy="no",
                                  logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                                  max_grad_norm=1.0)
        Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()]).train()
    return {"step_times": times[args.warmup:], "tokens_per_step": args.batch * m.seq_len}


# ---- driver --------------------------------------------------------------------------------

def worker(args) -> None:
    torch.set_num_threads(args.threads)
    name = args.worker
    if name.startswith("leantrain"):
        out = run_leantrain(args, compile=name.endswith("compile"))  # "leantrain": compile off (eager)
    elif name.startswith("plain"):
        out = run_plain(args, torch.bfloat16 if name.endswith("bf16") else torch.float32)
    else:
        out = run_hf(args, bf16=name.endswith("bf16"))
    out["peak_mem_bytes"] = peak_rss()
    print("RESULT " + json.dumps(out))


def measure(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--recipe", args.recipe, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads),
           "--data", args.data]
    if args.leantrain_dtype:
        cmd += ["--leantrain-dtype", args.leantrain_dtype]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    for kv in args.set:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}


def main() -> None:
    from leantrain.device import physical_cores, probe_cpu_peak
    from leantrain.model import flops_per_token, param_count

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="small", help="model shape: a leantrain recipe (small = reference)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--batch", type=int, default=16, help="micro-batch size")
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"), help="token dataset for leantrain")
    p.add_argument("--only", help="comma-separated contenders: " + ",".join(CONTENDERS))
    p.add_argument("--leantrain-dtype", choices=["fp32", "bf16"], help="override leantrain's precision")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="change the model shape, e.g. --set model.n_layers=12 --set model.dim=768 (~100M params)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N steps after warm-up of the leantrain contenders and print the top ops")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    torch.set_num_threads(args.threads)
    m = model_config(args)
    fpt = flops_per_token(m)
    peaks = {k: probe_cpu_peak(d, seconds=1.5) for k, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"model: recipe {args.recipe}{' ' + ' '.join(args.set) if args.set else ''}, "
          f"{param_count(m) / 1e6:.2f}M params, {fpt / 1e6:.1f} MFLOP/token; "
          f"batch {args.batch} x {m.seq_len}; {args.threads} threads; {args.warmup} warm-up + {args.steps} steps")
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    names = args.only.split(",") if args.only else CONTENDERS
    results = {}
    for name in names:
        r = measure(name, args)
        if "skipped" not in r:
            t = sorted(r["step_times"])
            med = t[len(t) // 2]
            r["tokens_per_s"] = r["tokens_per_step"] / med
            r["mfu_bf16_peak"] = r["tokens_per_s"] * fpt / peaks["bf16"]
        results[name] = r
        print(f"  {name:17} " + (f"{r['tokens_per_s']:8,.0f} tok/s  MFU {r['mfu_bf16_peak'] * 100:5.1f}% "
                                 f"of bf16 peak  peak mem {r['peak_mem_bytes'] / 2**20:7,.0f} MiB"
                                 if "skipped" not in r else f"skipped: {r['skipped']}"), flush=True)
        if r.get("profile"):
            print(r["profile"], flush=True)
    for mine in ("leantrain", "leantrain-compile"):
        if "tokens_per_s" not in results.get(mine, {}):
            continue
        lt = results[mine]["tokens_per_s"]
        print(f"ratios ({mine} tokens/s over each):")
        for name, r in results.items():
            if not name.startswith("leantrain") and "tokens_per_s" in r:
                print(f"  vs {name:11} {lt / r['tokens_per_s']:.2f}x")
    print(auto_decision(args))
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "flops_per_token": fpt, "results": results},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
