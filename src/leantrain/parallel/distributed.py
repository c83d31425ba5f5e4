"""The process layout of a run: torch.distributed setup from torchrun's environment, and the DeviceMesh.

`torchrun` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK. Without it (or
with WORLD_SIZE=1) nothing here touches torch.distributed and a run is the plain single process.

The `[parallel]` degrees lay the world out as a mesh (dp_replicate, dp_shard, tp): dp_replicate > 1
alone is DDP, dp_shard > 1 is FSDP2 over the shard dimension, both is HSDP (FSDP2 on the 2-D mesh:
sharded inside a group, replicated across groups); tp > 1 is tensor parallel inside each data-parallel
group, alone or under FSDP2 (2-D FSDP x TP). Their product is the world size; dp_shard = -1 takes
whatever the others leave. tp is the innermost dimension: ranks r*tp .. r*tp+tp-1 form one tensor-parallel
group (on GPUs, neighbours on one host) and all of them read data-parallel rank r's batch.

Expert parallelism (ep > 1, MoE models) borrows from the data-parallel ranks rather than adding a mesh
dimension of its own: ranks r .. r+ep-1 (r a multiple of ep) form one expert group holding each MoE layer's
experts split over them, and the ranks with the same position in their group hold the same experts (the
second mesh `ep_mesh`, dims ("ep_replicate", "ep"); parallel/expert.py).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from leantrain.config import Config, ParallelConfig, TrainConfig
from leantrain.errors import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass
class Layout:
    """Where this process sits in the job. The single-process layout has world_size 1 and no mesh."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1
    ep: int = 1
    ep_mesh: Any = None  # DeviceMesh ("ep_replicate", "ep") when ep > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many ranks each read their own part of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        """The data-parallel rank: the tp ranks of one group share it (and so read the same batch)."""
        return self.rank // self.tp

    @property
    def strategy(self) -> str:
        if self.dp_shard > 1:
            dp = "hsdp" if self.dp_replicate > 1 else "fsdp"
        else:
            dp = "ddp" if self.dp_replicate > 1 else ""
        if self.tp > 1:
            return f"{dp}+tp" if dp else "tp"
        if self.ep > 1:
            return f"{dp}+ep" if dp else "ep"
        return dp or "single"

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP2/HSDP shards, tensor-parallel pieces): every rank must join each forward."""
        return self.dp_shard > 1 or self.tp > 1 or self.ep > 1

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "strategy": self.strategy, "dp_replicate": self.dp_replicate,
                "dp_shard": self.dp_shard, "tp": self.tp, "ep": self.ep}

    # ---- small collectives; no-ops (identity) in a single process ----------------------------

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks, in place (returns it)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank (also a barrier)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_degrees(p: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(dp_replicate, dp_shard, tp) for this world size; a ConfigError when they cannot fit it."""
    rep, shard, tp = p.dp_replicate, p.dp_shard, p.tp
    if shard == -1:
        if world_size % (rep * tp):
            raise ConfigError(f"config: parallel.dp_replicate = {rep} x parallel.tp = {tp} does not divide the "
                              f"world size {world_size}; pick degrees whose product is the number of processes")
        shard = world_size // (rep * tp)
    if rep * shard * tp != world_size:
        raise ConfigError(f"config: parallel.dp_replicate = {rep} x parallel.dp_shard = {shard} x parallel.tp = "
                          f"{tp} = {rep * shard * tp} processes, but the world size is {world_size}; make the "
                          "product equal the number of processes (dp_shard = -1 takes the rest)")
    return rep, shard, tp


def grad_accum_steps(train: TrainConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank: train.grad_accum_steps, or, with
    train.global_batch_size set, the number that makes micro_batch_size x it x dp_size that global batch, so
    a run restarted at another world size (an elastic run that lost a node) keeps its batch and loss curve."""
    if not train.global_batch_size:
        return train.grad_accum_steps
    per_pass = train.micro_batch_size * dp_size
    if train.global_batch_size % per_pass:
        raise ConfigError(f"config: train.global_batch_size = {train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size = {train.micro_batch_size} x {dp_size} data-parallel processes = "
                          f"{per_pass}; pick a global batch every world size the run may have divides, or lower "
                          "train.micro_batch_size")
    return train.global_batch_size // per_pass


def check_ep(p: ParallelConfig, world_size: int) -> None:
    """A ConfigError when parallel.ep cannot split this world size into expert groups."""
    if world_size % p.ep:
        raise ConfigError(f"config: parallel.ep = {p.ep} does not divide the world size {world_size}; expert "
                          "parallelism splits the experts over ep of the data-parallel processes: launch a multiple "
                          f"of {p.ep} processes (torchrun --nproc-per-node) or lower parallel.ep")


_MESHES: dict[tuple, Any] = {}


def setup(cfg: Config, device: torch.device) -> Layout:
    """The layout of this process; under torchrun (WORLD_SIZE > 1) also the process group and the mesh.

    `device` is the one train.device names; under torchrun a bare `cuda` becomes cuda:LOCAL_RANK
    (`layout.device`). Safe to call again in the same process: the group is made once, the mesh reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rep, shard, tp = resolve_degrees(cfg.parallel, world)
    grad_accum_steps(cfg.train, rep * shard)  # a global batch this world cannot split: refused before any work
    check_ep(cfg.parallel, world)
    if world == 1:
        return Layout(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"config: parallel.backend = 'nccl' needs CUDA devices but train.device is {device}; "
                          "use parallel.backend = gloo (or auto)")
    if not dist.is_initialized():
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        # torchrun --max-restarts reuses its rendezvous store for a restarted group: keys the group
        # before it left (the addresses of dead ranks) would be read as this group's, so each
        # attempt gets keys of its own
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"leantrain/attempt-{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh

    key = (device.type, rep, shard, tp)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device.type, (rep, shard, tp), mesh_dim_names=MESH_DIMS)
    ep, ep_key = cfg.parallel.ep, ("ep", device.type, cfg.parallel.ep)
    if ep > 1 and ep_key not in _MESHES:
        _MESHES[ep_key] = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("ep_replicate", "ep"))
    return Layout(device=device, world_size=world, rank=rank, local_rank=local_rank, local_world_size=local_world,
                  dp_replicate=rep, dp_shard=shard, tp=tp, mesh=_MESHES[key], ep=ep, ep_mesh=_MESHES.get(ep_key))


def collective_timeout_message(exc: BaseException, rank: int, timeout_s: int) -> str | None:
    """One line for a collective that gave up waiting (gloo raises it as a RuntimeError), else None.

    A peer that hangs or died without its process being reaped leaves the others blocked in their next
    all-reduce until `parallel.timeout_s`; the error torch raises then names a C++ source line, not the
    cause. (NCCL's watchdog aborts the process itself, with its own log lines.)"""
    text = str(exc).lower()
    if not isinstance(exc, RuntimeError) or not ("timed out" in text or "timeout" in text):
        return None
    return (f"rank {rank}: a collective waited longer than parallel.timeout_s={timeout_s} s — another rank is "
            "stuck or dead; check its log (raise parallel.timeout_s if a rank legitimately works that long alone)")


def cleanup(together: bool = False) -> None:
    """Tear the process group down at the end of a run (a no-op when there is none). `together` (after a
    run every rank finished) first waits for all ranks: a rank closing its connections while a peer
    still uses them can make that peer abort."""
    _MESHES.clear()
    # Free the run's DTensors, meshes and subgroups now, while the process group and the C++ runtime are
    # whole: left to interpreter teardown they were destroyed in random order, and a rank sometimes
    # aborted at exit ("terminate called without an active exception").
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
