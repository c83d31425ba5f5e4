"""The training loop, in one file.

`train_step(batches)` is one optimizer step: schedule lr -> forward/backward over the accumulated
micro-batches -> clip -> guard -> optimizer (or the update dropped), returning a `StepResult`; it is
the step every trainer of the project takes (fit, lr-find, later callers). `fit` calls it and then
the observers: the meter (speed, MFU), the metrics line with eval when due, the checkpointer, the
carbon pause. Observers (the run log, the CLI's display) see records and events; the trainer itself
prints nothing. `close()` (called by `fit` on every way out) stops every background worker.

Under torchrun every rank runs this same loop on its part of the global batch; only rank 0 has
observers and writes the run directory, and every decision that steers the loop (loss, grad norm,
guard verdicts, stopping) is made from values all ranks share, so they never take different paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leantrain.config import Config, TrainConfig, compile_mode, to_toml
from leantrain.device import DeviceInfo, available_memory, describe_device, peak_flops, pick_device
from leantrain.energy.accounting import EnergyAccountant
from leantrain.energy.schedule import CarbonScheduler
from leantrain.errors import CheckpointError, ConfigError, DataError, LeantrainError
from leantrain.files import open_append
from leantrain.model import Transformer, flops_per_token, generate, param_count
from leantrain.model.flops import active_param_count
from leantrain.model.lora import adapter_state_dict, apply_finetune
from leantrain.model.moe import MoETracker
from leantrain.parallel.distributed import Layout, grad_accum_steps
from leantrain.parallel.distributed import setup as setup_distributed
from leantrain.parallel.expert import clip_grad_norm as clip_expert_parallel
from leantrain.parallel.expert import reduce_expert_grads
from leantrain.parallel.parallelize import parallelize, remove_compile, set_grad_sync
from leantrain.tokens.dataset import TokenDataset
from leantrain.tokens.fim import fim_for_dataset
from leantrain.tokens.loader import BatchLoader, val_batches
from leantrain.tokens.masking import MaskedLoader, SpanMasker, masked_scores, mlm_tokenizer
from leantrain.tokens.mix import effective_epochs, resolve_weights
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
from leantrain.train.compile_choice import (
    CompileChoice,
    choose_compile,
    compile_key,
    remember_compiled,
    use_persistent_cache,
)
from leantrain.train.distill import Distiller
from leantrain.train.guard import GradHealth, Guard
from leantrain.train.observers import StepMeter, StepResult, StopRun
from leantrain.train.optim import batch_size_at, build_optimizer, lr_at
from leantrain.train.precision import apply_float8
from leantrain.train.pruning import GradualPruner
from leantrain.train.rundir import claim_run_dir, write_run_file
from leantrain.train.runs import init_from_run
from leantrain.train.telemetry import Observer, RunLog


class TrainingDiverged(LeantrainError):
    """The guard intervened more often than guard.max_retries allows."""


class _NoLog:
    """The run log of ranks other than 0: only rank 0 writes the run's record."""

    def discard_after(self, step: int) -> int:
        return 0


class Trainer:
    """Builds everything a run needs from a config, then `fit()` trains it.

    `resume=True` continues from the newest good checkpoint in `run_dir` if there is one. Under
    torchrun (WORLD_SIZE > 1) it joins the process group (unless the caller did and passes its `layout`)
    and lays the model out per `[parallel]`, in place: `self.model` is the one handle.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, observers: list[Observer] | tuple = (),
                 resume: bool = True, layout: Layout | None = None, force: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # a caller that set the process group up already (the CLI names the run dir on rank 0) hands its layout in
        self.layout = layout or setup_distributed(cfg, pick_device(cfg.train.device))
        # device, dtype, attention kernel, threads (set here) and peak: decided as `leantrain plan` decides them
        self.device_info = self._describe_device()
        if not force:  # the planner's memory estimate, before the model is allocated or anything written
            self._check_memory()
        # read-only checks of the inputs first, so a typo in a path leaves no run folder behind
        self.data = TokenDataset(cfg.data.path)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise DataError(f"the dataset's tokenizer has {self.data.vocab_size} tokens but model.vocab_size = "
                            f"{cfg.model.vocab_size}; set --model.vocab_size={self.data.vocab_size} or more")
        # a mixed dataset (data prepare --source): each window's source is drawn by weight ([data] mix re-weighs)
        self.mix = resolve_weights(self.data.mix, cfg.data.mix, cfg.data.path)
        self.masker = self.mlm_tok = None
        if cfg.model.objective == "mlm":  # the run's tokenizer gains <|mask|>; the data path masks spans of tokens
            if self.data.masks("train") is not None:
                raise DataError(f"{cfg.data.path} is chat data, whose loss masks train a causal model's answers; "
                                "model.objective = mlm needs plain text (data prepare without --format chat)")
            self.mlm_tok, mask_id = mlm_tokenizer(self.data.tokenizer(), cfg.model.vocab_size)
            self.masker = SpanMasker(mask_id, self.data.vocab_size, cfg.data.mask_rate, cfg.data.mask_span,
                                     cfg.train.seed)
        self.fim = self.fim_tok = None
        if cfg.data.fim_rate:  # fill-in-the-middle: windows rearranged as drawn; the run's tokenizer has the sentinels
            self.fim, self.fim_tok = fim_for_dataset(self.data, cfg.data.fim_rate, cfg.data.fim_spm_rate,
                                                     cfg.train.seed, cfg.model.vocab_size)
        self.distill = Distiller.of(cfg, self.layout.device)  # [distill]: the teacher, checked before any folder
        self.device = self.layout.device
        self.dtype = self.device_info.dtype

        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        # start from a Hugging Face model's weights, unless this run has a checkpoint of its own to resume
        fresh = not (resume and Checkpointer(self.run_dir / "checkpoints", 1).list())
        if cfg.train.init_from and fresh and (Path(cfg.train.init_from) / "config.toml").is_file():
            init_from_run(self.model, cfg.train.init_from)  # a leantrain run or compressed folder
        elif cfg.train.init_from and fresh:
            from leantrain.model.hf import load_hf_weights

            load_hf_weights(self.model, cfg.train.init_from)
        # float8 swaps Linear modules, so it goes before FSDP2/compile wrap them
        self.fp8_layers, self.fp8_skipped = apply_float8(self.model, self.device) if cfg.precision.fp8 else (0, None)
        self.qat_layers = 0
        if cfg.quant.qat:  # torchao fake quantization (QAT) swaps Linear modules too; the weights keep their names
            from leantrain.model.quant import apply_qat

            self.qat_layers = apply_qat(self.model, cfg.quant.qat, cfg.quant.group_size)
        # LoRA adapters / frozen layers: after any init_from weights are in, before parallelize and the optimizer
        self.finetune = apply_finetune(self.model, cfg.finetune)
        if cfg.finetune.adapter and fresh:  # adapters trained elsewhere (PEFT) go on before training them on
            from leantrain.model.peft import load_adapter

            load_adapter(self.model, cfg.finetune.adapter)
        # before anything is written, after every input (init_from, adapter) loaded, so that a bad input leaves
        # no folder behind: a new, empty or leantrain run folder, locked for this process (rank 0)
        self.run_lock = claim_run_dir(self.run_dir, self.layout)
        # train.global_batch_size: the accumulation this world size needs for it (elastic runs keep their batch)
        self.grad_accum_steps = grad_accum_steps(cfg.train, self.layout.dp_size)
        self._estimate_block: dict[str, Any] | None = None  # the planner's estimate, made on first use
        self.compile = self._choose_compile()  # train.compile = auto: on when the run pays the compile back
        # in place: self.model is the one handle
        parallelize(self.model, cfg, self.device, self.dtype, self.layout, self.device_info.attention,
                    compile=self.compile.on)
        self._compile_pending = self.compile.on  # the first step compiles; timed on its own
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, self.dtype)
        self.pruner = GradualPruner.of(self.model, cfg.prune, self.layout.sharded)  # [prune]: None when off
        self.loader = BatchLoader(self.data.shards("train"), cfg.model.seq_len, cfg.train.micro_batch_size,
                                  self.grad_accum_steps, cfg.train.seed, rank=self.layout.dp_rank,
                                  world_size=self.layout.dp_size, masks=self.data.masks("train"),
                                  mix=None if self.mix is None else [(n, w, k) for (n, w), k in zip(
                                      self.mix.items(), self.data.source_shard_counts("train"), strict=True)],
                                  transform=self.fim)
        self.val = val_batches(self.data.shards("val"), cfg.model.seq_len,
                               cfg.train.micro_batch_size * self.layout.dp_size, cfg.train.eval_steps,
                               masks=self.data.masks("val"))
        if self.masker is not None:  # MLM: (masked inputs, labels) in place of (inputs, next tokens)
            self.loader, self.val = MaskedLoader(self.loader, self.masker), self.masker.val_batches(self.val)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                         require=("tokens", "loader"))
        # the small batches of a batch-size warmup are noisy, like the steps of an lr warmup: both stay out of
        # the guard's spike history
        self.guard = Guard(cfg.guard, warmup_steps=max(cfg.optim.warmup_steps, cfg.train.batch_warmup_steps))
        self.health = GradHealth(self.model, cfg.log.grad_health_every)
        self.moe = MoETracker.of(self.model)  # None for a dense model: balance losses, expert bias, load telemetry
        # extra objectives a caller adds to every step's loss (federated FedProx: mu/2 ||w - w_global||^2); each
        # returns a scalar tensor, counted once per optimizer step and kept out of the logged loss
        self.loss_terms: list[Any] = []
        self.log: RunLog | _NoLog = RunLog(self.run_dir, self.run_lock) if self.layout.is_rank0 else _NoLog()
        self.observers: list[Observer] = [self.log, *observers] if self.layout.is_rank0 else []
        # energy, CO2 and cost of the job (rank 0's meter scaled to all ranks; see energy/accounting.py)
        self.energy = EnergyAccountant(cfg.energy, self.device, self.layout.world_size, self.layout.local_world_size)
        try:  # the energy poller runs from here on: a setup failure below must not leave it behind
            self.carbon = CarbonScheduler(cfg.energy, self.energy) if cfg.energy.carbon_aware else None

            self.flops_per_token = flops_per_token(cfg.model)
            self.peak_flops, self.peak_source = self.device_info.peak_flops, self.device_info.peak_source
            self.step = 0
            self.tokens = 0
            self.last_val_loss: float | None = None
            # the logged loss is the mean over steps since the last log line; kept in checkpoints
            # so a resumed run logs exactly the numbers the uninterrupted one would
            self.window_loss = torch.zeros((), device=self.device)
            self.window_steps = 0
            reprobe = self._reprobe_peak if self.device.type == "cpu" and self.layout.is_rank0 else None
            self.meter = StepMeter(self.device, self.flops_per_token, self.peak_flops, self.layout.world_size, reprobe)
            self._stop_signal: str | None = None
            self._signal_seen: str | None = None  # distributed: a signal this rank got, not yet agreed on
            self._saved_step: int | None = None  # step of the checkpoint this run last wrote or resumed from

            # resume first: when no checkpoint is usable it raises before anything in the run is rewritten
            if resume:
                self._resume()
            if self.layout.is_rank0:
                write_run_file(self.run_dir, "config.toml", to_toml(cfg) + self._resolved_comment())
                run_tok = self.mlm_tok if self.mlm_tok is not None else self.fim_tok  # one that gained special tokens
                write_run_file(self.run_dir, "tokenizer.json", (Path(cfg.data.path) / "tokenizer.json").read_bytes()
                               if run_tok is None else run_tok.to_str(pretty=True))
                hf_tok = Path(cfg.data.path) / "tokenizer_config.json"
                if hf_tok.is_file():  # a Hugging Face tokenizer's special tokens travel with it (export, generate)
                    write_run_file(self.run_dir, "tokenizer_config.json", hf_tok.read_bytes())
                if self.data.chat_template is not None:  # chat data: its template travels with the tokenizer
                    write_run_file(self.run_dir, "chat_template.txt", self.data.chat_template)
            self._write_plan()
            if cfg.data.prefetch == "on" or (cfg.data.prefetch == "auto" and self.device.type == "cuda"):
                # the host gathers (and on CUDA pins) the next steps while the device computes; started last, so
                # a failed resume leaves no thread behind (close() stops it)
                self.loader = Prefetcher(self.loader, pin=self.device.type == "cuda")
        except BaseException:
            self.energy.close()
            raise

    # ---- setup helpers -------------------------------------------------------------------

    def _describe_device(self) -> DeviceInfo:
        """leantrain.device's answer for this process; the CPU peak is measured on rank 0 only (ranks probing
        at once would slow each other's probe down) and shared."""
        c, lay = self.cfg, self.layout
        info = describe_device(lay.device, c.precision.dtype, c.train.attention, c.model.seq_len, c.train.threads,
                               lay.local_world_size, measure_peak=lay.is_rank0)
        peak = lay.from_rank0((info.peak_flops, info.peak_source) if lay.is_rank0 else None)
        return dataclasses.replace(info, peak_flops=peak[0], peak_source=peak[1])

    def _choose_compile(self) -> CompileChoice:
        """train.compile resolved (auto: from the planner's estimate of this run's eager time), on rank 0 so
        that every rank compiles or none does."""
        lay = self.layout
        choice = None
        if lay.is_rank0:
            key = compile_key(self.cfg, lay.device.type, self.device_info.dtype, lay.strategy)
            eager_s = None
            if compile_mode(self.cfg.train.compile) == "auto":
                eager_s = self._estimate().get("train_time_s")
            choice = choose_compile(self.cfg, lay.device.type, eager_s, key, tp=lay.tp, ep=lay.ep)
        choice = lay.from_rank0(choice)
        if choice.on:
            use_persistent_cache()
        return choice

    def _check_memory(self) -> None:
        """Refuse (one line, exit 2) a config the planner says does not fit in the memory available now,
        naming what would fit; decided on rank 0 so that all ranks stop together."""
        from leantrain.plan.planner import memory_refusal

        lay = self.layout
        refusal = None
        if lay.is_rank0:
            avail, where = available_memory(lay.device)
            if lay.device.type == "cpu" and lay.local_world_size > 1:  # the host's processes share its memory
                avail, where = avail / lay.local_world_size, f"{where} / {lay.local_world_size} local ranks"
            refusal = memory_refusal(self.cfg, self.device_info, avail, where, lay.dp_replicate, lay.dp_shard, lay.tp)
        refusal = lay.from_rank0(refusal)
        if refusal:
            raise ConfigError(refusal)

    def _resolved_comment(self) -> str:
        """What this machine decided for the `auto` settings, kept (as a comment: not settings) with the config."""
        h = self.device_info
        return (f"\n# resolved on this machine: device = {h.device} ({h.name}), dtype = {h.dtype_name}, attention = "
                f"{h.attention}, threads = {h.threads}, peak_flops = {h.peak_flops:.4g} ({h.peak_source})\n")

    def _emit(self, kind: str, **fields: Any) -> None:
        for o in self.observers:
            o.on_event({"event": kind, "step": self.step, **fields})

    def _resume(self) -> None:
        found = self.checkpointer.load_latest()
        self._check_same_checkpoint(None if found is None else found[0].name)
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

    def _check_same_checkpoint(self, name: str | None) -> None:
        """Every rank resumes from the checkpoint rank 0 found. A node whose run directory is not the shared one
        (a local folder at the same path) finds other checkpoints or none and would train on from another step
        with other weights: all ranks stop with one line instead, before any of them loads anything."""
        lay = self.layout
        if not lay.distributed:
            return
        chosen = lay.from_rank0(name)
        differ = int(lay.all_sum(torch.tensor(float(name != chosen), device=self.device)).item())
        if differ:
            raise CheckpointError(f"{differ} of {lay.world_size} processes do not find the checkpoint rank 0 resumes "
                                  f"from ({chosen or 'none'}) in {self.run_dir}: every node must see the same run "
                                  "directory (a shared file system such as NFS or Lustre, at the same path); pass "
                                  "such a folder with --run-dir")

    def _load(self, snap: Snapshot, rollback: bool = False) -> None:
        """Put model, optimizer, counters, loader, guard and RNG back as the snapshot had them. A rollback
        keeps the loader where it is (the data window that caused trouble is skipped) and the guard's count."""
        if self.layout.distributed:
            restore_full(snap, self.model, self.optimizer)
        else:
            restore(snap, self.model, self.optimizer)
        st = snap.state
        self.step, self.tokens = snap.step, st["tokens"]
        if not rollback:
            self.loader.load_state_dict(st["loader"])
        self.last_val_loss = st.get("val_loss")
        self.window_loss.fill_(st.get("window_loss", 0.0))
        self.window_steps = st.get("window_steps", 0)
        if "guard" in st:
            self.guard.load_state_dict(st["guard"], keep_interventions=rollback)
        if "grad_health" in st:
            self.health.load_state_dict(st["grad_health"])
        if self.pruner is not None:
            self.pruner.load(snap.extra)
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
        tokens_per_step = c.train.micro_batch_size * self.grad_accum_steps * self.layout.dp_size * c.model.seq_len
        plan = {
            "params": param_count(c.model),
            "active_params": active_param_count(c.model),  # MoE: the top_k experts a token uses; MFU counts these
            **({"finetune": self.finetune} if self.finetune else {}),
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": tokens_per_step,
            "total_tokens": tokens_per_step * c.train.steps,
            "total_flops": self.flops_per_token * tokens_per_step * c.train.steps,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.device_info.attention,
            "threads": self.device_info.threads,
            "peak_flops": self.peak_flops,
            "peak_flops_source": self.peak_source,
            "dataset_train_tokens": self.data.num_tokens("train"),
            "parallel": self.layout.describe(),
            "compile": self.compile.as_dict(),
            **({"mix": self._mix_plan(tokens_per_step * c.train.steps)} if self.mix is not None else {}),
        }
        if self.layout.is_rank0:
            plan["estimate"] = self._estimate()
            write_run_file(self.run_dir, "plan.json", json.dumps(plan, indent=1))
        self.plan = plan

    def _mix_plan(self, trained_tokens: int) -> dict[str, dict[str, Any]]:
        """Per source: weight, train tokens and how many times this run sees it (a small source repeats)."""
        assert self.mix is not None
        tokens = self.data.source_tokens("train")
        epochs = effective_epochs(self.mix, tokens, trained_tokens)
        return {n: {"weight": w, "train_tokens": tokens[n], "epochs": epochs[n]} for n, w in self.mix.items()}

    def _estimate(self) -> dict[str, Any]:
        """The planner's prediction for this run (leantrain plan), kept next to what the run measures;
        a planner failure costs only the estimate, never the run. Made once: the compile choice reads it too."""
        if self._estimate_block is not None:
            return self._estimate_block
        try:
            from leantrain.plan.planner import run_estimate

            lay = self.layout
            # the planner reads grad_accum_steps: give it the one this world size derived from global_batch_size
            train = dataclasses.replace(self.cfg.train, grad_accum_steps=self.grad_accum_steps, global_batch_size=0)
            self._estimate_block = run_estimate(dataclasses.replace(self.cfg, train=train), self.device_info,
                                                lay.dp_replicate, lay.dp_shard, lay.tp)
        except Exception as e:  # noqa: BLE001 - the estimate is advice; the run goes on without it
            self._estimate_block = {"error": f"{type(e).__name__}: {e}"}
        return self._estimate_block

    def _warmed_up(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Under batch-size warmup (`train.batch_warmup_steps`), the first sequences of each micro-batch."""
        k = batch_size_at(self.step, self.cfg.train.batch_warmup_steps, self.cfg.train.micro_batch_size)
        return batches if k >= self.cfg.train.micro_batch_size else [(x[:k], y[:k]) for x, y in batches]

    def _eager(self) -> contextlib.AbstractContextManager:
        """Run a compiled model uncompiled inside this context (shapes it should not compile for)."""
        return torch.compiler.set_stance("force_eager") if self.compile.on else contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- the step ------------------------------------------------------------------------

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float | None = None) -> StepResult:
        """One optimizer step: set the lr (the schedule's, or `lr`), forward/backward over the micro-batches,
        clip, ask the guard, then update the weights, or drop the update (and under `rollback` go back to the
        last checkpoint). Everything that trains (fit, lr-find, later callers) takes this same step."""
        lr = lr_at(self.step, self.cfg.train.steps, self.cfg.optim) if lr is None else lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        compile_s = None
        if self.compile.on and batches and len(batches[0][0]) < self.cfg.train.micro_batch_size:
            # a batch-size warmup step runs eagerly: compiling its shapes would make the graph of the full
            # batch, the rest of the run, a dynamic-shape one
            with self._eager():
                loss, grad_norm = self.forward_backward(batches)
        elif self._compile_pending:
            (loss, grad_norm), compile_s = self._first_compiled_step(batches)
        else:
            loss, grad_norm = self.forward_backward(batches)
        verdict = self.guard.check(loss.item(), grad_norm.item()) if self.guard.enabled else None
        if verdict is not None:
            self._intervene(verdict)
            return StepResult(loss, grad_norm, lr, verdict=verdict, compile_s=compile_s)
        health_due = self.health.due(self.step + 1)
        grad_norms = self.health.before_update() if health_due else None
        self.optimizer.step()
        if self.moe is not None:
            self.moe.end_step(self.layout.all_sum if self.layout.distributed else None)
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(x.numel() for x, _ in batches) * self.layout.dp_size
        self.step += 1
        self.tokens += tokens
        if self.pruner is not None:  # pruned weights stay zero; the masks tighten on the cubic schedule
            pruned = self.pruner.after_step(self.step)
            if pruned is not None:
                self._emit("prune", **pruned)
        update_ratio = self.health.after_update() if health_due else None
        return StepResult(loss, grad_norm, lr, tokens, None, grad_norms, update_ratio, compile_s)

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over the micro-batches of one optimizer step, then clip; returns (loss, grad norm).

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
                set_grad_sync(self.model, i == len(batches) - 1)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                if self.distill is None:
                    loss = self.model(x, y, reduction="sum") / n_targets
                else:  # alpha * T^2 * KL to the teacher + (1 - alpha) * cross-entropy (train/distill.py)
                    loss = self.distill.loss(self.model, x, y) / n_targets
            # MoE balance losses train the routers but stay out of the logged loss
            objective = loss if self.moe is None else loss + self.moe.micro_batch_loss(i == 0, len(batches))
            for term in self.loss_terms:
                objective = objective + term() / len(batches)
            objective.backward()
            total += loss.detach()
        clip = self.cfg.train.grad_clip or math.inf
        if self.layout.ep > 1:  # experts' gradients to the data-parallel mean; their DTensors on a mesh of their own
            reduce_expert_grads(self.model, self.layout)
            grad_norm = clip_expert_parallel(self.model.parameters(), clip)
        elif self.layout.sharded:  # DTensor gradients: their norm is reduced over the shards
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

    def _first_compiled_step(self, batches: list) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
        """Run the first forward/backward through torch.compile, timing the compile; on failure fall back to
        eager. Returns (loss, grad norm) and the seconds it took."""
        self._compile_pending = False
        t0 = time.perf_counter()
        try:
            out = self.forward_backward(batches)
            seconds = time.perf_counter() - t0
            self._emit("compiled", seconds=round(seconds, 2))
            if self.layout.is_rank0:
                remember_compiled(self.compile.key, seconds)
            return out, seconds
        except Exception as e:  # noqa: BLE001 - any compiler failure: train on, uncompiled
            self.optimizer.zero_grad(set_to_none=True)
            remove_compile(self.model)  # compiled in place (inside DDP/FSDP2 hooks, which stay)
            self._emit("compile_failed", message=f"torch.compile failed ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); training continues without compile")
            return self.forward_backward(batches), time.perf_counter() - t0

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
                losses.append(self.model(x.to(self.device), y.to(self.device)).float())
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
                loss_sum = self.model(x, y, reduction="sum").float()
            row = torch.stack([loss_sum, (y != -100).sum().float()])
            stats.append(row / dp if whole else row)
        self.model.train()
        totals = self.layout.all_sum(torch.stack(stats))
        return (totals[:, 0] / totals[:, 1]).mean().item()

    @torch.no_grad()
    def masked_accuracy(self) -> float:
        """MLM: the share of the validation windows' masked tokens whose most likely token is the right one.
        Every rank scores every window (no collective), so all ranks agree."""
        self.model.eval()
        totals = torch.zeros(3, device=self.device)
        for x, y in self.val:
            with self._autocast():
                totals += masked_scores(self.model, x.to(self.device), y.to(self.device))
        self.model.train()
        return (totals[1] / totals[2]).item()

    def save_checkpoint(self) -> None:
        """Checkpoint now (in the background with checkpoint.async). A failed save is recorded
        and raised: earlier checkpoints stay intact and the run stops cleanly."""
        t0 = time.perf_counter()
        self.guard.reset_after_checkpoint()
        state = {"tokens": self.tokens, "loader": self.loader.state_dict(), "config_hash": self.cfg.hash(),
                 "val_loss": self.last_val_loss, "guard": self.guard.state_dict(),
                 "grad_health": self.health.state_dict(),
                 "window_loss": self.window_loss.item(), "window_steps": self.window_steps,
                 "energy": self.energy.state_dict()}
        failure = None
        with self._eval_weights():
            if self.cfg.checkpoint.format == "sharded":  # every rank writes its own shards (checkpoint/sharded.py)
                snap, failure = None, self._save_sharded(state)
            elif self.layout.distributed:  # every rank gathers; rank 0 gets the whole state and writes it
                snap = gather_snapshot(self.step, self.model, self.optimizer, state)
            else:
                snap = snapshot(self.step, self.model, self.optimizer, state)
        if snap is not None and self.cfg.finetune.lora_rank:  # the adapters alone, small enough to share
            snap.extra["adapters.safetensors"] = adapter_state_dict(snap.model)
        if snap is not None and self.pruner is not None:  # the masks, so a resumed run prunes the same weights
            snap.extra.update(self.pruner.state())
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
            self.checkpointer.save_sharded(self.step, self.model, self.optimizer, state)
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
        self.guard.record_intervention()
        if self.guard.too_many():
            self._emit("diverged", message=reason)
            raise TrainingDiverged(
                f"training diverged at step {self.step}: {reason}; {self.guard.interventions - 1} interventions "
                f"since the last checkpoint (guard.max_retries = {self.cfg.guard.max_retries}); "
                "lower optim.lr or raise optim.warmup_steps, then resume")
        if self.cfg.guard.policy == "rollback":
            self._wait_for_checkpoint()
            found = self.checkpointer.load_latest()
            if found is not None:
                path, snap, warnings = found
                self._emit("rollback", message=f"{reason}; back to {path.name}, skipping the data window",
                           checkpoint=path.name, from_step=self.step)
                self._load(snap, rollback=True)
                for w in warnings:
                    self._emit("checkpoint_damaged", message=f"{w}; using {path.name} instead")
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

    # ---- the run ---------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns a summary. SIGTERM/SIGINT stop at the next step boundary after
        saving a checkpoint (summary["stopped"] names the signal). The background workers (prefetch,
        checkpoint writer, power polling) are stopped on every way out, error and signal included."""
        total, record, sample = self.cfg.train.steps, {}, None
        with self._signals_caught():
            try:
                self._announce()
                self.model.train()
                self.meter.start_run()
                while self.step < total and self._stop_signal is None:
                    self.meter.step_starts()
                    batches = self._warmed_up(self.loader.next_step())
                    self.meter.data_ready()
                    result = self.train_step(batches)
                    if result.compile_s is not None:
                        self.meter.restart_clock()  # compile time is reported apart from step time
                    if result.skipped:
                        continue
                    last = self.step == total
                    eval_due = last or self._every(self.cfg.train.eval_every)
                    log_due = eval_due or result.grad_norms is not None or self._every(self.cfg.log.every)
                    self.window_loss += result.loss
                    self.window_steps += 1
                    self.meter.step_done(result.tokens)
                    if log_due:
                        record = self._log_step(result, eval_due)
                    else:
                        self.meter.stop_clock()
                    if last or self._every(self.cfg.checkpoint.every):
                        self.save_checkpoint()
                    if self.carbon is not None and log_due and not last:
                        self._carbon_pause()
                self._save_if_stopped()
                self._wait_for_checkpoint()
                with self._eval_weights():  # the same round trip whether or not a sample is drawn
                    sample = self.sample() if (self.step == total and self.cfg.train.sample_tokens
                                               and self.masker is None) else None  # an MLM encoder cannot write
            finally:
                self.close()
        return self._finish(record, sample)

    def _every(self, n: int) -> bool:
        """The step just taken is a multiple of `n` (0: never)."""
        return n > 0 and self.step % n == 0

    @contextlib.contextmanager
    def _signals_caught(self):
        """SIGTERM/SIGINT ask the loop to stop at the next step boundary (Python allows handlers in the main
        thread only); the previous handlers come back afterwards."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _announce(self) -> None:
        """The run's opening events; the carbon scheduler's clock starts here."""
        layout = {"parallel": self.layout.describe()} if self.layout.distributed else {}
        layout.update({"active_params": self.plan["active_params"]} if self.moe is not None else {})
        self._emit("start", total_steps=self.cfg.train.steps, params=self.plan["params"], device=str(self.device),
                   dtype=self.plan["dtype"], threads=self.plan["threads"], run_dir=str(self.run_dir), **layout,
                   **({"finetune": self.finetune} if self.finetune else {}))
        self._emit("compile", on=self.compile.on, message=self.compile.reason)
        if "mix" in self.plan:
            mix = self.plan["mix"]
            self._emit("mix", sources=mix, message="sources " + ", ".join(
                f"{n} weight {v['weight']:.3g} (~{v['epochs']:.3g} epochs of {v['train_tokens']:,} tokens)"
                for n, v in mix.items()) + f" over {self.cfg.train.steps} steps")
        if self.energy.enabled:
            self._emit("energy", **self.energy.describe())
        if self.carbon is not None:
            self.carbon.start(self.step)
        if self.cfg.quant.qat:
            self._emit("qat", layers=self.qat_layers, message=f"{self.qat_layers} linear layers fake-quantized "
                       f"({self.cfg.quant.qat}); `leantrain compress RUN --method convert` quantizes them for real")
        if self.cfg.precision.fp8:
            self._emit("fp8", layers=self.fp8_layers, message=self.fp8_skipped
                       or f"{self.fp8_layers} linear layers compute in float8")

    def _log_step(self, result: StepResult, eval_due: bool) -> dict[str, Any]:
        """The metrics line of the steps since the last one (with validation when due), handed to every
        observer. Every rank builds it (evaluation is collective); only rank 0 has observers."""
        # the mean loss of the steps since the last line; .item() syncs the device before the clock stops
        loss = (self.window_loss / self.window_steps).item()
        grad_norm = result.grad_norm.item()
        self.meter.stop_clock()
        record = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": result.lr, "grad_norm": grad_norm,
                  **self.meter.read()}
        if result.grad_norms is not None:
            record["grad_norms"], record["update_ratio"] = result.grad_norms, result.update_ratio
            warning = self.health.warn(grad_norm)
            if warning:
                self._emit("grad_warning", message=warning)
        if eval_due:
            with self._eval_weights():
                self.last_val_loss = record["val_loss"] = self.evaluate()
                if self.masker is not None:
                    record["val_masked_accuracy"] = self.masked_accuracy()
        if self.moe is not None:
            record.update(self.moe.metrics())
        if self.distill is not None:
            record.update(self.distill.metrics())
        record.update(self.energy.read(self.step))
        for o in self.observers:
            try:
                o.on_step(record)
            except StopRun as stop:  # an observer ends the run here, as a signal would (a pruned tune trial)
                self.request_stop(stop.reason)
        self.window_steps = 0
        self.window_loss.zero_()
        return record

    def _reprobe_peak(self) -> float:
        """Faster than the peak: the cached CPU probe ran on busy cores; measure again (the meter asks once,
        on rank 0 alone, whose records are the ones logged)."""
        self.peak_flops, _ = peak_flops(self.device, self.dtype, refresh=True)
        self._emit("peak_reprobed", peak_flops=self.peak_flops)
        return self.peak_flops

    def _save_if_stopped(self) -> None:
        """Stopped by a signal: make sure the step reached is checkpointed, and say so."""
        if self._stop_signal is None:
            return
        self._wait_for_checkpoint()
        if self._saved_step != self.step:
            self.save_checkpoint()
        self._emit("preempted", signal=self._stop_signal)

    def _finish(self, record: dict[str, Any], sample: str | None) -> dict[str, Any]:
        """The run's summary, as the closing event and to every observer."""
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

    def request_stop(self, reason: str = "SIGTERM") -> None:
        """Stop at the next step boundary after a checkpoint, as a signal would (one process; under torchrun
        the ranks agree through `_on_signal`)."""
        self._stop_signal = reason

    def close(self) -> None:
        """Stop every background worker this trainer started: a checkpoint write still in flight is waited for
        (its failure was raised already, or another error is on its way), the prefetch thread and the power
        poller are joined. Safe to call again; `fit` calls it on every way out, `with Trainer(...)` on leaving,
        so no native thread is alive at interpreter shutdown ("terminate called without an active exception")."""
        with contextlib.suppress(CheckpointError):
            self.checkpointer.wait()
        if isinstance(self.loader, Prefetcher):
            self.loader.close()
        self.energy.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        """Workers stopped, and the run directory free for the next trainer (fit's end frees it too)."""
        self.close()
        if self.run_lock is not None:
            self.run_lock.release()

    def _sample_prompt(self, tok: Any) -> tuple[str, list[int], int | None]:
        """(prompt shown, prompt ids, end id) of the end-of-run sample. Chat runs sample an answer: a user turn
        in the run's template plus the generation prompt, stopped at the end token; the user turn is
        train.sample_prompt, or, left at its code default, the first validation example's prompt."""
        prompt = self.cfg.train.sample_prompt
        template = self.data.chat_template
        if template is None:
            return prompt, tok.encode(prompt).ids, None
        if prompt == TrainConfig.sample_prompt:
            ids, masks = self.data.shards("val")[0], self.data.masks("val")
            answer = np.flatnonzero(masks[0][: min(len(ids), 1 << 16)]) if masks else []
            if len(answer):  # head + prompt + middle: exactly the ids this example trained with
                ids = ids[: int(answer[0])].astype(np.int64).tolist()
                return tok.decode(ids, skip_special_tokens=False), ids, self.data.eot_id
        from leantrain.tokens.chat import ChatEncoder

        ids = ChatEncoder(tok, template, eos=tok.id_to_token(self.data.eot_id)).encode_prompt(prompt)
        return tok.decode(ids, skip_special_tokens=False), ids, self.data.eot_id

    def sample(self) -> str | None:
        """Generate from the trained model and append the text to samples.txt (rank 0). Sharded weights
        need every rank in each forward, so under FSDP2 all ranks generate the same text."""
        if not (self.layout.is_rank0 or self.layout.sharded):
            return None
        tok = self.data.tokenizer()
        prompt, ids, eos = self._sample_prompt(tok)
        # a compiled model generates eagerly: every new length would be one more compile
        with self._autocast(), self._eager():
            new = generate(self.model, ids, self.cfg.train.sample_tokens, seed=self.cfg.train.seed,
                           eos_id=eos)
        text = prompt + tok.decode(new)
        if not self.layout.is_rank0:
            return None
        with open_append(self.run_dir / "samples.txt") as f:
            f.write(f"=== step {self.step} · prompt {prompt!r}\n{text}\n\n")
        return text
