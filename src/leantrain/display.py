"""What the CLI shows people while a run goes: a live bar on a terminal, plain lines elsewhere.

This is an observer of the trainer (on_step / on_event / on_end); the library never prints.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Events worth a line in the terminal; the rest are only in events.jsonl.
_SHOWN = {"resume", "restart", "checkpoint_damaged", "checkpoint_failed", "config_changed", "preempted",
          "checkpoint", "skip", "rollback", "diverged", "grad_warning", "compiled", "compile_failed", "compile", "fp8",
          "energy", "pause", "unpause", "carbon_saved", "tracker_failed", "mix"}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} PiB"


class TrainDisplay:
    """Renders trainer records as a rich progress bar (TTY) or as one line per logged step."""

    def __init__(self, mode: str = "auto", console: Console | None = None):
        self.console = console or Console(stderr=False)
        if mode == "auto":
            mode = "bar" if self.console.is_terminal else "lines"
        self.mode = mode
        self.total = 0
        self.first_step = 0  # the step this process started at (after a resume, not 0)
        self.progress: Progress | None = None
        self.task = None

    def _eta(self, r: dict[str, Any]) -> float | None:
        done = r["step"] - self.first_step
        return r["elapsed_s"] / done * (self.total - r["step"]) if done > 0 else None

    def _line(self, r: dict[str, Any]) -> str:
        val = f" val {r['val_loss']:.4f}" if "val_loss" in r else ""
        if "val_masked_accuracy" in r:  # an MLM run (model.objective = mlm)
            val += f" masked acc {r['val_masked_accuracy'] * 100:.1f}%"
        return (f"step {r['step']}/{self.total} loss {r['loss']:.4f}{val} lr {r['lr']:.2e} "
                f"gnorm {r['grad_norm']:.2f} tok/s {r['tokens_per_s']:,.0f} MFU {r['mfu'] * 100:.1f}% "
                f"mem {fmt_bytes(r['peak_mem_bytes'])} eta {fmt_duration(self._eta(r))}")

    def on_event(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "start":
            self.total, self.first_step = e["total_steps"], e["step"]
            self.console.print(f"[bold]run directory:[/bold] {e['run_dir']}")
            ranks = ""
            if "parallel" in e:
                p = e["parallel"]
                ranks = f" · {p['world_size']} ranks ({p['strategy']})"
            active = f" ({e['active_params'] / 1e6:.2f}M active)" if "active_params" in e else ""  # MoE
            self.console.print(f"model {e['params'] / 1e6:.2f}M params{active} · {e['device']} · {e['dtype']} · "
                               f"{e['threads']} threads{ranks} · {self.total} steps")
            if "finetune" in e:  # as PEFT's print_trainable_parameters: what the optimizer actually moves
                ft = e["finetune"]
                self.console.print(f"trainable params: {ft['trainable_params']:,} || all params: "
                                   f"{ft['total_params']:,} || trainable%: "
                                   f"{100 * ft['trainable_params'] / max(ft['total_params'], 1):.4f}")
            if self.mode == "bar":
                self.progress = Progress(
                    TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                    console=self.console, transient=False)
                self.task = self.progress.add_task("train", total=self.total, completed=e["step"],
                                                   stats="", eta="?")
                self.progress.start()
            return
        if kind not in _SHOWN or self.mode == "none":
            return
        if kind == "checkpoint":
            how = "writing in background" if e["background"] else "saved"
            text = f"checkpoint {how}: {e['path']} (loop blocked {e['blocked_s']:.2f} s)"
        else:
            detail = e.get("message") or e.get("checkpoint") or e.get("signal") or ""
            if kind == "compiled":
                detail = f"torch.compile took {e['seconds']:.1f} s (not counted in tokens/s)"
            text = f"[yellow]{kind}[/yellow] at step {e['step']}: {detail}"
        self.console.print(text) if self.progress is None else self.progress.console.print(text)

    def on_step(self, r: dict[str, Any]) -> None:
        if self.mode == "lines":
            self.console.print(self._line(r), highlight=False)
        elif self.progress is not None:
            val = f" val {r['val_loss']:.3f}" if "val_loss" in r else ""
            stats = (f"loss {r['loss']:.3f}{val} · {r['tokens_per_s']:,.0f} tok/s · "
                     f"MFU {r['mfu'] * 100:.1f}%")
            self.progress.update(self.task, completed=r["step"], stats=stats, eta=fmt_duration(self._eta(r)))
            if "val_loss" in r:
                self.progress.console.print(self._line(r), highlight=False)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        sys.stdout.flush()
