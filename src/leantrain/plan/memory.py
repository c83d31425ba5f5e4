"""Peak memory of one training process, from the config alone, for a given layout.

The model mirrors what leantrain's trainer actually keeps alive, term by term, so that the estimate
can be checked against a measured run (tests/test_plan.py, bench/plan_accuracy.py):

- weights, gradients and optimizer state in fp32 (4 + 4 + 8 bytes per parameter with AdamW; fp32 master
  weights also under bf16 autocast), divided by the shard degree under FSDP2 and by tp under tensor parallel;
  a mixture-of-experts model holds all its experts (total parameters; its FLOPs count the active ones), and
  under expert parallelism (ep > 1) each rank holds experts / ep of them, which FSDP2 does not shard further;
- under bf16 autocast, the bf16 copy of every matmul weight, which autograd keeps for the backward
  pass (2 bytes per matmul parameter); under FSDP2 the bf16 MixedPrecisionPolicy gathers bf16 weights
  instead, so these copies exist only for the blocks in flight (all blocks when they are not resharded
  after forward) and the always-gathered root (embeddings, output) and count under `fsdp_gathered`;
- the activations autograd saves, per token and block, counted from the saved tensors of
  `model/transformer.py` (checked with saved_tensors_hooks): RMSNorm keeps its fp32 input and output,
  every linear its (cast) input, SwiGLU three hidden-width tensors, attention q/k/v/logsumexp (SDPA) or
  q/k/v and the [T, T] probabilities (the matmul kernel); the loss keeps the fp32 log-probabilities
  of every position (4 x vocab bytes per token) although it computes them in slices;
- temporaries: the logits slices of the loss, the [B, H, T, T] scores of the matmul kernel, the
  gradient buckets of DDP, the gathered blocks of FSDP2;
- on CPU the peak resident set also holds the torch runtime itself and memory the allocator keeps after
  frees: CPU_RUNTIME_BYTES and CPU_ALLOCATOR_FACTOR, fitted to measured runs (bench/plan_accuracy.py).

The peak is taken at the start of the backward pass (all activations saved, the first gradients
allocated) or at the optimizer step (all gradients), whichever is higher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from leantrain.config import ModelConfig
from leantrain.model.flops import ffn_hidden_dim, head_size, is_moe_layer, moe_hidden_dim, param_count

LOSS_CHUNK_ELEMENTS = 1 << 22  # as model/transformer.py: logits scored per slice
# A CPU process's peak RSS = CPU_RUNTIME_BYTES (torch, leantrain, the dataset and tokenizer, thread pools)
# + CPU_ALLOCATOR_FACTOR x the modelled tensors (glibc malloc keeps freed chunks of earlier phases mapped).
# Least-squares fit to 7 measured runs, from the tests' 2x64 model to the small recipe (bench/plan_accuracy.py
# --runtime; docs/plan.md): worst error 7%.
CPU_RUNTIME_BYTES = 320 * 1024**2
CPU_ALLOCATOR_FACTOR = 1.4


@dataclass(frozen=True)
class Layout:
    """How one run executes: data-parallel degrees, tensor parallel, activation checkpointing, precision."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ac: str = "none"  # none, full, selective
    ac_every: int = 2
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    dtype: str = "bf16"  # bf16 (autocast over fp32 weights) or fp32
    attention: str = "sdpa"  # sdpa or matmul
    reshard_after_forward: bool = True
    ep: int = 1  # expert parallel (MoE): experts split over ep of the data-parallel ranks

    @property
    def devices(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def strategy(self) -> str:
        """A short name: single, DDP, FSDP2, HSDP, each + TP, + AC."""
        if self.dp_shard > 1:
            name = "HSDP" if self.dp_replicate > 1 else "FSDP2"
        elif self.dp_replicate > 1:
            name = "DDP"
        else:
            name = "single"
        if self.tp > 1:
            name = f"TP{self.tp}" if name == "single" else f"{name}+TP{self.tp}"
        if self.ep > 1:
            name += f"+EP{self.ep}"
        if self.ac != "none":
            name += f" + AC {self.ac}" + (f"/{self.ac_every}" if self.ac == "selective" else "")
        return name


def wrapped_blocks(n_layers: int, ac: str, every: int) -> int:
    """Blocks that activation checkpointing recomputes (as parallel.apply_activation_checkpointing)."""
    if ac == "full":
        return n_layers
    if ac == "selective":
        return len(range(0, n_layers, every))
    return 0


def block_params(m: ModelConfig) -> int:
    """Parameters of one block (as model/flops.py counts them)."""
    return (param_count(m) - _outside_blocks(m)) // m.n_layers


def _outside_blocks(m: ModelConfig) -> int:
    """Embeddings, output projection, final norm (and GPT-2's position table and norm bias)."""
    embed = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
    return embed + (m.seq_len * m.dim + 2 * m.dim if m.arch == "gpt2" else m.dim)


def routed_expert_params(m: ModelConfig) -> int:
    """The routed experts' weights (w1, w3, w2 of every MoE layer): what expert parallelism splits."""
    n_moe = sum(is_moe_layer(m, i) for i in range(m.n_layers))
    return n_moe * 3 * m.dim * moe_hidden_dim(m) * m.moe_experts if n_moe else 0


def block_matmul_params(m: ModelConfig) -> int:
    q_dim, kv_dim = m.n_heads * head_size(m), m.n_kv_heads * head_size(m)
    return 2 * m.dim * q_dim + 2 * m.dim * kv_dim + (2 if m.arch == "gpt2" else 3) * m.dim * ffn_hidden_dim(m)


# optimizer state bytes per parameter (fp32 states): AdamW/LAMB exp_avg + exp_avg_sq, Lion one momentum,
# schedule-free AdamW z + exp_avg_sq; Muon one momentum on the block matrices and AdamW on the rest
OPTIMIZER_BYTES = {"adamw": 8, "lamb": 8, "lion": 4, "schedule_free_adamw": 8, "muon": 8}


def block_activation_bytes(m: ModelConfig, dtype: str, attention: str, tp: int = 1) -> float:
    """Bytes autograd saves per token in one block (see the module docstring)."""
    d, f, h = m.dim, ffn_hidden_dim(m), m.n_heads
    q_dim, kv_dim = h * head_size(m), m.n_kv_heads * head_size(m)
    a = 2 if dtype == "bf16" else 4
    gpt2 = m.arch == "gpt2"
    # fp32 residual stream: RMSNorm keeps its input and output (+ rstd); LayerNorm its input (+ mean, rstd)
    norms = 2 * (4 * d + 8) if gpt2 else 2 * (8 * d + 4)
    # inputs of wq/wk/wv and w1(/w3): one shared fp32 tensor each, or one bf16 cast per linear
    # (replicated under tensor parallel without sequence parallel)
    up = 1 if gpt2 else 2
    inputs = (3 * 2 * d + up * 2 * d) if dtype == "bf16" else (4 * d + 4 * d)
    if attention == "matmul":  # q, k, v (GQA repeated to all heads), and the probabilities
        attn = 3 * a * q_dim + a * h * m.seq_len
    else:  # q, k, v and the fp32 logsumexp (the output is wo's input, counted below)
        attn = a * q_dim + 2 * a * kv_dim + 4 * h
    if m.arch == "qwen3":  # the per-head q/k norms keep their inputs and outputs
        attn += 2 * a * (q_dim + kv_dim)
    wo_in = a * q_dim
    ffn = (2 if gpt2 else 4) * a * f  # SwiGLU: w1 out, w3 out, silu(w1 out), w2 input; GELU: w1 out, w2 input
    return norms + inputs + (attn + wo_in + ffn) / tp


def head_activation_bytes(m: ModelConfig, dtype: str, tp: int = 1) -> float:
    """Bytes autograd saves per token outside the blocks: ids, final norm, output input, fp32 log-probs."""
    a = 2 if dtype == "bf16" else 4
    return 8 + (8 * m.dim + 4) + a * m.dim + 4 * m.vocab_size / tp


def estimate_memory(m: ModelConfig, layout: Layout, *, cpu: bool = False, checkpoint_snapshot: bool = False,
                    optimizer: str = "adamw") -> dict[str, Any]:
    """Peak bytes of one rank, by component, plus "total" and the phase of the peak.

    `cpu` adds the runtime baseline of a CPU process; `checkpoint_snapshot` the in-memory copy of weights
    and AdamW state a checkpoint takes (the phase that wins for small models trained with checkpoints).
    """
    lay = layout
    n = param_count(m)
    p_block = block_params(m)
    p_embed = n - m.n_layers * p_block  # embeddings, output projection, final norm
    mm_block = block_matmul_params(m)
    mm_params = m.n_layers * mm_block + m.vocab_size * m.dim  # matmul weights
    opt_bytes = OPTIMIZER_BYTES.get(optimizer, 8) * n
    if optimizer == "muon":
        opt_bytes -= 4 * m.n_layers * mm_block
    shard = lay.dp_shard
    local = (m.n_layers * p_block + p_embed) / lay.tp  # parameters this rank holds before FSDP
    experts = routed_expert_params(m) if lay.ep > 1 else 0  # split by ep, not by FSDP2
    held = (local - experts) / shard + experts / lay.ep  # parameters this rank holds
    state = {
        "weights": 4 * held,
        "optimizer": opt_bytes / n * held if n else 0.0,
    }
    grads_all = 4 * held
    p_block -= experts // m.n_layers  # what FSDP2 gathers of a block
    tokens = lay.micro_batch_size * m.seq_len
    a = 2 if lay.dtype == "bf16" else 4
    wrapped = wrapped_blocks(m.n_layers, lay.ac, lay.ac_every)
    per_block = block_activation_bytes(m, lay.dtype, lay.attention, lay.tp)
    kept = (m.n_layers - wrapped) * per_block + wrapped * 4 * m.dim  # a wrapped block keeps its input
    recompute = per_block if wrapped else 0.0  # one block's activations rebuilt at a time in backward
    head = head_activation_bytes(m, lay.dtype, lay.tp)
    activations = tokens * (kept + recompute + head)
    # bf16 copies of the matmul weights autograd keeps (those inside recomputed blocks are rebuilt)
    casts = 0.0
    mixed_fsdp = lay.dtype == "bf16" and shard > 1  # parallel.apply_fsdp's bf16 MixedPrecisionPolicy
    if lay.dtype == "bf16" and not mixed_fsdp:
        casts = 2 * (mm_params - wrapped * mm_block) / lay.tp
        casts += 2 * mm_block / lay.tp if wrapped else 0.0
    rows = max(1, LOSS_CHUNK_ELEMENTS // m.vocab_size)
    logits_tmp = 3 * 4 * min(rows, tokens) * m.vocab_size / lay.tp  # slice logits, their grad, the log-softmax grad
    attn_tmp = 0.0
    if lay.attention == "matmul":  # scores before softmax, and their gradient in backward
        attn_tmp = 2 * a * lay.micro_batch_size * m.n_heads * m.seq_len**2 / lay.tp
    temporaries = max(logits_tmp, attn_tmp)
    gathered = 0.0
    if mixed_fsdp:  # bf16 root and blocks in flight (or every block, kept after forward); bf16 + fp32 grad
        in_flight = 2 if lay.reshard_after_forward else m.n_layers
        gathered = (2 * p_embed + in_flight * 2 * p_block + (2 + 4) * p_block) / lay.tp
    elif shard > 1:  # FSDP2: the root unit stays gathered; two blocks in flight (current + prefetch)
        gathered = 4 * p_embed / lay.tp + 2 * 4 * p_block / lay.tp + 4 * p_block / lay.tp  # + one unsharded grad
    buckets = grads_all if (lay.dp_replicate > 1 and shard == 1) else 0.0  # DDP's flat gradient buckets
    out_grad = 4 * m.vocab_size * m.dim / lay.tp / shard
    live_grads = grads_all if lay.grad_accum_steps > 1 else out_grad
    phases = {  # what comes on top of weights and optimizer state at each candidate peak
        "backward": {"gradients": live_grads, "weight_casts": casts, "activations": activations,
                     "temporaries": temporaries},
        "optimizer": {"gradients": grads_all, "temporaries": grads_all / 4},  # + foreach temporaries
        "checkpoint": {"snapshot": 4 * n + opt_bytes if checkpoint_snapshot else 0.0},
    }
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    comp = {**state, "gradients": 0.0, "weight_casts": 0.0, "activations": 0.0, "temporaries": 0.0, "snapshot": 0.0,
            **phases[phase], "fsdp_gathered": gathered, "ddp_buckets": buckets,
            "runtime": CPU_RUNTIME_BYTES if cpu else 0.0}
    if cpu:
        comp["allocator_slack"] = (CPU_ALLOCATOR_FACTOR - 1) * (sum(comp.values()) - CPU_RUNTIME_BYTES)
    comp["total"] = sum(comp.values())
    comp["activations_per_token"] = kept + recompute + head
    comp["peak_phase"] = phase  # type: ignore[assignment]
    return comp


def layout_dict(layout: Layout) -> dict:
    return {**asdict(layout), "strategy": layout.strategy, "devices": layout.devices}
