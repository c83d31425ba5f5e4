"""Does the multi-architecture model cost the default Llama path anything? Forward+backward, before vs after.

The baseline is model/transformer.py as committed (`git show REV:...`, default HEAD) or any file given with
--baseline; both Transformers are built from the same config and weights and timed interleaved in one
process (same threads, same allocator), so the ratio is the overhead the arch switches add to Llama.

    python bench/arch_overhead.py                         # tiny recipe shape, both attention kernels
    python bench/arch_overhead.py --baseline /tmp/old_transformer.py --steps 20
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_baseline(path: str | None, rev: str):
    """The baseline transformer module: a file, or the committed one at `rev`."""
    if path is None:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/leantrain/model/transformer.py"],
                              check=True, capture_output=True, text=True).stdout
        path = str(Path(tempfile.mkdtemp()) / "transformer_baseline.py")
        Path(path).write_text(text)
    spec = importlib.util.spec_from_file_location("transformer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_time(model: torch.nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x[:, :-1], x[:, 1:]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="a transformer.py to compare against (default: the committed one)")
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline when --baseline is not given")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per model and kernel")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from leantrain.config import ModelConfig
    from leantrain.model.transformer import Transformer

    base = load_baseline(args.baseline, args.rev)
    cfg = ModelConfig(n_layers=4, dim=256, n_heads=4, n_kv_heads=4, seq_len=256, vocab_size=8192)  # tiny recipe
    torch.manual_seed(0)
    new = Transformer(cfg)
    old = base.Transformer(cfg)
    old.load_state_dict(new.state_dict())
    x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch} x {cfg.seq_len}")
    for kernel in ("sdpa", "matmul"):
        for model in (new, old):
            for layer in model.layers:
                layer.attention.kernel = kernel
            for _ in range(2):
                step_time(model, x)  # warm-up
        times: dict[str, list[float]] = {"after": [], "before": []}
        for _ in range(args.steps):  # interleaved, so drift in clock or load hits both alike
            times["after"].append(step_time(new, x))
            times["before"].append(step_time(old, x))
        a, b = statistics.median(times["after"]), statistics.median(times["before"])
        print(f"{kernel:7s} fwd+bwd median: before {b * 1e3:7.1f} ms  after {a * 1e3:7.1f} ms  "
              f"after/before {a / b:.3f}")


if __name__ == "__main__":
    main()
