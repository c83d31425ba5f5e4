"""`leantrain serve` under 1, 4 and 16 concurrent clients, against Hugging Face transformers' `generate`.

Trains the tiny recipe's model for a few steps (speed does not depend on the weights), starts the real
server (`leantrain serve`, a subprocess on 127.0.0.1) and sends a fixed number of streamed completion
requests from C concurrent clients (C = 1, 4, 16): each request is a 32-token prompt (token ids cut from
the validation split) and asks for new tokens with ignore_eos: --tokens each ("fixed", static batching's
best case) or a length drawn uniformly from [8, 2 * tokens - 8] ("mixed", the same mean: requests that
finish at different times). Per level it prints requests/s, output tokens/s, p50/p95 time to first
token and per-token latency, errors (must be 0) and the server's RSS before and after. Then it exports
the same checkpoint (`api.export`, HF format), loads it with transformers and times `model.generate`
(greedy, the same prompts; each batch runs to its longest request, and only the tokens each request
asked for count) at batch sizes 1, 4 and 16, and prints the ratio of the server's output tokens/s to
transformers' at each. Everything runs on this machine, loopback only; the client and transformers
share its cores with the server, so the ratio is the server's end-to-end rate, HTTP and
streaming included, against a bare in-process `generate` loop.

    python bench/serve.py                       # tiny recipe, 32 requests x 64 tokens per level
    python bench/serve.py --requests 64 --tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import cpu_name as shared_cpu_name  # noqa: E402
from _data import dataset  # noqa: E402


def cpu_name() -> str:
    """The CPU model with the core count: the server and its clients share these cores."""
    return f"{shared_cpu_name()}, {os.cpu_count()} cores"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def one_request(client, base: str, prompt: list[int], tokens: int) -> dict:
    """A streamed completion; returns its timings (or the error)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    n = 0
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
                elif first is None and event["choices"][0]["text"]:
                    first = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - counted, printed
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "per_token": (end - first) / max(n - 1, 1), "tokens": n, "end": end}


async def level(base: str, prompts: list[list[int]], clients: int, lengths: list[int]) -> dict:
    import httpx

    queue = list(range(len(prompts)))
    results: list[dict] = []

    async def worker(client):
        while queue:
            i = queue.pop()
            results.append(await one_request(client, base, prompts[i], lengths[i]))

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {"clients": clients, "requests": len(results), "wall": wall, "req_s": len(ok) / wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft50": pct([r["ttft"] for r in ok], 50),
            "ttft95": pct([r["ttft"] for r in ok], 95), "tpt50": pct([r["per_token"] for r in ok], 50),
            "tpt95": pct([r["per_token"] for r in ok], 95), "errors": errors}


def hf_rate(hf_dir: Path, prompts: list[list[int]], batch: int, lengths: list[int], pad_id: int) -> float:
    """transformers' greedy generate over the same prompts in batches of `batch`: requested output tokens/s
    (a static batch runs until its longest request; the tokens past a shorter request's length are waste)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    kwargs = {"do_sample": False, "pad_token_id": pad_id}
    with torch.no_grad():
        model.generate(ids[:batch], attention_mask=torch.ones_like(ids[:batch]), max_new_tokens=4, min_new_tokens=4,
                       **kwargs)  # warm-up
        start = time.perf_counter()
        made = 0
        for i in range(0, len(prompts), batch):
            chunk = ids[i:i + batch]
            longest = max(lengths[i:i + batch])
            out = model.generate(chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=longest,
                                 min_new_tokens=longest, **kwargs)
            assert out.size(1) - chunk.size(1) == longest
            made += sum(lengths[i:i + batch])
        return made / (time.perf_counter() - start)


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        bench(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bench(scratch: Path) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="token dataset (default data/stdlib, else a small one in a temp dir)")
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (32)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request (64)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level (1,4,16)")
    ap.add_argument("--server-threads", type=int, help="the server's --threads (default: its own, cores - 1)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from leantrain import api
    from leantrain.tokens.dataset import TokenDataset

    data = dataset(args.data, scratch)
    cfg = api.load_config(recipe=args.recipe, overrides={
        "data.path": data, "train.steps": 2, "train.eval_every": 2, "train.eval_steps": 1, "train.sample_tokens": 0,
        "checkpoint.every": 2, "log.progress": "none", "precision.dtype": "fp32"})
    run = scratch / "run"
    print(f"training {args.recipe} for 2 steps into {run} (speed does not depend on the weights) ...", flush=True)
    api.train(cfg, run)
    rng = np.random.default_rng(0)
    val = np.concatenate([np.asarray(s) for s in TokenDataset(data).shards("val")])
    starts = rng.integers(0, len(val) - args.prompt_tokens, args.requests)
    prompts = [val[s:s + args.prompt_tokens].astype(np.int64).tolist() for s in starts]
    # fixed: every request asks for --tokens; mixed: uniform in [8, 2 * tokens - 8], the same mean
    workloads = {"fixed": [args.tokens] * args.requests,
                 "mixed": rng.integers(8, 2 * args.tokens - 7, args.requests).tolist()}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "leantrain.cli", "serve", str(run), "--port", str(port),
                             "--max-batch", str(max(levels)), "--log-level", "warning",
                             *(["--threads", str(args.server_threads)] if args.server_threads else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        import httpx

        for _ in range(300):
            if proc.poll() is not None:
                sys.exit(f"the server exited: {proc.stderr.read()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            sys.exit("the server did not come up within a minute")
        asyncio.run(level(base, prompts[:4], 4, [8] * 4))  # warm-up, excluded
        rss_before = rss_mb(proc.pid)
        for name, lengths in workloads.items():
            for clients in levels:
                row = asyncio.run(level(base, prompts, clients, lengths))
                row["rss"], row["workload"] = rss_mb(proc.pid), name
                rows.append(row)
        metrics = httpx.get(base + "/metrics").text
        mean_batch = next(line.split()[-1] for line in metrics.splitlines() if line.startswith("leantrain_mean_batch "))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)

    export = api.export(run, scratch / "hf", format="hf")
    eot = json.loads((scratch / "hf" / "config.json").read_text())["eos_token_id"]
    hf = {(name, c): hf_rate(Path(export["out_dir"]), prompts, c, lengths, eot)
          for name, lengths in workloads.items() for c in levels}

    print(f"\nCPU: {cpu_name()}; torch threads: server {args.server_threads or 'cores - 1 (default)'}, transformers "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"model: recipe {args.recipe} ({cfg.model.n_layers} layers, dim {cfg.model.dim}, vocab "
          f"{cfg.model.vocab_size}), fp32; {args.requests} requests x {args.prompt_tokens} prompt tokens per level, "
          f"streamed, greedy, ignore_eos; new tokens: fixed = {args.tokens} each, mixed = uniform in "
          f"[8, {2 * args.tokens - 8}] (mean {np.mean(workloads['mixed']):.0f})\n")
    print("| workload | clients | req/s | out tok/s | TTFT p50 ms | TTFT p95 ms | per-token p50 ms | per-token p95 ms "
          "| errors | HF generate tok/s (batch = clients) | serve / HF |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        c, w = r["clients"], r["workload"]
        print(f"| {w} | {c} | {r['req_s']:.2f} | {r['tok_s']:.0f} | {r['ttft50'] * 1e3:.0f} | "
              f"{r['ttft95'] * 1e3:.0f} | {r['tpt50'] * 1e3:.1f} | {r['tpt95'] * 1e3:.1f} | {len(r['errors'])} | "
              f"{hf[w, c]:.0f} | {r['tok_s'] / hf[w, c]:.2f}x |")
    print(f"\nserver RSS: {rss_before:.0f} MB after warm-up, " + ", ".join(
        f"{r['rss']:.0f} MB after {r['workload']} x {r['clients']}" for r in rows)
          + f"; mean decode batch {mean_batch}; exit code after SIGTERM {code}")
    fixed = [r for r in rows if r["workload"] == "fixed"]
    ratio = fixed[-1]["tok_s"] / fixed[0]["tok_s"]
    print(f"throughput at {fixed[-1]['clients']} clients / 1 client (fixed): {ratio:.2f}x")
    for r in rows:
        for e in r["errors"][:3]:
            print(f"error at {r['clients']} clients: {e}")
    if any(r["errors"] for r in rows) or code != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
