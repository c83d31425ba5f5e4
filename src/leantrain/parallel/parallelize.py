"""Apply execution strategies to a plain model from outside it.

Order (DESIGN.md): tensor parallel -> expert parallel -> activation checkpointing -> compile -> FSDP2/DDP. None of
them changes parameter names, so checkpoints do not depend on how a run executed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from leantrain.config import Config, compile_mode
from leantrain.device import choose_attention
from leantrain.errors import ConfigError
from leantrain.model.transformer import Attention
from leantrain.parallel.distributed import Layout
from leantrain.parallel.expert import apply_expert_parallel, expert_params


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Recompute block activations in the backward pass instead of keeping them; returns blocks wrapped.

    `full` wraps every block of `model.layers`; `selective` wraps every `every`-th one, trading
    part of the memory saving for less recomputation. The block's `forward` is wrapped on the
    instance, so module and parameter names stay those of the plain model.
    """
    if mode == "none":
        return 0
    wrapped = 0
    for i, block in enumerate(model.layers):
        if mode == "full" or (mode == "selective" and i % every == 0):
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            wrapped += 1
    return wrapped


def set_attention_kernel(model: nn.Module, kernel: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel


def _replicate_style() -> object:
    """A ParallelStyle that keeps a module whole on every tensor-parallel rank, its parameters made
    Replicate DTensors: all parameters then live on the one tp mesh (the fused optimizer and the
    gradient norm take no mix of plain tensors and DTensors), while its input and output stay plain
    tensors. Used for the norms, which are too small to be worth splitting."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class ReplicateParallel(ParallelStyle):
        def _apply(self, module: nn.Module, device_mesh: object) -> nn.Module:
            def to_dtensor(mod: nn.Module, inputs: tuple, mesh: object) -> tuple:
                return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                             if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

            def to_local(mod: nn.Module, output: torch.Tensor, mesh: object) -> torch.Tensor:
                return output.to_local() if isinstance(output, DTensor) else output

            return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=to_local)

    return ReplicateParallel()


def apply_tensor_parallel(model: nn.Module, layout: Layout) -> None:
    """Megatron-style tensor parallel over the "tp" mesh dimension, in place.

    Per block: wq/wk/wv and w1/w3 column-wise (each rank computes its own heads and hidden units),
    wo and w2 row-wise (their partial outputs are summed by one all-reduce), so a block costs two
    all-reduces forward and two backward. The embedding is split by vocabulary rows and the output
    projection by vocabulary columns, both handing plain replicated activations on (the sliced loss in
    the model stays unchanged); norms are replicated. Every attention module gets its local head
    counts, so the model's own reshapes see its share of heads. The residual stream stays a plain
    tensor, the same on every tp rank; the data loader gives all of them the same batch.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh, tp = layout.mesh["tp"], layout.tp
    if hasattr(model, "pos_embeddings"):
        raise ConfigError(f"config: parallel.tp = {tp} supports model.arch = llama only (GPT-2's position table is "
                          "read outside a module call); use parallel.tp = 1 and scale with dp_shard")
    replicate = _replicate_style()
    top = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
           "norm": replicate, "output": ColwiseParallel(output_layouts=Replicate())}
    _check_plain_linears(model, ("tok_embeddings", "output"), tp)
    parallelize_module(model, mesh, top)
    for block in model.layers:
        plan = {"attention_norm": replicate, "ffn_norm": replicate,
                "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        if hasattr(block.feed_forward, "w3"):
            plan["feed_forward.w3"] = ColwiseParallel()
        _check_plain_linears(block, [name for name, style in plan.items() if style is not replicate], tp)
        parallelize_module(block, mesh, plan)
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp


def _check_plain_linears(root: nn.Module, names: Iterable[str], tp: int) -> None:
    """Column/row-wise splitting knows nn.Linear and nn.Embedding; a layer another feature replaced
    (LoRA adapters, float8) would be split wrongly or not at all: refuse it by name."""
    for name in names:
        module = root.get_submodule(name)
        if type(module) not in (nn.Linear, nn.Embedding):
            raise ConfigError(f"config: parallel.tp = {tp} splits plain Linear layers, but {name} is a "
                              f"{type(module).__name__}; turn off LoRA / precision.fp8 or use parallel.tp = 1")


def apply_compile(model: nn.Module) -> None:
    """With more than one process, compile each block in place (as torchtitan does) rather than the whole
    model: FSDP2 and DDP then wrap compiled blocks and run their own communication between them, and
    module and parameter names stay those of the plain model."""
    for block in model.layers:
        block.compile()


def remove_compile(model: nn.Module) -> None:
    """Undo `apply_compile` or the single process's whole-model `model.compile()` (after a compiler failure):
    the model runs eagerly again, wrappers untouched."""
    model._compiled_call_impl = None
    for block in model.layers:
        block._compiled_call_impl = None


def apply_fsdp(model: nn.Module, layout: Layout, reshard_after_forward: bool,
               dtype: torch.dtype = torch.float32) -> None:
    """FSDP2 in place: each block of `model.layers` is one unit (its weights gathered just before it runs),
    the root holds the rest (embeddings, final norm, output). On a (replicate, shard) mesh with
    dp_replicate > 1 this is HSDP. Parameters become DTensor shards under the same names; after tensor
    parallel they become 2-D (dp_shard, tp) DTensors.

    Under bf16 a MixedPrecisionPolicy gathers the weights as bf16 (half the all-gather) and reduces
    gradients in fp32 onto the fp32 shards: the bf16 copy of a block lives only while the block runs (and
    again in its backward), where autocast's casts of gathered fp32 weights were kept for the whole step.
    As in torchtitan, block inputs are cast to bf16 too, so the residual stream between blocks is bf16
    (fp32 under autocast alone); fp32 runs take no policy and are unchanged.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = layout.mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else layout.mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    ignored = set(expert_params(model)) or None  # expert parallel: each rank holds its own experts already
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                    ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy,
                ignored_params=ignored)


def apply_ddp(model: nn.Module, layout: Layout) -> None:
    """DDP in place (torch's composable `replicate`: the DDP reducer, driven by hooks on `model`), so `model`
    stays the one handle, with its own names; gradients are all-reduced over the dp_replicate ranks."""
    from torch.distributed._composable.replicate import replicate

    # the only buffer (rope) is a function of the config, identical everywhere: nothing to broadcast
    kwargs: dict = {"broadcast_buffers": False}
    if layout.device.type == "cuda":
        kwargs["device_id"] = layout.device
    if layout.tp > 1:  # 2-D: the tensor-parallel DTensor parameters are rebuilt around each forward
        kwargs["device_mesh"] = layout.mesh["dp_replicate"]
    else:
        kwargs["process_group"] = layout.mesh["dp_replicate"].get_group()
    replicate(model, **kwargs)
    # build the reducer now, on all ranks together (it broadcasts rank 0's weights), not in the first forward,
    # which may run on rank 0 alone (the end-of-run sample of a resumed, finished run)
    replicate.state(model).lazy_init()


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn the gradient all-reduce / reduce-scatter off for all but the last micro-batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # DDP (replicate) and FSDP2
        model.set_requires_gradient_sync(enabled)


def parallelize(model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                layout: Layout | None = None, attention: str | None = None, compile: bool | None = None) -> nn.Module:
    """Lay `model` out in place and return it: there is one handle, whose state-dict names stay those of
    the plain model.

    With a distributed `layout`: tensor parallel (tp > 1) splits `model`'s layers first; then FSDP2 (or
    HSDP) shards it when dp_shard > 1, or DDP (`replicate`) hooks its gradient all-reduce on when
    dp_replicate > 1 alone. One process compiles the whole model in place (`model.compile()`). `compile` is
    the trainer's decision (train.compile = auto resolved); None reads train.compile = true as on.
    """
    if compile is None:
        compile = compile_mode(cfg.train.compile) == "true"
    # the kernel leantrain.device chose (the trainer passes its DeviceInfo's); else the same rule here
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    set_attention_kernel(model, attention or choose_attention(cfg.train.attention, device.type, dtype_name,
                                                              cfg.model.seq_len))
    if layout is not None and layout.tp > 1:
        apply_tensor_parallel(model, layout)
    if layout is not None and layout.ep > 1:
        apply_expert_parallel(model, layout)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if layout is None or not layout.distributed:
        if compile:
            model.compile()
        return model
    if compile:
        if layout.tp > 1:  # dynamo fails on the DTensor hooks (torch 2.13, CPU); the step would fall back anyway
            raise ConfigError(f"config: train.compile = true does not work with parallel.tp = {layout.tp} yet; "
                              "set --train.compile=false")
        apply_compile(model)
    if layout.dp_shard > 1:
        apply_fsdp(model, layout, cfg.parallel.fsdp_reshard_after_forward, dtype)
        return model
    if layout.dp_replicate > 1:
        apply_ddp(model, layout)
    return model  # tensor parallel alone: the tp ranks need no gradient reduction of their own
