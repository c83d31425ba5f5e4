"""The training loop, in one file.

Each step: batches -> forward/backward over the accumulated micro-batches -> clip ->
optimizer -> schedule -> telemetry -> eval / checkpoint when due. Observers (the run log,
the CLI's display) see records and events; the trainer itself prints nothing.

Under torchrun every rank runs this same loop on its part of the global batch; only rank 0 has
observers and writes the run directory, and every decision that steers the loop (loss, grad norm,
guard verdicts, stopping) is made from values all ranks share, so they never take different paths.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from leantrain.config import Config, to_toml
from leantrain.energy.accounting import EnergyAccountant
from leantrain.energy.schedule import CarbonScheduler
from leantrain.errors import CheckpointError, DataError, LeantrainError
from leantrain.model import Transformer, flops_per_token, generate, param_count
from leantrain.model.lora import adapter_state_dict, apply_finetune
from leantrain.parallel.distributed import setup as setup_distributed
from leantrain.parallel.parallelize import parallelize, remove_compile, set_grad_sync
from leantrain.plan.hardware import peak_flops, physical_cores, pick_device, resolve_dtype
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.loader import BatchLoader, val_batches
from leantrain.tokens.prefetch import Prefetcher
from leantrain.train.checkpoint import (
    Checkpointer,
    Snapshot,
    gather_snapshot,
    restore,
    restore_full,
    set_rng_state,
    snapshot,
)
from leantrain.train.dcp import save_sharded
from leantrain.train.guard import GradHealth, Guard
from leantrain.train.optim import build_optimizer, lr_at
from leantrain.train.precision import apply_float8
from leantrain.train.telemetry import Observer, RunLog


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; on CPU the process's peak resident set.

    On Linux it is VmHWM of this process's own memory map: getrusage's ru_maxrss survives exec, so a
    run started from a big Python process (a notebook, pytest) would report its parent's peak.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TrainingDiverged(LeantrainError):
    """The guard intervened more often than guard.max_retries allows."""


class _NoLog:
    """The run log of ranks other than 0: only rank 0 writes the run's record."""

    def discard_after(self, step: int) -> int:
        return 0


class Trainer:
    """Builds everything a run needs from a config, then `fit()` trains it.

    `resume=True` continues from the newest good checkpoint in `run_dir` if there is one. Under
    torchrun (WORLD_SIZE > 1) it joins the process group and lays the model out per `[parallel]`.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, observers: list[Observer] | tuple = (),
                 resume: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.layout = setup_distributed(cfg, pick_device(cfg.train.device))
        self.device = self.layout.device
        if self.device.type == "cpu":  # processes sharing a host share its cores
            torch.set_num_threads(cfg.train.threads or max(1, physical_cores() // self.layout.local_world_size))
        self.dtype = resolve_dtype(cfg.precision.dtype, self.device)

        self.data = TokenDataset(cfg.data.path)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise DataError(f"the dataset's tokenizer has {self.data.vocab_size} tokens but model.vocab_size = "
                            f"{cfg.model.vocab_size}; set --model.vocab_size={self.data.vocab_size} or more")

        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        # start from a Hugging Face model's weights, unless this run has a checkpoint of its own to resume
        if cfg.train.init_from and not (resume and Checkpointer(self.run_dir / "checkpoints", 1).list()):
            from leantrain.model.hf import load_hf_weights

            load_hf_weights(self.model, cfg.train.init_from)
        # float8 swaps Linear modules, so it goes before FSDP2/compile wrap them
        self.fp8_layers, self.fp8_skipped = apply_float8(self.model, self.device) if cfg.precision.fp8 else (0, None)
        # LoRA adapters / frozen layers: after any init_from weights are in, before parallelize and the optimizer
        self.finetune = apply_finetune(self.model, cfg.finetune)
        self.step_model = parallelize(self.model, cfg, self.device, self.dtype, self.layout)
        self._compile_pending = cfg.train.compile  # the first step compiles; timed on its own
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, self.dtype)
        self.loader = BatchLoader(self.data.shards("train"), cfg.model.seq_len, cfg.train.micro_batch_size,
                                  cfg.train.grad_accum_steps, cfg.train.seed, rank=self.layout.dp_rank,
                                  world_size=self.layout.dp_size, masks=self.data.masks("train"))
        if self.device.type == "cuda":  # the host gathers and pins the next steps while the GPU computes
            self.loader = Prefetcher(self.loader, pin=True)
        self.val = val_batches(self.data.shards("val"), cfg.model.seq_len,
                               cfg.train.micro_batch_size * self.layout.dp_size, cfg.train.eval_steps,
                               masks=self.data.masks("val"))
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        self.guard = Guard(cfg.guard)
        self.health = GradHealth(self.model, cfg.log.grad_health_every)
        self.log: RunLog | _NoLog = RunLog(self.run_dir) if self.layout.is_rank0 else _NoLog()
        self.observers: list[Observer] = [self.log, *observers] if self.layout.is_rank0 else []
        # energy, CO2 and cost of the job (rank 0's meter scaled to all ranks; see energy/accounting.py)
        self.energy = EnergyAccountant(cfg.energy, self.device, self.layout.world_size, self.layout.local_world_size)
        self.carbon = CarbonScheduler(cfg.energy, self.energy) if cfg.energy.carbon_aware else None

        self.flops_per_token = flops_per_token(cfg.model)
        # measured once, on rank 0 (ranks probing at once would slow each other's probe down)
        self.peak_flops, self.peak_source = self.layout.from_rank0(
            peak_flops(self.device, self.dtype) if self.layout.is_rank0 else None)
        self.step = 0
        self.tokens = 0
        self.last_val_loss: float | None = None
        # the logged loss is the mean over steps since the last log line; kept in checkpoints
        # so a resumed run logs exactly the numbers the uninterrupted one would
        self.window_loss = torch.zeros((), device=self.device)
        self.window_steps = 0
        self._stop_signal: str | None = None
        self._reprobed = False  # the CPU peak is measured again at most once per run
        self._signal_seen: str | None = None  # distributed: a signal this rank got, not yet agreed on
        self._saved_step: int | None = None  # step of the checkpoint this run last wrote or resumed from

        # resume first: when no checkpoint is usable it raises before anything in the run is rewritten
        if resume:
            self._resume()
        if self.layout.is_rank0:
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
            shutil.copyfile(Path(cfg.data.path) / "tokenizer.json", self.run_dir / "tokenizer.json")
            if self.data.chat_template is not None:  # chat data: its template travels with the tokenizer
                (self.run_dir / "chat_template.txt").write_text(self.data.chat_template)
        self._write_plan()

    # ---- setup helpers -------------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        for o in self.observers:
            o.on_event({"event": kind, "step": self.step, **fields})

    def _resume(self) -> None:
        found = self.checkpointer.load_latest()
        if found is None:
            if self.log.discard_after(0):
                self._emit("restart", message="no checkpoint to resume from; starting at step 0")
            return
        path, snap, warnings = found
        self._load(snap)
        if "energy" in snap.state:  # here, not in _load: a rollback does not give back the energy drawn
            self.energy.load_state_dict(snap.state["energy"])
        for w in warnings:
            self._emit("checkpoint_damaged", message=f"{w}; using {path.name} instead")
        if snap.state.get("config_hash") != self.cfg.hash():
            self._emit("config_changed", message="config differs from the checkpoint's; continuing with the new one")
        discarded = self.log.discard_after(self.step)
        self._saved_step = self.step
        self._emit("resume", checkpoint=path.name, discarded_metric_lines=discarded)

    def _load(self, snap: Snapshot, keep_loader: bool = False) -> None:
        """Put model, optimizer, counters, loader, guard and RNG back as the snapshot had them."""
        if self.layout.distributed:
            restore_full(snap, self.model, self.optimizer)
        else:
            restore(snap, self.model, self.optimizer)
        st = snap.state
        self.step, self.tokens = snap.step, st["tokens"]
        if not keep_loader:
            self.loader.load_state_dict(st["loader"])
        self.last_val_loss = st.get("val_loss")
        self.window_loss.fill_(st.get("window_loss", 0.0))
        self.window_steps = st.get("window_steps", 0)
        if "guard" in st:
            self.guard = Guard(self.cfg.guard)
            self.guard.load_state_dict(st["guard"])
        if "grad_health" in st:
            self.health.load_state_dict(st["grad_health"])
        set_rng_state(st["rng"])
        if hasattr(self.optimizer, "train"):  # schedule-free: checkpoints hold the averaged weights x
            self.optimizer.train()

    @contextlib.contextmanager
    def _eval_weights(self):
        """A schedule-free optimizer trains at weights y but its model is the average x: evaluate, sample and
        save at x, then go back. Both a straight and a resumed run make the same round trips."""
        if not hasattr(self.optimizer, "eval"):
            yield
            return
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()

    def _write_plan(self) -> None:
        c = self.cfg
        tokens_per_step = c.train.micro_batch_size * c.train.grad_accum_steps * self.layout.dp_size * c.model.seq_len
        plan = {
            "params": param_count(c.model),
            **({"finetune": self.finetune} if self.finetune else {}),
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": tokens_per_step,
            "total_tokens": tokens_per_step * c.train.steps,
            "total_flops": self.flops_per_token * tokens_per_step * c.train.steps,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "peak_flops": self.peak_flops,
            "peak_flops_source": self.peak_source,
            "dataset_train_tokens": self.data.num_tokens("train"),
            "parallel": self.layout.describe(),
        }
        if self.layout.is_rank0:
            plan["estimate"] = self._estimate()
            (self.run_dir / "plan.json").write_text(json.dumps(plan, indent=1))
        self.plan = plan

    def _estimate(self) -> dict[str, Any]:
        """The planner's prediction for this run (leantrain plan), kept next to what the run measures;
        a planner failure costs only the estimate, never the run."""
        try:
            from leantrain.plan.planner import run_estimate

            name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
            lay, dtype = self.layout, "fp32" if self.dtype == torch.float32 else "bf16"
            return run_estimate(self.cfg, self.device.type, name, dtype, self.peak_flops, lay.dp_replicate,
                                lay.dp_shard, lay.tp)
        except Exception as e:  # noqa: BLE001 - the estimate is advice; the run goes on without it
            return {"error": f"{type(e).__name__}: {e}"}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- the loop ------------------------------------------------------------------------

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the micro-batches of one optimizer step; returns (loss, grad norm).

        Each micro-batch's summed loss is divided by the target tokens of the WHOLE step, so
        the gradient equals that of one big batch even when micro-batches hold different
        numbers of real targets (masked fine-tuning data). With data parallelism "the whole step"
        spans all ranks: DDP and FSDP2 average gradients over the dp ranks, so each rank divides by
        the step's global target count over dp, and the returned loss is the global mean.
        """
        n_targets = sum(int((y != -100).sum()) for _, y in batches)
        dp, world = self.layout.dp_size, self.layout.world_size
        if dp > 1:  # summed over all ranks, the tp ranks of a dp group each count its same batch
            counted = self.layout.all_sum(torch.tensor(float(n_targets), device=self.device))
            n_targets = counted.item() / world
        n_targets = n_targets or 1  # a step of prompt tokens only (masked data): loss 0, not 0/0
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(batches):
            if dp > 1:  # gradients are reduced across ranks once per step, after the last micro-batch
                set_grad_sync(self.step_model, i == len(batches) - 1)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = self.step_model(x, y, reduction="sum") / n_targets
            loss.backward()
            total += loss.detach()
        clip = self.cfg.train.grad_clip or math.inf
        if self.layout.sharded:  # DTensor gradients: their norm is reduced over the shards
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.layout.distributed:
            # one all-reduce: the global mean loss, and whether any rank was asked to stop
            flag = 1.0 if self._signal_seen else 0.0
            stats = self.layout.all_sum(torch.stack([total, torch.tensor(flag, device=self.device)]))
            total = stats[0] / world  # the tp ranks of a dp group hold the same loss
            if stats[1].item() > 0:
                self._stop_signal = self._signal_seen or "SIGTERM"
        return total, grad_norm

    def _first_compiled_step(self, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the first step through torch.compile, timing the compile; on failure fall back to eager."""
        self._compile_pending = False
        t0 = time.perf_counter()
        try:
            out = self.train_step(batches)
            self._emit("compiled", seconds=round(time.perf_counter() - t0, 2))
            return out
        except Exception as e:  # noqa: BLE001 - any compiler failure: train on, uncompiled
            self.optimizer.zero_grad(set_to_none=True)
            if self.layout.distributed:  # blocks compiled in place, inside DDP/FSDP2: keep the wrapper
                remove_compile(self.model)
            else:
                self.step_model = self.model
            self._emit("compile_failed", message=f"torch.compile failed ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); training continues without compile")
            return self.train_step(batches)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed val batches (micro-batch x dp windows each, so the
        same windows whatever the layout); with data parallelism each rank scores its rows of every batch."""
        if self.layout.dp_size > 1:
            return self._evaluate_split()
        self.model.eval()
        losses = []
        for x, y in self.val:
            with self._autocast():
                losses.append(self.step_model(x.to(self.device), y.to(self.device)).float())
        self.model.train()
        return torch.stack(losses).mean().item()

    def _evaluate_split(self) -> float:
        dp, r = self.layout.dp_size, self.layout.dp_rank
        self.model.eval()
        stats = []  # per batch: [loss sum, targets] of this rank's rows, summed over ranks below
        for x, y in self.val:
            whole = len(x) < dp  # a short last batch: every rank scores all of it, counted once
            if not whole:
                x, y = x[r::dp], y[r::dp]
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                loss_sum = self.step_model(x, y, reduction="sum").float()
            row = torch.stack([loss_sum, (y != -100).sum().float()])
            stats.append(row / dp if whole else row)
        self.model.train()
        totals = self.layout.all_sum(torch.stack(stats))
        return (totals[:, 0] / totals[:, 1]).mean().item()

    def save_checkpoint(self) -> None:
        """Checkpoint now (in the background with checkpoint.async). A failed save is recorded
        and raised: earlier checkpoints stay intact and the run stops cleanly."""
        t0 = time.perf_counter()
        self.guard.interventions = 0
        state = {"tokens": self.tokens, "loader": self.loader.state_dict(), "config_hash": self.cfg.hash(),
                 "val_loss": self.last_val_loss, "guard": self.guard.state_dict(),
                 "grad_health": self.health.state_dict(),
                 "window_loss": self.window_loss.item(), "window_steps": self.window_steps,
                 "energy": self.energy.state_dict()}
        failure = None
        with self._eval_weights():
            if self.cfg.checkpoint.format == "sharded":  # every rank writes its own shards (train/dcp.py)
                snap, failure = None, self._save_sharded(state)
            elif self.layout.distributed:  # every rank gathers; rank 0 gets the whole state and writes it
                snap = gather_snapshot(self.step, self.model, self.optimizer, state)
            else:
                snap = snapshot(self.step, self.model, self.optimizer, state)
        if snap is not None and self.cfg.finetune.lora_rank:  # the adapters alone, small enough to share
            snap.extra["adapters.safetensors"] = adapter_state_dict(snap.model)
        try:
            if snap is not None and self.cfg.checkpoint.async_:
                self.checkpointer.write_async(snap)
            elif snap is not None:
                self.checkpointer.write(snap)
        except CheckpointError as e:
            failure = e
        self._raise_checkpoint_failure(failure)
        path = self.checkpointer.path_for(self.step)
        self._saved_step = self.step
        self._emit("checkpoint", path=str(path.relative_to(self.run_dir)), blocked_s=round(time.perf_counter() - t0, 3),
                   background=self.cfg.checkpoint.async_ and self.cfg.checkpoint.format == "full")

    def _save_sharded(self, state: dict[str, Any]) -> CheckpointError | None:
        """A sharded checkpoint, written now by every rank (a collective); its failure, if any."""
        try:
            self.checkpointer.wait()  # a background full write still in flight (the format changed on resume)
            save_sharded(self.checkpointer, self.step, self.model, self.optimizer, state)
        except CheckpointError as e:
            return e
        return None

    def _raise_checkpoint_failure(self, failure: CheckpointError | None) -> None:
        """Record and raise a failed checkpoint write. Distributed, rank 0 (the writer) tells every rank
        its outcome, so all stop together; this is also the barrier after a save."""
        if self.layout.distributed:
            message = self.layout.from_rank0(str(failure) if failure else None)
            if message is not None and failure is None:
                failure = CheckpointError(message)
        if failure is not None:
            self._emit("checkpoint_failed", message=str(failure))
            raise failure

    def _wait_for_checkpoint(self) -> None:
        """Wait for a background checkpoint write; its failure is recorded and raised like a sync one."""
        failure = None
        try:
            self.checkpointer.wait()
        except CheckpointError as e:
            failure = e
        self._raise_checkpoint_failure(failure)

    def _intervene(self, reason: str) -> None:
        """Drop this step's update (and its batch); under `rollback` also return to the last checkpoint,
        keeping the loader where it is so the data window that caused the trouble is skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.interventions += 1
        if self.guard.interventions > self.cfg.guard.max_retries:
            self._emit("diverged", message=reason)
            raise TrainingDiverged(
                f"training diverged at step {self.step}: {reason}; {self.guard.interventions - 1} interventions "
                f"since the last checkpoint (guard.max_retries = {self.cfg.guard.max_retries}); "
                "lower optim.lr or raise optim.warmup_steps, then resume")
        if self.cfg.guard.policy == "rollback":
            self._wait_for_checkpoint()
            found = self.checkpointer.load_latest()
            if found is not None:
                from_step, count = self.step, self.guard.interventions
                path, snap, warnings = found
                self._emit("rollback", message=f"{reason}; back to {path.name}, skipping the data window",
                           checkpoint=path.name, from_step=from_step)
                self._load(snap, keep_loader=True)
                for w in warnings:
                    self._emit("checkpoint_damaged", message=f"{w}; using {path.name} instead")
                self.guard.interventions = count
                self._saved_step = self.step
                self.log.discard_after(self.step)  # the rolled-back steps' lines: metrics stay one clean run
                return
        self._emit("skip", message=f"{reason}; update and batch dropped",
                   loader_step=self.loader.state_dict()["step"])

    def _carbon_pause(self) -> None:
        """Carbon-aware: while the grid is dirtier than the deadline allows, checkpoint (so a kill during the
        pause loses nothing), sleep in-process until the forecast's next clean enough slot, then go on."""
        decision = self.layout.from_rank0(self.carbon.check(self.step, self.cfg.train.steps))
        if decision is None or self._stop_signal is not None:
            return
        if self._saved_step != self.step:
            self.save_checkpoint()
        self._wait_for_checkpoint()
        self._emit("pause", reason="carbon_aware", **decision)
        resumed = self.carbon.wait(decision, stop=lambda: bool(self._stop_signal or self._signal_seen))
        self._emit("unpause", reason="carbon_aware", message=f"carbon-aware pause over after {resumed['paused_s']} s",
                   **resumed)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.layout.distributed:  # ranks stop together, after the step in which any of them saw it
            self._signal_seen = signal.Signals(signum).name
        else:
            self._stop_signal = signal.Signals(signum).name

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns a summary. SIGTERM/SIGINT stop at the next step boundary
        after saving a checkpoint (summary["stopped"] names the signal)."""
        cfg = self.cfg
        total_steps = cfg.train.steps
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        layout = {"parallel": self.layout.describe()} if self.layout.distributed else {}
        self._emit("start", total_steps=total_steps, params=self.plan["params"], device=str(self.device),
                   dtype=self.plan["dtype"], threads=self.plan["threads"], run_dir=str(self.run_dir), **layout)
        if self.energy.enabled:
            self._emit("energy", **self.energy.describe())
        if self.carbon is not None:
            self.carbon.start(self.step)
        if cfg.precision.fp8:
            self._emit("fp8", layers=self.fp8_layers, message=self.fp8_skipped
                       or f"{self.fp8_layers} linear layers compute in float8")
        self.model.train()
        window_tokens, window_time, window_data_s = 0, 0.0, 0.0
        run_t0 = time.perf_counter()
        record: dict[str, Any] = {}
        try:
            while self.step < total_steps and self._stop_signal is None:
                t0 = time.perf_counter()
                lr = lr_at(self.step, total_steps, cfg.optim)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batches = self.loader.next_step()
                data_s = time.perf_counter() - t0
                if self._compile_pending:
                    loss, grad_norm = self._first_compiled_step(batches)
                    t0 = time.perf_counter()  # compile time is reported apart from step time
                else:
                    loss, grad_norm = self.train_step(batches)
                if cfg.guard.policy != "off":
                    verdict = self.guard.check(loss.item(), grad_norm.item())
                    if verdict is not None:
                        self._intervene(verdict)
                        continue
                health_due = self.health.due(self.step + 1)
                grad_norms = self.health.before_update() if health_due else None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                step_tokens = sum(x.numel() for x, _ in batches) * self.layout.dp_size
                self.step += 1
                self.tokens += step_tokens

                last = self.step == total_steps
                eval_due = last or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0)
                log_due = eval_due or health_due or self.step % cfg.log.every == 0
                window_tokens += step_tokens
                window_data_s += data_s
                self.window_loss += loss
                self.window_steps += 1
                if log_due:
                    # the mean loss of the steps since the last line; .item() syncs the device
                    loss_value = (self.window_loss / self.window_steps).item()
                    grad_norm_value = grad_norm.item()
                    window_time += time.perf_counter() - t0
                    tps = window_tokens / window_time
                    peak_all = self.peak_flops * self.layout.world_size
                    if (tps * self.flops_per_token > peak_all and self.device.type == "cpu" and self.layout.is_rank0
                            and not self._reprobed):
                        # more than the peak: the cached probe ran on busy cores; measure again, once (rank 0
                        # alone: only its records are logged)
                        self._reprobed = True
                        self.peak_flops, _ = peak_flops(self.device, self.dtype, refresh=True)
                        self._emit("peak_reprobed", peak_flops=self.peak_flops)
                    record = {
                        "step": self.step, "tokens": self.tokens, "loss": loss_value, "lr": lr,
                        "grad_norm": grad_norm_value, "tokens_per_s": round(tps, 1),
                        "mfu": round(tps * self.flops_per_token / (self.peak_flops * self.layout.world_size), 4),
                        "peak_mem_bytes": peak_memory_bytes(self.device),
                        "data_wait_frac": round(window_data_s / window_time, 5),
                        "elapsed_s": round(time.perf_counter() - run_t0, 2),
                    }
                    if health_due:
                        record["grad_norms"] = grad_norms
                        record["update_ratio"] = self.health.after_update()
                        warning = self.health.warn(grad_norm_value)
                        if warning:
                            self._emit("grad_warning", message=warning)
                    if eval_due:
                        with self._eval_weights():
                            self.last_val_loss = record["val_loss"] = self.evaluate()
                    record.update(self.energy.read(self.step))
                    for o in self.observers:
                        o.on_step(record)
                    window_tokens, window_time, window_data_s, self.window_steps = 0, 0.0, 0.0, 0
                    self.window_loss.zero_()
                else:
                    window_time += time.perf_counter() - t0
                if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save_checkpoint()
                if self.carbon is not None and log_due and not last:
                    self._carbon_pause()
            if self._stop_signal is not None:
                self._wait_for_checkpoint()
                if self._saved_step != self.step:
                    self.save_checkpoint()
                self._emit("preempted", signal=self._stop_signal)
            self._wait_for_checkpoint()
            with self._eval_weights():
                sample = self.sample() if self.step == total_steps and cfg.train.sample_tokens else None
        finally:
            self.energy.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        summary = {
            "run_dir": str(self.run_dir), "step": self.step, "tokens": self.tokens,
            "loss": record.get("loss"), "val_loss": self.last_val_loss,
            "tokens_per_s": record.get("tokens_per_s"), "mfu": record.get("mfu"),
            "stopped": self._stop_signal, "sample": sample, **self.energy.summary(),
        }
        if self.carbon is not None:
            saved = self.energy.carbon_saved()
            summary["co2_saved_g"] = saved["co2_saved_g"]
            self._emit("carbon_saved", **saved)
        self._emit("end", **{k: v for k, v in summary.items() if k != "sample"})
        for o in self.observers:
            o.on_end(summary)
        return summary

    def sample(self) -> str | None:
        """Generate from the trained model and append the text to samples.txt (rank 0). Sharded weights
        need every rank in each forward, so under FSDP2 all ranks generate the same text."""
        if not (self.layout.is_rank0 or self.layout.sharded):
            return None
        tok = self.data.tokenizer()
        prompt = self.cfg.train.sample_prompt
        ids = tok.encode(prompt).ids
        with self._autocast():
            new = generate(self.model, ids, self.cfg.train.sample_tokens, seed=self.cfg.train.seed,
                           eos_id=None)
        text = prompt + tok.decode(new)
        if not self.layout.is_rank0:
            return None
        with open(self.run_dir / "samples.txt", "a") as f:
            f.write(f"=== step {self.step} · prompt {prompt!r}\n{text}\n\n")
        return text
