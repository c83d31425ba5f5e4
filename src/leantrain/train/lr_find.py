"""Learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", sec. 3.3).

A short run raises the lr exponentially from `min_lr` to `max_lr`, one value per step, and records the
training loss. The loss first barely moves (lr too small), then falls fastest, then turns and blows up
(lr too large). A good peak lr sits where the smoothed loss falls fastest against log(lr); one tenth of
the lr at the loss minimum is the classic, more conservative answer. Both are reported.

The run takes the real Trainer's own `train_step` with the swept lr in place of the schedule's (for Muon,
the swept value is the AdamW lr and the hidden weights get `muon_lr / lr` times it, as in training), with
the guard off, and stops early once the smoothed loss exceeds `diverge_factor` times its best.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from leantrain.config import Config
from leantrain.errors import ConfigError
from leantrain.files import write_durable

SMOOTHING = 0.9  # EMA factor for the loss; bias-corrected, so early points are not dragged toward 0


def lr_sweep(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` learning rates spaced evenly in log space from min_lr to max_lr (inclusive)."""
    if not (0 < min_lr < max_lr and math.isfinite(max_lr)):  # NaN fails every comparison; inf does not
        raise ConfigError(f"lr-find: need 0 < --min-lr < --max-lr, got {min_lr} and {max_lr}; pass e.g. "
                          "--min-lr 1e-5 --max-lr 1")
    if steps < 5:
        raise ConfigError(f"lr-find: --steps {steps} is too few to read a curve from; pass --steps 30 or more")
    if steps > 10**6:  # a range test is a short run; this many would only fill memory with the lr list
        raise ConfigError(f"lr-find: --steps {steps} is more than the 1000000 allowed; 100 to 1000 is usual")
    return [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average, as Adam corrects its moments."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_frac: float = 0.1) -> dict[str, float | None]:
    """The lr of steepest descent of the smoothed loss (per unit log lr) before its minimum, and min/10.

    The first `skip_frac` of points are left out of the steepest-descent search: there the EMA is still
    settling and the slope is noise."""
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    min_div10 = lrs[best] / 10
    start = int(len(lrs) * skip_frac)
    slopes = [((smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1])), i)
              for i in range(max(1, start), min(best, len(lrs) - 1))]
    steepest = lrs[min(slopes)[1]] if slopes and min(slopes)[0] < 0 else None
    return {"steepest": steepest, "min_loss_div10": min_div10,
            "suggested": steepest if steepest is not None else min_div10}


def lr_find(cfg: Config, out_dir: str | Path, min_lr: float = 1e-5, max_lr: float = 1.0, steps: int = 100,
            diverge_factor: float = 4.0) -> dict[str, Any]:
    """Run the range test in `out_dir`; writes lr_find.json (and lr_find.png when matplotlib is installed)
    and returns the same record: lrs, losses, smoothed losses, suggestions, why it stopped, the plot path."""
    from leantrain.train.trainer import Trainer

    lrs = lr_sweep(min_lr, max_lr, steps)
    out = Path(out_dir)
    # the guard is off: the blow-up at large lr is what the test is looking for, not a step to drop
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, sample_tokens=0),
                              guard=dataclasses.replace(cfg.guard, policy="off"),
                              log=dataclasses.replace(cfg.log, grad_health_every=0))
    losses: list[float] = []
    stopped = "max_lr reached"
    best = math.inf
    with Trainer(cfg, out, resume=False) as trainer:
        for lr in lrs:
            value = trainer.train_step(trainer.loader.next_step(), lr=lr).loss.item()
            losses.append(value)
            if not math.isfinite(value):
                stopped = f"loss not finite at lr {lr:.3g}"
                break
            current = smooth(losses)[-1]
            best = min(best, current)
            if len(losses) > 5 and current > diverge_factor * best:
                stopped = f"diverged at lr {lr:.3g} (smoothed loss {current:.3g} > {diverge_factor} x best {best:.3g})"
                break
    finite = [x for x in losses if math.isfinite(x)]
    smoothed = smooth(finite)
    none = {"steepest": None, "min_loss_div10": None, "suggested": None}
    record: dict[str, Any] = {
        "optimizer": cfg.optim.name, "min_lr": min_lr, "max_lr": max_lr, "steps_planned": steps,
        "steps_run": len(losses), "stopped": stopped, "lrs": lrs[:len(finite)], "losses": finite,
        "smoothed": smoothed,
        **(suggest(lrs[:len(finite)], smoothed) if len(finite) >= 3 else none),
    }
    record["plot"] = _plot(record, out / "lr_find.png")
    write_durable(out / "lr_find.json", json.dumps(record, indent=1))
    return record


def _plot(record: dict[str, Any], path: Path) -> str | None:
    """Loss against lr on a log axis, the suggestion marked; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(record["lrs"], record["losses"], alpha=0.3, label="loss")
    ax.plot(record["lrs"], record["smoothed"], label="smoothed")
    if record["suggested"]:
        ax.axvline(record["suggested"], color="red", linestyle="--", label=f"suggested {record['suggested']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"lr range test ({record['optimizer']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
