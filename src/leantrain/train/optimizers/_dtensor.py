"""The few DTensor helpers the optimizers need, so each works on plain tensors and FSDP2 shards alike."""

from __future__ import annotations

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage, so in-place ops update it); a plain tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def full(t_local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose local shard is `t_local`, laid out like the DTensor `like` (all-gather)."""
    if not is_dtensor(like):
        return t_local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t_local, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride()).full_tensor()


def shard(t_full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a whole tensor every rank holds, laid out like the DTensor `like` (no communication)."""
    if not is_dtensor(like):
        return t_full
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(t_full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


def full_norm(t_local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """L2 norm of the whole tensor from its local shard: the shards' squared sums all-reduced."""
    sq = t_local.float().pow(2).sum()
    if is_dtensor(like):
        import torch.distributed as dist

        # every mesh dim that shards this tensor holds a part of the sum; replicated dims hold copies
        for dim, placement in enumerate(like.placements):
            if placement.is_shard():
                dist.all_reduce(sq, group=like.device_mesh.get_group(dim))
    return sq.sqrt()


def adam_moments(state: dict, p: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, ...]:
    """Advance Adam's moments of `p` by its gradient (LAMB and Muon's AdamW groups share this);
    returns the local (weight, first moment, second moment) and the step count."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    g = local(p.grad)
    m, v = local(state["exp_avg"]), local(state["exp_avg_sq"])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return local(p), m, v, state["step"]
