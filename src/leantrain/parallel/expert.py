"""Expert parallelism: each MoE layer's experts split over `ep` ranks, tokens sent to their experts and back.

Expert parallelism borrows from data parallelism (as torchtitan's "ep borrows from dp_shard"): the ranks of an
expert group each read their own data, route their tokens, and send every (token, expert) assignment to the
rank that holds the expert with one all-to-all (the per-expert counts go first, so each rank knows how many
rows it receives); the owner runs its experts as one grouped matmul over all the rows it got, and a second
all-to-all brings the outputs home, where they are gated and summed exactly as in one process. Gradients go
back along the same path (`_AllToAll` swaps the split sizes in backward).

Parameters: the experts' w1/w3/w2 [experts, in, out] become DTensors sharded on dim 0 over the "ep" mesh
dimension (rank i holds experts i*E/ep .. (i+1)*E/ep-1). Their names do not change, and
torch.distributed.checkpoint's state-dict functions gather and scatter them like FSDP2's shards, so full and
sharded checkpoints hold the whole experts and resume at any layout. FSDP2 shards everything else (the
experts are its ignored parameters).

Gradients: an expert's gradient already sums the contributions of every rank's tokens that reached it,
where FSDP2 would average over the data-parallel ranks: `reduce_expert_grads` divides it by the
data-parallel degree and, when ep is smaller than the world, sums it over the ranks that hold the same
experts ("ep_replicate"). The Switch balance loss uses the load of the global batch (`global_load`), so
two ranks train exactly what one process does on the same global batch (tests/test_moe_ep.py).

Collectives: `all_to_all_single` runs on gloo (CPU, uneven splits included) and NCCL alike.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from leantrain.model.moe import MoEFeedForward, swiglu_experts
from leantrain.parallel.distributed import Layout

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class _AllToAll(torch.autograd.Function):
    """Rows x[sum(in_splits), ...] scattered to the group's ranks (in_splits[j] rows to rank j), gathered
    from them (out_splits[j] rows from rank j); backward sends the gradients the way the rows came."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class ExpertDispatch:
    """A MoE layer's expert compute when its experts live on the ranks of `group` (set as the layer's
    `expert_parallel`): called with the rows sorted by expert, returns their outputs in the same order."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup, data_group: dist.ProcessGroup | None) -> None:
        self.group, self.data_group = group, data_group
        self.size = dist.get_world_size(group)
        self.local = n_experts // self.size

    def global_load(self, counts: Tensor, assignments: int) -> Tensor:
        """Each expert's share of all the assignments of the data-parallel ranks' micro-batches together."""
        both = torch.cat([counts.float(), counts.new_tensor([float(assignments)], dtype=torch.float32)])
        dist.all_reduce(both, group=self.data_group)
        return both[:-1] / both[-1]

    def __call__(self, x: Tensor, index: Tensor, counts: Tensor, weights: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ep, local = self.size, self.local
        sent = counts.to(torch.int64)  # rows per global expert; rank j's experts are a contiguous run
        got = torch.empty_like(sent)
        dist.all_to_all_single(got, sent, group=self.group)  # got[i * local + e]: rows from rank i for my expert e
        send_splits = sent.view(ep, local).sum(1).tolist()
        got = got.view(ep, local)
        recv_splits = got.sum(1).tolist()
        rows = _AllToAll.apply(x[index], recv_splits, send_splits, self.group)
        # the rows arrive by source rank, then by expert: regroup them by expert for one grouped matmul
        expert_of = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(ep), got.reshape(-1))
        order = torch.argsort(expert_of, stable=True)
        w = tuple(p.to_local() if hasattr(p, "to_local") else p for p in weights)
        ys = swiglu_experts(rows, order, expert_of[order], got.sum(0), rows.size(0), w)
        return _AllToAll.apply(ys[torch.argsort(order)], send_splits, recv_splits, self.group)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def apply_expert_parallel(model: nn.Module, layout: Layout) -> int:
    """Keep this rank's experts of every MoE layer (as DTensors sharded over the "ep" mesh dimension) and hook
    the all-to-all dispatch in; in place, before FSDP2. Returns the number of MoE layers."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = layout.ep_mesh["ep"]
    rank, ep = mesh.get_local_rank(), layout.ep
    data_group = None if layout.tp == 1 else layout.mesh["dp_replicate", "dp_shard"].get_group()
    layers = moe_layers(model)
    for moe in layers:
        local = moe.n_experts // ep
        for name in EXPERT_WEIGHTS:
            full = getattr(moe, name)
            mine = full.detach()[rank * local:(rank + 1) * local].clone()
            setattr(moe, name, nn.Parameter(DTensor.from_local(mine, mesh, [Shard(0)], run_check=False),
                                            requires_grad=full.requires_grad))
        moe.expert_parallel = ExpertDispatch(moe.n_experts, mesh.get_group(), data_group)
    return len(layers)


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights expert parallelism split (none when it is off), in model order (the same on every
    rank: their collectives pair up by order): FSDP2 leaves them alone."""
    return [getattr(m, name) for m in moe_layers(model) if m.expert_parallel is not None for name in EXPERT_WEIGHTS]


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, layout: Layout) -> None:
    """After the step's backward: turn each expert's summed gradient into the data-parallel mean FSDP2 gives
    the other parameters (sum over the ranks holding the same experts, divide by the data-parallel degree)."""
    if layout.ep <= 1:
        return
    replicas = layout.ep_mesh["ep_replicate"]
    for p in expert_params(model):
        if p.grad is None:
            continue
        g = p.grad.to_local()
        if replicas.size() > 1:
            dist.all_reduce(g, group=replicas.get_group())
        g.div_(layout.dp_size)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over gradients that are DTensors on different meshes (the experts on
    the "ep" mesh, the rest on FSDP2's): one norm per mesh, combined, then every gradient scaled by it."""
    groups: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        squares.append(norm.float().square())
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
