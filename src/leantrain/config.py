"""Run configuration: one dataclass per TOML section, recipes, dotted overrides, validation.

Resolution order, later wins: field defaults < recipe < TOML file < `--section.field=value`.
Every check happens here, before any work starts, so a typo never costs a training run.
This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError


def _f(default: Any, help: str, *, min: float | None = None, max: float | None = None,
       choices: tuple | None = None, min_exclusive: bool = False, key: str | None = None,
       allowed: str | None = None) -> Any:
    """A config field with its documentation and the values it allows.

    `key` is the TOML name when it cannot be the Python name (`checkpoint.async`); `allowed` replaces
    the generated description of the allowed values when the range alone would mislead.
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive, "key": key,
            "allowed": allowed}
    return field(default=default, metadata=meta)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


COMPILE_MODES = ("auto", "true", "false")


def compile_mode(value: Any) -> str:
    """train.compile as one of COMPILE_MODES; a Python caller may also set it to True or False."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


# model.arch values; all but gpt2 are the Llama block with the differences model/transformer.py names
ARCHS = ("llama", "gpt2", "mistral", "qwen2", "qwen3", "phi3")
SLIDING_WINDOW_ARCHS = ("mistral", "phi3")


@dataclass
class ModelConfig:
    n_layers: int = _f(4, "transformer blocks", min=1, max=4096)
    dim: int = _f(256, "residual stream width", min=8, max=131072)
    n_heads: int = _f(4, "query heads; dim must divide by it", min=1, max=4096)
    n_kv_heads: int = _f(4, "key/value heads (grouped-query attention); n_heads must divide by it", min=1,
                         max=4096)
    seq_len: int = _f(256, "context length in tokens", min=2, max=2**24)
    vocab_size: int = _f(8192, "embedding rows; at least the tokenizer's vocabulary", min=2, max=2**24)
    ffn_dim: int = _f(0, "SwiGLU hidden width; 0 means 8/3*dim rounded up to a multiple of 64", min=0,
                     max=2**20)
    rope_theta: float = _f(10000.0, "rotary embedding base", min=1.0)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", min=0.0, max=1.0, min_exclusive=True)
    tie_embeddings: bool = _f(True, "share the input embedding with the output projection")
    init_std: float = _f(0.02, "std of the normal init; residual projections get std/sqrt(2*n_layers)",
                         min=0.0, max=10.0, min_exclusive=True)
    arch: str = _f("llama", "block layout: llama (RMSNorm, RoPE, SwiGLU, no biases), gpt2 (LayerNorm, learned "
                   "positions, GELU MLP, biases; ffn_dim 0 means 4*dim), or llama plus: mistral (sliding_window), "
                   "qwen2 (q/k/v biases), qwen3 (RMSNorm of each q and k head), phi3 (fused HF checkpoint "
                   "layout, sliding_window)", choices=ARCHS)
    head_dim: int = _f(0, "width of one attention head; 0 means dim / n_heads (Qwen3 checkpoints set it apart)",
                       min=0, max=65536)
    sliding_window: int = _f(0, "mistral, phi3: each token attends to itself and the sliding_window - 1 before it; "
                             "0 (or >= seq_len) is plain causal attention", min=0, max=2**24)
    # mixture-of-experts feed-forward (model/moe.py, docs/moe.md); moe_experts = 0 keeps every block dense
    moe_experts: int = _f(0, "routed experts per MoE layer; 0 means a dense model (llama arch only)", min=0,
                          max=4096)
    moe_top_k: int = _f(2, "experts each token is sent to (at most moe_experts)", min=1, max=4096)
    moe_hidden: int = _f(0, "SwiGLU width of one expert; 0 means the dense width / (moe_top_k + "
                         "moe_shared_experts) rounded up to a multiple of 8: the dense model's active FLOPs", min=0,
                         max=2**20)
    moe_every: int = _f(1, "every moe_every-th block is MoE (layers moe_every-1, 2*moe_every-1, ...); the rest "
                        "stay dense", min=1, max=4096)
    moe_shared_experts: int = _f(0, "experts every token goes through besides the routed ones", min=0, max=64)
    moe_shared_gate: bool = _f(False, "scale the shared experts' output by sigmoid of a learned linear of the "
                               "token (Qwen2-MoE's shared_expert_gate; needs moe_shared_experts > 0)")
    moe_router: str = _f("softmax", "gate function of the router scores: softmax (Mixtral) or sigmoid "
                         "(DeepSeek-V3); with top_k > 1 the chosen gates are normalised to sum to 1",
                         choices=("softmax", "sigmoid"))
    moe_gate_norm: str = _f("auto", "normalise the chosen gates to sum to 1: auto (when moe_top_k > 1; top-1 keeps "
                            "its raw score), on (always: Mixtral), off (never: Qwen1.5-MoE, Qwen3-MoE's "
                            "norm_topk_prob = false)", choices=("auto", "on", "off"))
    moe_balance: str = _f("aux", "load balancing: aux (Switch auxiliary loss), bias (DeepSeek-V3 loss-free "
                          "per-expert bias, updated once per step) or none", choices=("aux", "bias", "none"))
    moe_aux_weight: float = _f(0.01, "weight of the Switch load-balancing loss (moe_balance = aux)", min=0.0,
                               max=100.0)
    moe_z_weight: float = _f(0.001, "weight of the router z-loss (mean squared logsumexp of the logits)",
                             min=0.0, max=100.0)
    moe_bias_rate: float = _f(0.01, "moe_balance = bias: step of the per-expert bias towards balance per "
                              "optimizer step (DeepSeek-V3 used 0.001 over a far longer run)", min=0.0, max=10.0)
    moe_capacity: float = _f(0.0, "capacity factor: each expert takes at most ceil(factor * tokens * top_k / "
                             "experts) tokens per micro-batch in training, the rest are dropped; 0 means "
                             "dropless", min=0.0, max=1024.0)
    objective: str = _f("causal", "what the model learns: causal (predict the next token) or mlm (masked language "
                        "modelling: an encoder with bidirectional attention predicts masked spans, data.mask_rate "
                        "and data.mask_span; llama arch, dense; docs/objectives.md)", choices=("causal", "mlm"))


@dataclass
class DataConfig:
    path: str = _f("data/stdlib", "token dataset folder written by `leantrain data prepare`")
    prefetch: str = _f("auto", "prepare the next steps' batches in a background thread: auto (on CUDA only; on "
                       "CPU the thread would compete with training for the cores), on or off",
                       choices=("auto", "on", "off"))
    fim_rate: float = _f(0.0, "fill-in-the-middle: share of the documents in each training window rearranged into "
                         "prefix/suffix/middle form, so the model learns to infill (`generate --prefix/--suffix`); "
                         "0 trains plain next-token prediction (docs/objectives.md)", min=0.0, max=1.0)
    fim_spm_rate: float = _f(0.5, "fill-in-the-middle: share of the rearranged documents laid out suffix-prefix-middle "
                             "(SPM) rather than prefix-suffix-middle (PSM)", min=0.0, max=1.0)
    mix: dict = field(default_factory=dict, metadata={
        "help": "re-weigh the sources of a mixed dataset (`data prepare --source`) for this run: source name = "
                "weight, sources left out get 0; empty trains with the weights recorded at prepare time",
        "allowed": "a table of source names and weights >= 0", "min": None, "max": None, "choices": None})
    mask_rate: float = _f(0.15, "model.objective = mlm: share of each sequence's tokens masked (80% become "
                          "<|mask|>, 10% a random token, 10% stay)", min=0.0, max=0.5, min_exclusive=True)
    mask_span: int = _f(3, "model.objective = mlm: mean length in tokens of a masked span; 1 masks single tokens "
                        "(BERT)", min=1, max=4096)


@dataclass
class TrainConfig:
    steps: int = _f(300, "optimizer steps", min=1, max=10**12)
    micro_batch_size: int = _f(16, "sequences per forward/backward on one process", min=1, max=2**20)
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step", min=1, max=2**20)
    global_batch_size: int = _f(0, "sequences per optimizer step over all data-parallel processes; 0 means "
                                "micro_batch_size x grad_accum_steps x data-parallel processes. Set, the "
                                "accumulation is derived from the world size at each start, so an elastic run "
                                "(torchrun --nnodes 1:2) keeps its batch and loss curve when it loses or gains a "
                                "node (leave grad_accum_steps at 1)", min=0, max=2**40)
    batch_warmup_steps: int = _f(0, "batch-size warmup: over these first steps each micro-batch grows linearly "
                                 "from 1 sequence to micro_batch_size (the first sequences of the step's full "
                                 "batch, so a resume stays exact); 0 is off", min=0, max=10**12)
    seed: int = _f(1337, "seed for init, data order and sampling", min=0, max=2**63 - 1)
    eval_every: int = _f(100, "steps between validation runs; 0 evaluates only at the end", min=0,
                        max=10**12)
    eval_steps: int = _f(10, "validation batches per evaluation", min=1, max=10**9)
    grad_clip: float = _f(1.0, "max global gradient norm; 0 disables clipping", min=0.0)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _f(0, "intra-op CPU threads; 0 means one per physical core", min=0, max=65536)
    compile: str = _f("auto", "compile the model with torch.compile: true, false, or auto (compile when the "
                      "planner's estimate of the run says the faster steps pay back the compile; the decision and "
                      "its reason are printed at the start, compile time is reported separately)",
                      choices=COMPILE_MODES)
    activation_checkpointing: str = _f("none", "recompute block activations in backward to save memory: "
                                       "none, full (every block) or selective (every ac_every-th block)",
                                       choices=("none", "full", "selective"))
    attention: str = _f("auto", "attention kernel: sdpa, matmul (faster for short contexts in bf16 on CPU) or "
                         "auto (picks per device)", choices=("auto", "sdpa", "matmul"))
    ac_every: int = _f(2, "selective activation checkpointing wraps every ac_every-th block", min=1, max=4096)
    sample_tokens: int = _f(200, "tokens generated as a sample at the end; 0 skips it", min=0,
                            max=10**6)
    sample_prompt: str = _f("def ", "prompt of the end-of-run sample; on chat data the user turn (left at def, the "
                            "first validation example's prompt)")
    init_from: str = _f("", "start from the weights of a local Hugging Face model folder (Llama, Mistral, Qwen2, "
                        "Qwen3, Phi-3 or GPT-2) or of a leantrain run or `compress` output folder (not a quantized "
                        "one; the [model] section comes from it); empty starts from random init")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "optimizer (docs/optimizers.md says when to use which)",
                   choices=("adamw", "lamb", "lion", "muon", "schedule_free_adamw"))
    lr: float = _f(3e-3, "peak learning rate", min=0.0, min_exclusive=True)
    weight_decay: float = _f(0.1, "decoupled weight decay (not applied to norms, biases, embeddings)", min=0.0)
    beta1: float = _f(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = _f(0.95, "Adam beta2", min=0.0, max=1.0)
    eps: float = _f(1e-8, "Adam epsilon", min=0.0, min_exclusive=True)
    warmup_steps: int = _f(30, "linear warmup steps", min=0, max=10**12)
    schedule: str = _f("cosine", "learning-rate schedule after warmup",
                       choices=("cosine", "wsd", "constant", "inverse_sqrt"))
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of lr (cosine, wsd)", min=0.0, max=1.0)
    decay_fraction: float = _f(0.2, "wsd: fraction of steps spent in the final decay", min=0.0, max=1.0)
    wsd_shape: str = _f("linear", "wsd: shape of the final decay", choices=("linear", "cosine", "1-sqrt"))
    muon_lr: float = _f(0.02, "muon: peak lr of the 2-D hidden weights (the rest use lr with AdamW)",
                        min=0.0, min_exclusive=True)
    muon_momentum: float = _f(0.95, "muon: Nesterov momentum of the hidden weights", min=0.0, max=1.0)
    ns_steps: int = _f(5, "muon: Newton-Schulz iterations that orthogonalise the update", min=1,
                       max=100)
    lion_beta1: float = _f(0.9, "lion: interpolation of momentum and gradient for the sign update", min=0.0, max=1.0)
    lion_beta2: float = _f(0.99, "lion: momentum decay", min=0.0, max=1.0)


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, "data-parallel replicas (DDP; with dp_shard > 1: HSDP replica groups)", min=1,
                           max=2**20)
    dp_shard: int = _f(-1, "data-parallel shards (FSDP2, ZeRO-3 style); -1 takes the rest of the world size",
                       min=-1, max=2**20, allowed="-1 (the rest) or an integer in [1, 2^20]")
    tp: int = _f(1, "tensor-parallel degree: each block's heads and hidden units split over tp ranks (needs "
                 "n_heads and n_kv_heads divisible by tp, untied embeddings)", min=1, max=4096)
    ep: int = _f(1, "expert-parallel degree: each MoE layer's experts split over ep data-parallel ranks, tokens "
                 "sent to their experts' ranks by all-to-all (needs model.moe_experts and the world size divisible "
                 "by ep; FSDP2 shards the rest)", min=1, max=4096)
    fsdp_reshard_after_forward: bool = _f(True, "FSDP2: free gathered weights after forward (less memory, "
                                          "one more all-gather in backward)")
    backend: str = _f("auto", "torch.distributed backend; auto picks nccl on CUDA, gloo on CPU",
                      choices=("auto", "nccl", "gloo"))
    timeout_s: int = _f(600, "seconds a collective may wait before the run stops with an error", min=1,
                        max=10**7)


@dataclass
class PrecisionConfig:
    dtype: str = _f("auto", "compute dtype; auto picks bf16 where the device runs it fast, else fp32",
                    choices=("auto", "fp32", "bf16"))
    fp8: bool = _f(False, "float8 matmuls in the linear layers (torchao) on GPUs of compute capability >= 8.9; "
                   "emulated (no speed-up) on CPU; the run goes on without it where torchao or the GPU is missing")


@dataclass
class CheckpointConfig:
    every: int = _f(100, "steps between checkpoints; 0 saves only at the end", min=0, max=10**12)
    keep: int = _f(2, "newest checkpoints kept on disk", min=1, max=10**6)
    async_: bool = _f(False, "write checkpoints in a background thread so training goes on", key="async")
    format: str = _f("full", "full: rank 0 writes the whole state in one file per kind; sharded: every rank "
                     "writes its own shards (torch.distributed.checkpoint; for models too big for one host)",
                     choices=("full", "sharded"))


@dataclass
class GuardConfig:
    policy: str = _f("skip", "on a non-finite or spiking step: skip it, rollback to the last checkpoint, or off",
                     choices=("skip", "rollback", "off"))
    sigma: float = _f(4.0, "a spike is loss or grad norm this many std devs above the recent window",
                      min=0.0, min_exclusive=True)
    window: int = _f(20, "recent good steps the spike test compares against", min=2, max=10**6)
    min_history: int = _f(20, "good steps after the lr warm-up seen before spikes are tested (non-finite is "
                          "always tested); at most window", min=2, max=10**6)
    min_loss_rise: float = _f(0.2, "a loss spike is also more than this fraction above the recent mean (0.2: 20%), "
                              "so ordinary batch noise over a quiet window is not one", min=0.0, max=10**6)
    min_grad_rise: float = _f(1.0, "a grad norm spike is also more than this fraction above the recent mean "
                              "(1.0: twice it)", min=0.0, max=10**6)
    max_retries: int = _f(5, "interventions allowed between two checkpoints before the run stops", min=0,
                          max=10**6)


# log.trackers values: the experiment trackers leantrain can also write to (train/trackers.py)
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


@dataclass
class LogConfig:
    every: int = _f(10, "steps between metrics lines", min=1, max=10**12)
    grad_health_every: int = _f(100, "steps between per-block grad norm and update/weight logs; 0 disables",
                                min=0, max=10**12)
    progress: str = _f("auto", "terminal output: auto (bar on a TTY, lines otherwise), bar, lines, none",
                       choices=("auto", "bar", "lines", "none"))
    trackers: tuple = _f((), "experiment trackers that also get every metrics line, the config and the report "
                         "(docs/tracking.md; pip install 'leantrain[track]'); on the command line a comma list: "
                         "--log.trackers=tensorboard,mlflow", choices=TRACKERS,
                         allowed="a list of " + ", ".join(TRACKERS))


@dataclass
class EnergyConfig:
    meter: str = _f("auto", "power meter: auto (NVML on a GPU, RAPL on the CPU, else an estimate from TDP and "
                    "utilisation), rapl, nvml, estimate or off", choices=("auto", "rapl", "nvml", "estimate", "off"))
    region: str = _f("world", "grid region for carbon intensity: world, a country code (FR), a US state (US-VA) or "
                     "a cloud region (aws:us-east-1, gcp:europe-west4, azure:westeurope)")
    pue: float = _f(1.2, "power usage effectiveness, facility / device energy (1.2: a modern data centre; "
                    "1.0 for a desktop)", min=1.0, max=10.0)
    price_per_kwh: float = _f(0.15, "electricity price, USD per kWh of facility energy", min=0.0)
    price_per_device_hour: float = _f(-1.0, "rental price, USD per device-hour (one device per process); -1 takes "
                                      "the hardware catalog's listed price of the GPU (0 on a CPU or an unlisted GPU); "
                                      "0 for hardware you own", min=-1.0,
                                      allowed="-1 (the catalog's price) or a finite number >= 0")
    tdp_w: float = _f(0.0, "estimate meter: device power at full load in W; 0 takes the GPU's power limit or "
                      "3.5 W per CPU thread", min=0.0, max=10**6)
    ram_w: float = _f(0.0, "memory (RAM) power in W, added to every meter but RAPL with a DRAM zone; 0 estimates it "
                      "as CodeCarbon does (5 W per DIMM, DIMMs guessed from installed memory)", min=0.0, max=10**5)
    rapl_root: str = _f("/sys/class/powercap", "where the RAPL powercap sysfs tree is")
    intensity_csv: str = _f("", "hourly carbon intensity CSV (timestamp_utc,g_per_kwh); empty uses the region's "
                            "yearly average")
    deadline: str = _f("", "carbon-aware: finish by this UTC time (ISO 8601, e.g. 2025-06-01T08:00:00Z)")
    carbon_aware: bool = _f(False, "pause at step boundaries while the grid is dirtier than the deadline allows "
                            "(needs intensity_csv and deadline)")


@dataclass
class FinetuneConfig:
    lora_rank: int = _f(0, "LoRA adapter rank; 0 trains the full model (minus finetune.freeze)", min=0,
                        max=65536)
    lora_alpha: float = _f(16.0, "LoRA scale numerator: the update is (lora_alpha/lora_rank) * B A",
                           min=0.0, min_exclusive=True)
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input", min=0.0, max=1.0)
    lora_targets: str = _f("wq,wk,wv,wo", "comma list of linear layers given adapters (wq, wk, wv, wo, w1, w2, w3, "
                           "output, or globs), or all-linear (every linear of the blocks)")
    freeze: str = _f("", "comma list of parameter-name prefixes or globs kept frozen (e.g. tok_embeddings,layers.0); "
                     "with LoRA every base weight is frozen anyway")
    adapter: str = _f("", "start the LoRA adapters from a local PEFT adapter folder (adapter_config.json + "
                      "adapter_model.safetensors) on the train.init_from model; sets lora_rank, lora_alpha, "
                      "lora_dropout and lora_targets from it")


@dataclass
class PruneConfig:
    """Gradual pruning during training (train/pruning.py, docs/compression.md): masks recomputed every `every`
    steps from `start_step` to `end_step` on the cubic schedule of Zhu & Gupta (2017), applied after every step."""

    method: str = _f("none", "none, magnitude (unstructured, lowest |w| first) or 2:4 (2 of every 4 weights along "
                     "the input dimension, the GPU sparse-kernel pattern)", choices=("none", "magnitude", "2:4"))
    sparsity: float = _f(0.5, "target fraction of zeros in the block linear weights, reached at end_step (2:4: 0.5)",
                         min=0.0, max=1.0, allowed="a finite number in [0, 1)")
    scope: str = _f("layer", "magnitude: rank weights per layer (each layer reaches sparsity) or global (across "
                    "all layers)", choices=("layer", "global"))
    start_step: int = _f(0, "step of the first pruning", min=0, max=10**12)
    end_step: int = _f(100, "step at which the target sparsity is reached (after start_step)", min=1, max=10**12)
    every: int = _f(10, "steps between mask updates", min=1, max=10**12)


@dataclass
class QuantConfig:
    """Quantization-aware training (model/quant.py, docs/compression.md): the linear layers are fake-quantized
    (torchao QAT) during training; `leantrain compress RUN --method convert` then writes the real quantized model."""

    qat: str = _f("", "fake-quantize the linear layers during training: int4 (grouped, symmetric) or int8 (per "
                  "output row, symmetric); empty trains in full precision", choices=("", "int4", "int8"),
                  allowed='"" (off), "int4" or "int8"')
    group_size: int = _f(32, "int4: weights sharing one scale along the input dimension (the layers' input sizes "
                         "must be multiples of it)", choices=(16, 32, 64, 128, 256))


@dataclass
class DistillConfig:
    """Knowledge distillation (train/distill.py, docs/compression.md): the loss becomes
    alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy."""

    teacher: str = _f("", "run folder of the teacher (same tokenizer and vocabulary); empty: no distillation")
    temperature: float = _f(1.0, "softmax temperature T of both models' logits in the KL term; 1 matches the "
                            "teacher's distribution as it is, > 1 softens both (on the tiny bench T = 2 helped far "
                            "less than 1)", min=0.0, max=100.0, min_exclusive=True)
    alpha: float = _f(0.5, "weight of the KL term; 1 - alpha weighs the usual cross-entropy", min=0.0, max=1.0)
    chunk: int = _f(0, "sequence positions whose teacher logits are computed at once (saves memory on big "
                    "vocabularies); 0: the whole sequence", min=0, max=2**24)


@dataclass
class CurationConfig:
    """`leantrain data prepare`'s curation; `[curation.<step>]` tables (e.g. `[curation.gopher_quality]`) set
    any step's fields or `enabled`, checked against the step classes by `corpus.pipeline.build_steps`."""

    profile: str = _f("none", "curation steps: none (dedup only), code (source-code filters, PII scrub, dedup) or "
                      "web (Gopher/C4/FineWeb filters, PII scrub, dedup)", choices=("none", "code", "web"))
    dedup: bool = _f(True, "exact and near dedup, in every profile (--no-dedup turns them off)")
    pii: bool = _f(True, "PII scrubbing, in the profiles that have it (--no-pii turns it off)")
    language: str = _f("", "keep only this language (needs fasttext and a lid.176.bin model); empty keeps all")
    executor: str = _f("local", "where curation steps run: local process pool, ray or serial",
                       choices=("local", "ray", "serial"))
    workers: int = _f(0, "curation worker processes; 0 means one per available core", min=0, max=65536)
    text_field: str = _f("text", "field of .jsonl records holding the text")
    follow_symlinks: bool = _f(False, "follow symlinks that lead out of an input folder")
    max_file_bytes: int = _f(1 << 30, "files read whole (text) larger than this are skipped and counted", min=1)
    steps: dict = field(default_factory=dict, metadata={"help": "[curation.<step>] tables", "tables": True})


# tune.objective words: what `leantrain tune` minimises, read from each trial run's summary
TUNE_OBJECTIVES = ("val_loss", "energy_kwh", "cost_usd", "wall_s")


@dataclass
class TuneConfig:
    """`leantrain tune` (docs/tune.md); `train` ignores it. The space's keys and ranges are checked against the
    sections above by leantrain.tune.space when a study starts."""

    trials: int = _f(20, "trials of the study, all workers together (`leantrain tune --trials`)", min=1, max=10**6)
    space: dict = field(default_factory=dict, metadata={
        "help": "the search space: dotted config keys with [low, high] (the key's type, int or float), "
                "[low, high, \"log\"] (log scale), [low, high, \"int\"], or a list of choices (\"optim.name\" = "
                "[\"adamw\", \"muon\"]); in TOML an inline table or a [tune.space] table",
        "allowed": "a table of dotted config keys", "min": None, "max": None, "choices": None})
    objective: str = _f("val_loss", "what to minimise: val_loss, or a comma list of val_loss and energy_kwh, "
                        "cost_usd or wall_s (a multi-objective study; its result is a Pareto front)",
                        allowed="val_loss, optionally with energy_kwh, cost_usd, wall_s (comma list)")
    sampler: str = _f("auto", "auto (tpe; nsga2 for multi-objective), tpe, random, cmaes (one objective; needs the "
                      "cmaes package) or nsga2", choices=("auto", "tpe", "random", "cmaes", "nsga2"))
    pruner: str = _f("auto", "stops weak trials at an evaluation: auto (asha; none for multi-objective, which Optuna "
                     "cannot prune), asha (successive halving), hyperband, median or none",
                     choices=("auto", "asha", "hyperband", "median", "none"))
    reduction_factor: int = _f(3, "asha, hyperband: 1 in reduction_factor trials goes on at each rung", min=2,
                               max=100)
    budget_steps: int = _f(0, "optimizer steps per trial; 0 keeps train.steps", min=0, max=10**12)
    budget_tokens: int = _f(0, "tokens per trial, rounded up to whole steps (instead of budget_steps); 0: unused",
                            min=0, max=10**15)
    seed: int = _f(0, "seed of the sampler", min=0, max=2**32 - 1)
    heartbeat_s: int = _f(30, "seconds between a running trial's heartbeats; a trial silent for twice as long (its "
                          "worker was killed) is marked failed and retried from its checkpoint", min=1, max=86400)
    max_retries: int = _f(3, "retries of a trial whose worker died", min=0, max=1000)
    lr_find: bool = _f(False, "when the study is created, run lr_find on the config and enqueue its suggested "
                       "optim.lr as the first trial")


@dataclass
class FederatedConfig:
    """`leantrain federate` (docs/federated.md): Flower rounds over partitions of the token dataset; `train`
    ignores it. Each client takes local_steps of the usual train step on its partition per round."""

    clients: int = _f(3, "clients (partitions of the dataset, one per Flower supernode)", min=1, max=100000)
    rounds: int = _f(3, "federated rounds", min=1, max=10**6)
    clients_per_round: int = _f(0, "clients sampled each round; 0 means all", min=0, max=100000)
    local_steps: int = _f(5, "optimizer steps each sampled client takes per round", min=1, max=10**9)
    strategy: str = _f("fedavg", "server aggregation (Flower strategies): fedavg, fedprox (proximal term in the "
                       "client loss), fedadam or fedyogi (server-side optimizers)",
                       choices=("fedavg", "fedprox", "fedadam", "fedyogi"))
    proximal_mu: float = _f(0.01, "fedprox: weight mu of mu/2 * ||w - w_global||^2 in the client loss", min=0.0,
                            max=1e6)
    server_lr: float = _f(0.01, "fedadam, fedyogi: the server optimizer's step size (eta)", min=0.0, max=1e3,
                          min_exclusive=True)
    server_tau: float = _f(1e-3, "fedadam, fedyogi: adaptivity (tau, added to the root of the second moment)",
                           min=0.0, max=1e3, min_exclusive=True)
    partition: str = _f("iid", "how documents are dealt to clients: iid (shuffled), natural (contiguous runs of "
                        "source documents) or dirichlet (label skew over source groups, Dir(alpha))",
                        choices=("iid", "natural", "dirichlet"))
    alpha: float = _f(0.5, "dirichlet: concentration; small (0.1) is very skewed, large (100) near iid", min=0.0,
                      max=1e6, min_exclusive=True)
    label_groups: int = _f(0, "dirichlet: source groups used as labels (contiguous runs of documents); 0 means "
                           "max(10, 2 * clients)", min=0, max=100000)
    min_available: int = _f(0, "clients that must be connected before a round starts; 0 means clients_per_round",
                            min=0, max=100000)
    min_replies: int = _f(1, "replies a round needs to be aggregated; a client that dies mid-round is left out",
                          min=1, max=100000)
    round_timeout: float = _f(600.0, "seconds the server waits for replies in a round before aggregating what came",
                              min=0.0, max=10**7, min_exclusive=True)
    lora_only: bool = _f(False, "only the LoRA adapter weights travel (needs finetune.lora_rank > 0)")
    dp_noise: float = _f(0.0, "client-level differential privacy: Gaussian noise multiplier on the sum of clipped "
                         "updates; 0 means off", min=0.0, max=1e6)
    dp_epsilon: float = _f(0.0, "instead of dp_noise: the epsilon (at dp_delta, over all rounds) to reach; the "
                           "noise multiplier is solved for it; 0 means unused", min=0.0, max=1e6)
    dp_clip: float = _f(1.0, "L2 norm each client's update is clipped to (differential privacy)", min=0.0, max=1e6,
                        min_exclusive=True)
    dp_delta: float = _f(1e-5, "delta of the (epsilon, delta) guarantee reported", min=0.0, max=1.0,
                         min_exclusive=True)
    sim_parallel: int = _f(1, "simulation: clients trained at the same time (Ray actors); threads are shared "
                           "among them", min=1, max=1024)
    secure_aggregation: bool = _f(False, "SecAgg+ (Flower): clients mask their weights so the server learns only "
                                  "their weighted sum; fedavg or fedprox, without DP (docs/federated.md)")
    secagg_shares: int = _f(0, "secure_aggregation: shares each client's secrets are split into (itself and its "
                            "neighbours); 0 means every sampled client, else at least 3", min=0, max=100000)
    secagg_threshold: int = _f(0, "secure_aggregation: shares that rebuild a dropped client's mask; 0 means two "
                               "thirds of the shares (at least 2)", min=0, max=100000)
    secagg_clip: float = _f(8.0, "secure_aggregation: weights are clipped to [-secagg_clip, secagg_clip] and "
                            "quantized to 2^22 levels over that range", min=0.0, max=1e6, min_exclusive=True)


def _toml_or_text(text: str) -> Any:
    """A step setting typed on the command line: a TOML value (20, true, [1, 2]), else the text itself."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections as {TOML key: value}."""
        out = {}
        for section in dataclasses.fields(self):
            obj = getattr(self, section.name)
            out[section.name] = {_key(f): getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return out

    def hash(self) -> str:
        """Identity of everything that shapes the numbers a run produces.

        `[parallel]` is left out: the layout of a job does not change its numbers (the global batch is
        layout-independent), so resuming at another world size is not a config change. `[energy]` is left
        out too: metering, prices and carbon-aware pauses never change the training numbers, nor do the
        experiment trackers (`log.trackers`) that watch them. Only values
        that differ from their defaults count, so a new leantrain version that adds fields (at defaults
        that keep the old behaviour) does not make old checkpoints look like another config.
        """
        defaults = Config().to_dict()
        sections = {name: {k: v for k, v in values.items() if v != defaults[name][k]}
                    for name, values in self.to_dict().items()
                    if name not in ("parallel", "energy", "curation", "tune")}
        sections["log"].pop("trackers", None)
        blob = json.dumps(sections, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_SECTION_TYPES = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
    "parallel": ParallelConfig, "precision": PrecisionConfig, "checkpoint": CheckpointConfig,
    "guard": GuardConfig, "log": LogConfig, "finetune": FinetuneConfig, "prune": PruneConfig, "distill": DistillConfig,
    "quant": QuantConfig,
    "energy": EnergyConfig, "curation": CurationConfig, "tune": TuneConfig,
    "federated": FederatedConfig,
}


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("leantrain.recipes").iterdir()
                  if p.name.endswith(".toml"))


def recipe_text(name: str) -> str:
    if name not in recipe_names():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())}")
    return resources.files("leantrain.recipes").joinpath(f"{name}.toml").read_text()


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML ({e}); fix the syntax at that line") from None


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("allowed"):
        return m["allowed"]
    if m.get("choices"):
        return "one of " + ", ".join(map(str, m["choices"]))
    kind = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[_ftype(f)]
    lo, hi = _bound(m.get("min")), _bound(m.get("max"))
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if m.get('min_exclusive') else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{kind} {'>' if m.get('min_exclusive') else '>='} {lo}"
    return kind


def _bound(v: float | None) -> str | None:
    """A range end as people read it: 10^12 and 2^24 rather than their thirteen and eight digits."""
    if v is None:
        return None
    if isinstance(v, int) and v >= 10**5:
        for base in (10, 2):
            k = round(math.log(v, base))
            if base**k in (v, v + 1):
                return f"{base}^{k}" + ("-1" if base**k == v + 1 else "")
    return str(v)


def _ftype(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple,
            "dict": dict}[f.type if isinstance(f.type, str) else f.type.__name__]


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field; return it in the field's type."""
    key, want = f"{section}.{_key(f)}", _ftype(f)
    bad = ConfigError(f"config: {key} = {value!r} is not allowed; expected {_allowed(f)}")
    if want is tuple:
        return _coerce_names(key, f, value)
    if want is dict:  # a table (tune.space): its owner checks the entries
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} = {value!r} is not allowed; expected {_allowed(f)} (in TOML: "
                              f"{_key(f)} = {{ \"section.field\" = [low, high] }})")
        return dict(value)
    if want is bool:
        if not isinstance(value, bool):
            raise bad
    elif _takes_bool_words(f) and isinstance(value, bool | str):  # train.compile: true/false/auto
        value = compile_mode(value) if isinstance(value, bool) else _bool_word(value)
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
        if not math.isfinite(value):  # NaN slips through every < and > test below
            raise bad
    elif not isinstance(value, str):  # e.g. an unquoted TOML date: path = 2024-06-01
        raise ConfigError(f"config: {key} = {value} is not allowed; expected a string (in TOML, quote it: "
                          f"{_key(f)} = \"{value}\")")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise bad
    if m.get("min") is not None and (value < m["min"] or (m.get("min_exclusive") and value == m["min"])):
        raise bad
    if m.get("max") is not None and value > m["max"]:
        raise bad
    return value


def _coerce_names(key: str, f: dataclasses.Field, value: Any) -> tuple:
    """A list field (log.trackers): a TOML list of allowed names, kept in order, each once."""
    choices = f.metadata["choices"]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"config: {key} = {value!r} is not allowed; expected {_allowed(f)} (in TOML: "
                          f"{_key(f)} = [\"{choices[0]}\"]; on the command line: --{key}={','.join(choices[:2])})")
    for v in value:
        if v not in choices:
            raise ConfigError(f"config: {key} = {list(value)!r}: {v!r} is not a tracker leantrain knows; "
                              f"allowed: {', '.join(choices)}")
    return tuple(dict.fromkeys(value))


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _takes_bool_words(f: dataclasses.Field) -> bool:
    """A str field whose choices include true and false (train.compile) also takes TOML's true/false and 1/0."""
    return "true" in (f.metadata.get("choices") or ()) and "false" in f.metadata["choices"]


def _bool_word(text: str) -> str:
    low = text.strip().lower()
    return "true" if low in _TRUE else "false" if low in _FALSE else text


def _parse_cli_value(f: dataclasses.Field | None, text: str) -> Any:
    """`--train.steps=5` gives a string; read it as the field's type, not by guessing from TOML.

    So `--data.path=2024-06-01` stays a path (TOML would read a date) and `--optim.lr=1` is a float.
    A str field takes the text as typed, unless it is one quoted TOML string ("a = b" or 'a = b'),
    which is unquoted. Text that does not read as the type stays a string, so `_coerce` names it.
    """
    if f is None:  # an unknown key: `_merge` names it
        return text
    want = _ftype(f)
    if want is dict:  # an inline table: --tune.space='{ "optim.lr" = [1e-4, 1e-2, "log"] }'
        try:
            return tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    if want is tuple:  # a comma list (--log.trackers=tensorboard,mlflow; empty: none) or a TOML list
        if text.strip().startswith("["):
            try:
                return tomllib.loads(f"v = {text.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                return text
        return tuple(word.strip() for word in text.split(",") if word.strip())
    if want is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                return text
            return value if isinstance(value, str) else text
        return text
    word = text.strip()
    if want is bool:
        low = word.lower()
        return True if low in _TRUE else False if low in _FALSE else text
    if want is int:
        try:
            value = tomllib.loads(f"v = {word}")["v"]  # 1_000, 0x10 as in the file form
        except tomllib.TOMLDecodeError:
            return text
        return value if isinstance(value, int) and not isinstance(value, bool) else text
    try:
        return float(word)  # nan and inf parse here and are refused by `_coerce` with the key's name
    except ValueError:
        return text


def _merge(cfg: Config, data: dict[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{where}: unknown section [{section}]; allowed: {', '.join(_SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{section}] must be a table of key = value lines")
        obj = getattr(cfg, section)
        fields = {_key(f): f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if "steps" in fields and fields["steps"].metadata.get("tables") and (isinstance(value, dict) or "." in key):
                # [curation.<step>] tables and --curation.<step>.<field>=value: the step classes check them
                step, _, name = key.partition(".")
                if isinstance(value, str) and "." in key:  # --curation.STEP.FIELD=text: read as a TOML value
                    value = _toml_or_text(value)
                obj.steps.setdefault(step, {}).update(value if isinstance(value, dict) else {name: value})
                continue
            if key not in fields or fields[key].metadata.get("tables"):
                raise ConfigError(f"{where}: unknown key {section}.{key}; "
                                  f"allowed in [{section}]: {', '.join(fields)}")
            setattr(obj, fields[key].name, _coerce(section, fields[key], value))


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn `--section.field=value` (or `section.field=value`) strings into a nested dict."""
    out: dict[str, dict[str, Any]] = {}
    for arg in args:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body or "." not in body.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r} is not of the form --section.field=value")
        dotted, text = body.split("=", 1)
        section, key = dotted.split(".", 1)
        cls = _SECTION_TYPES.get(section)
        fields = {_key(f): f for f in dataclasses.fields(cls)} if cls else {}
        f = fields.get(key)
        typed = f if f is not None and not f.metadata.get("tables") else None  # tables: `_merge` reads them
        out.setdefault(section, {})[key] = _parse_cli_value(typed, text)
    return out


def _field(dotted: str) -> dataclasses.Field | None:
    section, _, key = dotted.partition(".")
    cls = _SECTION_TYPES.get(section)
    f = {_key(x): x for x in dataclasses.fields(cls)}.get(key) if cls else None
    return None if f is None or f.metadata.get("tables") else f


def field_type(dotted: str) -> type | None:
    """The type (int, float, bool, str, tuple or dict) of the config field `section.key`; None when there is none.
    For callers that build configs from values of their own (the tune search space)."""
    f = _field(dotted)
    return None if f is None else _ftype(f)


def check_value(dotted: str, value: Any) -> Any:
    """`value` checked as `section.key` of a config file would be (type, finiteness, range, choices), returned in
    the field's type; a one-line ConfigError names the key and what is allowed."""
    f = _field(dotted)
    if f is None:
        raise ConfigError(f"config: unknown key {dotted}; `leantrain config --reference` lists every key")
    return _coerce(dotted.partition(".")[0], f, value)

def _check_relations(cfg: Config) -> None:
    m = cfg.model
    if m.arch == "gpt2" and m.head_dim:
        raise ConfigError(f"config: model.head_dim = {m.head_dim} is not allowed with model.arch = gpt2 (its heads "
                          "are dim / n_heads wide); set head_dim = 0")
    if not m.head_dim and m.dim % m.n_heads:
        raise ConfigError(f"config: model.dim = {m.dim} does not divide by model.n_heads = {m.n_heads}; "
                          "pick n_heads that divides dim, or set model.head_dim")
    if m.arch != "gpt2" and (m.head_dim or m.dim // m.n_heads) % 2:
        raise ConfigError(f"config: head size {m.head_dim or m.dim // m.n_heads} (model.head_dim, or model.dim/"
                          "model.n_heads) is odd; rotary embeddings need an even head size")
    if m.sliding_window and m.arch not in SLIDING_WINDOW_ARCHS:
        raise ConfigError(f"config: model.sliding_window = {m.sliding_window} needs model.arch = "
                          f"{' or '.join(SLIDING_WINDOW_ARCHS)} (model.arch = {m.arch} attends to every earlier "
                          "position); set sliding_window = 0 or change the arch")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"config: model.n_heads = {m.n_heads} does not divide by model.n_kv_heads = "
                          f"{m.n_kv_heads}; pick n_kv_heads that divides n_heads")
    if m.arch == "gpt2" and m.n_kv_heads != m.n_heads:
        raise ConfigError(f"config: model.arch = gpt2 has no grouped-query attention but model.n_kv_heads = "
                          f"{m.n_kv_heads} != model.n_heads = {m.n_heads}; set n_kv_heads = n_heads")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"config: train.device = {dev!r} is not allowed; expected auto, cpu, cuda or cuda:N")
    tp = cfg.parallel.tp
    if tp > 1 and (m.n_heads % tp or m.n_kv_heads % tp):
        raise ConfigError(f"config: parallel.tp = {tp} does not divide model.n_heads = {m.n_heads} and "
                          f"model.n_kv_heads = {m.n_kv_heads}; pick a tp that divides both")
    if tp > 1 and m.arch != "llama":
        raise ConfigError(f"config: parallel.tp = {tp} supports model.arch = llama only, not {m.arch}; "
                          "set parallel.tp = 1")
    if tp > 1 and m.tie_embeddings:
        raise ConfigError(f"config: parallel.tp = {tp} needs separate input and output embeddings (they are split "
                          "differently); set --model.tie_embeddings=false")
    if tp > 1 and cfg.parallel.dp_replicate > 1:
        raise ConfigError(f"config: parallel.tp = {tp} with parallel.dp_replicate = {cfg.parallel.dp_replicate} "
                          "is not supported; combine tensor parallel with dp_shard (FSDP2) instead")
    if cfg.parallel.dp_shard == 0:
        raise ConfigError("config: parallel.dp_shard = 0 is not allowed; expected -1 (the rest) or an integer >= 1")
    t = cfg.train
    if t.global_batch_size and t.grad_accum_steps != 1:
        raise ConfigError(f"config: train.global_batch_size = {t.global_batch_size} derives the accumulation from the "
                          f"world size, but train.grad_accum_steps = {t.grad_accum_steps} is set too; set one of them "
                          "(leave grad_accum_steps = 1)")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"config: train.global_batch_size = {t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size = {t.micro_batch_size}; pick a global batch that is "
                          "micro_batch_size x accumulation x data-parallel processes")
    if cfg.energy.carbon_aware and not (cfg.energy.intensity_csv and cfg.energy.deadline):
        raise ConfigError("config: energy.carbon_aware needs energy.intensity_csv (an hourly forecast) and "
                          "energy.deadline (ISO 8601 UTC); set both")
    if cfg.finetune.lora_rank and (cfg.parallel.tp > 1 or cfg.precision.fp8):
        raise ConfigError("config: finetune.lora_rank > 0 does not combine with parallel.tp > 1 or precision.fp8 "
                          "yet; set parallel.tp = 1 and precision.fp8 = false for LoRA")
    _check_moe(cfg)
    _check_prune_distill(cfg)
    _check_quant(cfg)
    _check_sizes_and_more(cfg)
    _check_objective(cfg)
    if cfg.data.fim_rate and cfg.model.objective != "causal":
        raise ConfigError(f"config: data.fim_rate = {cfg.data.fim_rate} rearranges text for a causal model, not for "
                          f"model.objective = {cfg.model.objective}; set --data.fim_rate=0")
    _check_tune(cfg.tune)
    _check_federated(cfg)


def _check_objective(cfg: Config) -> None:
    """model.objective = mlm: the encoder is the Llama block with bidirectional attention (transformers' EuroBERT),
    so the other archs, MoE and a causal teacher are refused here rather than trained into something unexportable."""
    m = cfg.model
    if m.objective != "mlm":
        return
    if m.arch != "llama":
        raise ConfigError(f"config: model.objective = mlm trains model.arch = llama only (its bidirectional encoder "
                          f"exports as transformers' EuroBertForMaskedLM), not {m.arch}; set --model.arch=llama")
    if m.moe_experts:
        raise ConfigError(f"config: model.objective = mlm does not support a mixture of experts (model.moe_experts = "
                          f"{m.moe_experts}); set --model.moe_experts=0")
    if cfg.distill.teacher:
        raise ConfigError("config: model.objective = mlm cannot distill from distill.teacher (a causal model predicts "
                          "other tokens than an encoder); set distill.teacher = \"\"")


def _check_federated(cfg: Config) -> None:
    """[federated]: the relations between its fields (and with [finetune]) that ranges cannot say."""
    f = cfg.federated
    if f.clients_per_round > f.clients:
        raise ConfigError(f"config: federated.clients_per_round = {f.clients_per_round} is more than federated.clients "
                          f"= {f.clients}; sample at most {f.clients} (0 means all)")
    per_round = f.clients_per_round or f.clients
    if f.min_replies > per_round:
        raise ConfigError(f"config: federated.min_replies = {f.min_replies} is more than the {per_round} clients "
                          "sampled per round, so no round could finish; lower min_replies")
    if f.min_available > f.clients:
        raise ConfigError(f"config: federated.min_available = {f.min_available} is more than federated.clients = "
                          f"{f.clients}; the round would wait forever: lower it")
    if f.lora_only and not cfg.finetune.lora_rank:
        raise ConfigError("config: federated.lora_only needs LoRA adapters to send, but finetune.lora_rank = 0; set "
                          "--finetune.lora_rank=8 (for example) or federated.lora_only = false")
    if f.dp_noise and f.dp_epsilon:
        raise ConfigError(f"config: federated.dp_noise = {f.dp_noise} and federated.dp_epsilon = {f.dp_epsilon} both "
                          "set the privacy noise; give one of them")
    if (f.dp_noise or f.dp_epsilon) and f.strategy != "fedavg":
        raise ConfigError(f"config: differential privacy (federated.dp_noise / dp_epsilon) is accounted for "
                          f"federated.strategy = fedavg only, not {f.strategy}; use fedavg or turn DP off")
    if f.secure_aggregation:
        _check_secure_aggregation(f, per_round)


def _check_secure_aggregation(f: FederatedConfig, per_round: int) -> None:
    """SecAgg+ (federated/secure.py): what Flower's SecAggPlusWorkflow can run and leantrain wires to it."""
    if f.dp_noise or f.dp_epsilon:
        raise ConfigError("config: federated.secure_aggregation does not combine with differential privacy "
                          "(federated.dp_noise / dp_epsilon) yet; turn one of them off")
    if f.strategy not in ("fedavg", "fedprox"):
        raise ConfigError(f"config: federated.secure_aggregation runs with federated.strategy = fedavg or fedprox, "
                          f"not {f.strategy} (its server state is not kept under SecAgg+); use fedavg or fedprox")
    if not 2 <= per_round <= 1023:
        raise ConfigError(f"config: federated.secure_aggregation needs 2 to 1023 clients per round (the masked sum "
                          f"must fit 32 bits), not {per_round}; change federated.clients / clients_per_round")
    if f.secagg_shares and not 3 <= f.secagg_shares <= per_round:
        raise ConfigError(f"config: federated.secagg_shares = {f.secagg_shares} must be 0 (every sampled client) or "
                          f"3 to {per_round} (the clients per round)")
    shares = f.secagg_shares or per_round
    if f.secagg_threshold and not 2 <= f.secagg_threshold < max(shares, 3):
        raise ConfigError(f"config: federated.secagg_threshold = {f.secagg_threshold} must be 0 (two thirds of the "
                          f"shares) or from 2 to below the {shares} shares")


def _check_quant(cfg: Config) -> None:
    """[quant]: QAT swaps the linear layers for torchao's fake-quantized ones, which the other swaps cannot share."""
    if cfg.quant.qat and (cfg.finetune.lora_rank or cfg.precision.fp8 or cfg.parallel.tp > 1):
        raise ConfigError(f"config: quant.qat = {cfg.quant.qat} does not combine with finetune.lora_rank, "
                          "precision.fp8 or parallel.tp > 1 yet; turn those off or set quant.qat = \"\"")


def _check_prune_distill(cfg: Config) -> None:
    """[prune] and [distill]: the relations their fields' ranges cannot say."""
    p = cfg.prune
    if p.sparsity >= 1.0:
        raise ConfigError(f"config: prune.sparsity = {p.sparsity} would zero every weight; expected a number in "
                          "[0, 1), e.g. 0.5")
    if p.method != "none":
        if p.end_step <= p.start_step:
            raise ConfigError(f"config: prune.end_step = {p.end_step} is not after prune.start_step = {p.start_step}; "
                              "set end_step > start_step")
        if p.method == "2:4" and p.sparsity != 0.5:
            raise ConfigError(f"config: prune.method = 2:4 zeros exactly half the weights but prune.sparsity = "
                              f"{p.sparsity}; set prune.sparsity = 0.5 or use prune.method = magnitude")
        if cfg.parallel.tp > 1 or cfg.finetune.lora_rank:
            raise ConfigError("config: prune.method does not combine with parallel.tp > 1 or finetune.lora_rank (the "
                              "masks act on whole base weights); turn those off or set prune.method = none")
        if cfg.optim.name == "schedule_free_adamw":
            raise ConfigError("config: prune.method does not combine with optim.name = schedule_free_adamw (its "
                              "averaged weights would not stay pruned); pick another optimizer")
    if cfg.distill.teacher and cfg.parallel.tp > 1:
        raise ConfigError("config: distill.teacher does not combine with parallel.tp > 1 yet (the teacher runs whole "
                          "on every rank); set parallel.tp = 1")


def _check_moe(cfg: Config) -> None:
    """What a mixture-of-experts model cannot be combined with yet (docs/moe.md says what comes later)."""
    m = cfg.model
    if not m.moe_experts:
        if cfg.parallel.ep > 1:
            raise ConfigError(f"config: parallel.ep = {cfg.parallel.ep} splits the experts of a mixture-of-experts "
                              "model, but model.moe_experts = 0; set parallel.ep = 1 or model.moe_experts > 0")
        return
    if m.moe_top_k > m.moe_experts:
        raise ConfigError(f"config: model.moe_top_k = {m.moe_top_k} is more than model.moe_experts = "
                          f"{m.moe_experts}; a token cannot go to more experts than there are: lower moe_top_k")
    if m.arch not in ("llama", "qwen2", "qwen3"):  # the attention of Mixtral/GLM, Qwen2-MoE and Qwen3-MoE
        raise ConfigError(f"config: model.moe_experts > 0 supports model.arch = llama, qwen2 or qwen3, not {m.arch}; "
                          "set one of those or moe_experts = 0")
    if cfg.parallel.tp > 1:
        raise ConfigError(f"config: model.moe_experts > 0 does not combine with parallel.tp = {cfg.parallel.tp} yet; "
                          "set parallel.tp = 1 (data parallelism and FSDP work)")
    if m.moe_experts % cfg.parallel.ep:
        raise ConfigError(f"config: parallel.ep = {cfg.parallel.ep} does not divide model.moe_experts = "
                          f"{m.moe_experts}; pick an ep that divides the number of experts (each rank holds "
                          "moe_experts / ep of them)")
    if cfg.parallel.ep > 1 and cfg.parallel.dp_replicate > 1:
        raise ConfigError(f"config: parallel.ep = {cfg.parallel.ep} combines with FSDP2 (parallel.dp_shard) only, not "
                          f"parallel.dp_replicate = {cfg.parallel.dp_replicate}; set dp_replicate = 1")
    if cfg.parallel.ep > 1 and compile_mode(cfg.train.compile) == "true":
        raise ConfigError(f"config: train.compile = true does not work with parallel.ep = {cfg.parallel.ep} yet (the "
                          "all-to-all sizes change every step); set --train.compile=false")
    if cfg.parallel.ep > 1 and cfg.finetune.lora_rank:
        raise ConfigError(f"config: finetune.lora_rank > 0 does not combine with parallel.ep = {cfg.parallel.ep} yet "
                          "(the expert adapters are not split with the experts); set parallel.ep = 1 for LoRA")
    if m.moe_shared_gate and not m.moe_shared_experts:
        raise ConfigError("config: model.moe_shared_gate = true needs shared experts to gate; set "
                          "model.moe_shared_experts >= 1 or moe_shared_gate = false")
    if cfg.precision.fp8:
        raise ConfigError("config: model.moe_experts > 0 does not combine with precision.fp8 yet; turn fp8 off or "
                          "train a dense model")


def tune_objectives(objective: str) -> list[str]:
    """tune.objective as a list of TUNE_OBJECTIVES words ("val_loss,energy_kwh" -> ["val_loss", "energy_kwh"])."""
    return [w.strip() for w in objective.split(",") if w.strip()]


def _check_tune(t: TuneConfig) -> None:
    """The [tune] settings that only make sense together; the space is checked by leantrain.tune.space."""
    words = tune_objectives(t.objective)
    bad = [w for w in words if w not in TUNE_OBJECTIVES]
    if bad or "val_loss" not in words or len(set(words)) != len(words):
        raise ConfigError(f"config: tune.objective = {t.objective!r} is not allowed; expected val_loss, optionally "
                          f"with {', '.join(TUNE_OBJECTIVES[1:])} (a comma list, each word once)")
    if len(words) > 1 and t.sampler == "cmaes":
        raise ConfigError(f"config: tune.sampler = cmaes optimises one objective, but tune.objective = {t.objective!r}"
                          "; use sampler = nsga2 (or auto) for several")
    if len(words) > 1 and t.pruner not in ("auto", "none"):
        raise ConfigError(f"config: tune.pruner = {t.pruner} cannot prune a multi-objective study (tune.objective = "
                          f"{t.objective!r}); set pruner = none, or optimise val_loss alone")
    if t.budget_steps and t.budget_tokens:
        raise ConfigError("config: tune.budget_steps and tune.budget_tokens are both set; give the per-trial budget "
                          "one way (the other = 0)")


# no machine leantrain plans for holds more parameters than this (40 TB of fp32 weights alone)
MAX_PARAMS = 10**13
MAX_TOKENS_PER_MICRO_BATCH = 2**31


def _check_sizes_and_more(cfg: Config) -> None:
    """Relations between sections that each field's range cannot see: sizes that no machine could
    allocate, a guard that could never test for spikes, a deadline that does not parse."""
    m = cfg.model
    ffn = m.ffn_dim or (4 * m.dim if m.arch == "gpt2" else 8 * m.dim // 3)
    head = m.head_dim or m.dim // m.n_heads
    params = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.n_layers * (
        2 * m.dim * m.n_heads * head + 2 * m.dim * m.n_kv_heads * head + 3 * m.dim * ffn)
    if params > MAX_PARAMS:
        raise ConfigError(f"config: model of about {params:.3g} parameters (n_layers = {m.n_layers}, dim = {m.dim}, "
                          f"vocab_size = {m.vocab_size}, ffn_dim = {ffn}) cannot be allocated; allowed is at most "
                          f"{MAX_PARAMS:.0e}: lower the sizes (`leantrain plan` shows what fits)")
    tokens = cfg.train.micro_batch_size * m.seq_len
    if tokens > MAX_TOKENS_PER_MICRO_BATCH:
        raise ConfigError(f"config: train.micro_batch_size x model.seq_len = {cfg.train.micro_batch_size} x {m.seq_len}"
                          f" = {tokens} tokens per micro-batch is more than the {MAX_TOKENS_PER_MICRO_BATCH} allowed; "
                          "lower micro_batch_size and raise train.grad_accum_steps")
    if cfg.train.sample_tokens and not cfg.train.sample_prompt:
        raise ConfigError("config: train.sample_prompt = '' is not allowed with train.sample_tokens > 0 (the "
                          "end-of-run sample needs a prompt); give a prompt or set train.sample_tokens = 0")
    mix = cfg.data.mix  # the names are checked against the dataset when training starts
    for name, w in mix.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ConfigError(f"config: data.mix weight of {name!r} = {w!r} is not allowed; expected a number >= 0 "
                              "(in TOML: mix = { real = 0.8, synthetic = 0.2 })")
    if mix and not sum(mix.values()) > 0:
        raise ConfigError(f"config: data.mix = {mix} does not sum to a positive number; give at least one source "
                          "a weight > 0")
    g = cfg.guard
    if g.min_history > g.window:
        raise ConfigError(f"config: guard.min_history = {g.min_history} is more than guard.window = {g.window}, so "
                          "the spike test would never run; set min_history <= window")
    price = cfg.energy.price_per_device_hour
    if price < 0 and price != -1:
        raise ConfigError(f"config: energy.price_per_device_hour = {price} is not allowed; give a price >= 0 (USD per "
                          "device-hour) or -1 for the hardware catalog's price")
    if cfg.energy.deadline:
        text = cfg.energy.deadline.strip().replace("Z", "+00:00").replace("z", "+00:00")
        try:
            datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"config: energy.deadline = {cfg.energy.deadline!r} is not allowed; expected an ISO "
                              "8601 UTC time such as 2025-06-01T08:00:00Z") from None


def read_toml_file(path: str | Path) -> dict[str, Any]:
    """A config file's tables; every way it can fail (missing, a folder, unreadable, not UTF-8, not TOML)
    is one ConfigError that says which."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not a TOML file; pass the .toml file itself")
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; check the path")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file (a pipe or device?); pass a .toml file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return _parse_toml(text, str(p))


def load_config(path: str | Path | None = None, recipe: str | None = None,
                overrides: list[str] | dict[str, dict[str, Any]] | None = None) -> Config:
    """Resolve a config from defaults, a recipe, a TOML file and overrides; validate it whole."""
    cfg = Config()
    if recipe:
        _merge(cfg, _parse_toml(recipe_text(recipe), f"recipe {recipe}"), f"recipe {recipe}")
    if path is not None:
        _merge(cfg, read_toml_file(path), str(path))
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        _merge(cfg, ov, "override")
    _check_relations(cfg)
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (tune.space)
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML; `load_config` of this text gives the same config back."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if not (isinstance(v, dict) and k == "steps")]
        lines.append("")
        tables = values.get("steps") if isinstance(values.get("steps"), dict) else {}
        for table, inner in tables.items():  # [curation.<step>]
            lines += [f"[{section}.{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in inner.items()] + [""]
    return "\n".join(lines)


REFERENCE_COMMAND = "leantrain config --reference --markdown > docs/configuration.md"

_REFERENCE_INTRO = """\
One TOML file with the sections below ({sections}); resolution order, later wins: defaults <
`--recipe` < the TOML file < `--section.field=value`. `[curation.<step>]` tables set the fields of one
curation step ([data.md](data.md)). Unknown keys, wrong types, NaN or infinite numbers and out-of-range values
(each field's range is in the tables; sizes have sane upper bounds, and a model over 10^13 parameters is
refused as unallocatable) are one-line errors naming the key, the value and what is allowed, before any
folder is made. An override is read as its field's type, never guessed: `--data.path=2024-06-01` is a path
(TOML would read a date), `--optim.lr=1` a float, a bool takes `true`/`false`/`1`/`0`, and a string is taken
as typed (spaces and `=` included; one pair of surrounding quotes is removed). A config file that is a
folder, not UTF-8, unreadable or not TOML says which. `leantrain config [CONFIG] [--recipe NAME]` prints the
resolved config; `leantrain config --recipes` lists the shipped recipes."""

# The docs pages that explain each section, linked under its heading in the reference.
_SECTION_PAGES = {
    "model": ("training.md",), "data": ("data.md",), "train": ("training.md",), "optim": ("optimizers.md",),
    "parallel": ("scaling.md",), "precision": ("performance.md",), "checkpoint": ("fault-tolerance.md",),
    "guard": ("fault-tolerance.md",), "log": ("training.md", "tracking.md"), "finetune": ("finetune.md",),
    "energy": ("energy.md",), "curation": ("data.md",), "prune": ("compression.md",), "distill": ("compression.md",),
    "tune": ("tune.md",),
    "federated": ("federated.md",),
}


def reference_markdown() -> str:
    """docs/configuration.md, generated from the dataclasses so it cannot drift (tests/test_docs.py checks)."""
    lines = ["# Configuration reference", "",
             f"<!-- generated from src/leantrain/config.py: regenerate with `{REFERENCE_COMMAND}` -->", "",
             _REFERENCE_INTRO.format(sections=" ".join(f"`[{s}]`" for s in _SECTION_TYPES)), ""]
    fields = describe()
    for section in _SECTION_TYPES:
        pages = " and ".join(f"[{page}]({page})" for page in _SECTION_PAGES.get(section, ()))
        lines += [f"## [{section}]", ""] + ([f"Explained in {pages}.", ""] if pages else [])
        lines += ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
        rows = [(k, d, a, h.replace("|", r"\|")) for k, d, a, h in fields if k.startswith(section + ".")]
        lines += [f"| `{k}` | `{d!r}` | {a} | {h} |" for k, d, a, h in rows]
        lines.append("")
    return "\n".join(lines)


def describe() -> list[tuple[str, Any, str, str]]:
    """(key, default, allowed, help) for every field: docs/configuration.md and `leantrain config --reference`."""
    rows = []
    for section, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("tables"):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{section}.{_key(f)}", default, _allowed(f), f.metadata["help"]))
    return rows
