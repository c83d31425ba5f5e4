"""What a run will cost before it starts: memory per device, time, energy, CO2e and money, for a config
on a hardware kind, and the fastest layout that fits.

Time is FLOPs / (devices x peak x MFU). The MFU is not a hope but a measurement: plan/calibration.json
holds the MFU this project's own runs reached per device kind and dtype (written by
`python bench/plan_accuracy.py --calibrate`); the entry nearest in FLOPs per token is used. GPUs
without a measured entry get, in bf16, a roofline (`roofline_mfu`: matmuls at the part's measured best matmul
rate plus memory-bound traffic at its HBM bandwidth, checked against published runs by
bench/plan_vs_published.py), in fp32 the table's documented default. Communication is a rough model on top:
data-parallel collectives overlap with compute (a step takes the longer of the two), tensor-parallel
all-reduces and expert-parallel all-to-alls (MoE: memory holds the total parameters, compute counts the
active ones) do not. Time is split into training (steps x step time) and evaluation (the evaluations
train.eval_every calls for, each train.eval_steps forward passes). Energy is the devices' TDP x time, plus
on a CPU the host's memory power as the energy meter counts it (CodeCarbon's rule, or energy.ram_w), before
PUE; a GPU host's memory is not known to the plan and not counted. CO2e and cost come from
leantrain.energy.cost.footprint with the config's [energy] section: cost = facility kWh x price per kWh +
device-hours x rental price (energy.price_per_device_hour, or with -1 the catalog's listed price).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from leantrain.config import Config, ModelConfig
from leantrain.device import DeviceInfo, choose_attention, choose_dtype
from leantrain.energy.cost import device_hour_price
from leantrain.errors import ConfigError
from leantrain.model.flops import active_param_count, flops_per_token, is_moe_layer, param_count
from leantrain.parallel.distributed import grad_accum_steps
from leantrain.plan.catalog import INTER_NODE_BYTES_S, Hardware, hardware_for
from leantrain.plan.memory import (
    Layout,
    block_activation_bytes,
    estimate_memory,
    head_activation_bytes,
    layout_dict,
    routed_expert_params,
    wrapped_blocks,
)

GPU_USABLE = 0.95  # CUDA context, allocator fragmentation and NCCL buffers take the rest
CPU_USABLE = 0.90  # the OS and everything else on the host


@dataclass
class Estimate:
    """One layout on one hardware kind: does it fit, how long, how much energy, CO2e and money."""

    hardware: Hardware
    layout: Layout
    memory: dict[str, float]
    usable_bytes: float
    params: int
    flops_per_token: float
    tokens_per_step: int
    steps: int
    step_time_s: float
    compute_s: float
    comm_s: float
    time_s: float
    mfu_assumed: float
    mfu_source: str
    energy_kwh: float
    co2_g: float
    cost_usd: float
    footprint: dict[str, Any] = field(default_factory=dict)
    train_s: float = 0.0  # steps x step time
    eval_s: float = 0.0  # the evaluations' forward passes
    evals: int = 0
    device_hours: float = 0.0
    price_per_device_hour: float = 0.0
    price_source: str = ""
    ram_w: float = 0.0  # host memory power counted in energy_kwh
    active_params: int = 0  # parameters one token computes with (MoE: top_k experts); params when dense

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.usable_bytes

    @property
    def peak_memory_bytes(self) -> float:
        return self.memory["total"]

    def block(self) -> dict[str, Any]:
        """The "estimate" block of plan.json."""
        return {
            "hardware": self.hardware.name, "strategy": self.layout.strategy, "dtype": self.layout.dtype,
            "attention": self.layout.attention, "peak_flops": self.hardware.peak(self.layout.dtype),
            "peak_memory_bytes": int(self.memory["total"]), "step_time_s": self.step_time_s, "time_s": self.time_s,
            "mfu_assumed": self.mfu_assumed, "energy_kwh": self.energy_kwh, "co2_g": self.co2_g,
            "cost_usd": self.cost_usd,
            # what the prediction rests on, for the report's predicted-vs-measured table
            "mfu_source": self.mfu_source, "tdp_w": self.hardware.tdp_w, "devices": self.layout.devices,
            "train_time_s": self.train_s, "eval_time_s": self.eval_s, "evals": self.evals, "ram_w": self.ram_w,
            "device_hours": self.device_hours, "price_per_device_hour": self.price_per_device_hour,
            "price_source": self.price_source, "rental_usd": self.footprint.get("rental_usd", 0.0),
            "energy_cost_usd": self.footprint.get("energy_cost_usd", 0.0),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.block(), "hardware_key": self.hardware.key, "devices": self.layout.devices,
                "interconnect": self.hardware.interconnect, "spec_source": self.hardware.spec_source,
                "layout": layout_dict(self.layout), "fits": self.fits, "usable_bytes": self.usable_bytes,
                "memory": self.memory, "params": self.params, "active_params": self.active_params or self.params,
                "flops_per_token": self.flops_per_token,
                "tokens_per_step": self.tokens_per_step, "steps": self.steps, "compute_s": self.compute_s,
                "comm_s": self.comm_s, "mfu_source": self.mfu_source, "footprint": self.footprint}


# ---- calibration --------------------------------------------------------------------------

def load_calibration() -> dict[str, Any]:
    return json.loads(resources.files("leantrain.plan").joinpath("calibration.json").read_text())


def mfu_for(hw: Hardware, dtype: str, m: ModelConfig, table: dict[str, Any] | None = None, attention: str = "sdpa",
            tp: int = 1) -> tuple[float, str]:
    """(MFU, where it came from): the measured entry of this device kind and dtype nearest in FLOPs per
    token; else, for bf16 on a GPU, the roofline below; else the table's default for the kind."""
    table = table or load_calibration()
    fpt = flops_per_token(m)
    rows = [r for r in table["measured"] if r["device"] == hw.key and r["dtype"] == dtype]
    if rows:
        best = min(rows, key=lambda r: abs(math.log(r["flops_per_token"] / fpt)))
        return best["mfu"], f"measured: {best['name']} ({best['date']})"
    default = table["defaults"][hw.kind][dtype]
    if "traffic_per_saved_byte" in default:
        return roofline_mfu(hw, m, default, attention, tp)
    return default["mfu"], f"assumed: {default['source']}"


def roofline_mfu(hw: Hardware, m: ModelConfig, model: dict[str, Any], attention: str = "sdpa",
                 tp: int = 1) -> tuple[float, str]:
    """MFU of a bf16 training step on a GPU from two measured ceilings instead of one guessed percentage.

    A token's time on one device = its FLOPs / (peak x the part's best measured matmul efficiency, MAMF)
    + its memory-bound traffic / HBM bandwidth. The traffic is `traffic_per_saved_byte` x the bytes autograd
    saves per token (plan/memory.py's audited count): every saved activation is written by an elementwise
    kernel (norms, RoPE, SwiGLU, residuals, casts) and read back, with its gradient, in backward. That one
    constant is fitted once, on one published run (plan/calibration.json names it), not per case; the matmul
    efficiency is the catalog's (hardware.toml) or the default for parts nobody measured. Why it matters:
    an H100 has 3.2x an A100's matmul FLOP/s but only 1.6x its bandwidth, so the same model reaches a
    lower MFU on it (34% against 57% in torchtitan's published Llama 3 8B runs; bench/plan_vs_published.py).
    """
    eff = hw.matmul_efficiency or model["matmul_efficiency"]
    fpt = flops_per_token(m) / tp
    saved = m.n_layers * block_activation_bytes(m, "bf16", attention, tp) + head_activation_bytes(m, "bf16", tp)
    traffic = model["traffic_per_saved_byte"] * saved
    seconds = fpt / (hw.peak_bf16 * eff) + traffic / hw.bandwidth_bytes_s
    mfu = fpt / hw.peak_bf16 / seconds
    where = "measured" if hw.matmul_efficiency else "assumed"
    return mfu, (f"roofline: matmuls at {eff:.0%} of peak ({where}) + {traffic / 1e6:,.0f} MB/token of memory "
                 f"traffic at {hw.bandwidth_bytes_s / 1e12:.2g} TB/s; {model['source']}")


# ---- layouts -------------------------------------------------------------------------------

def resolve_dtype(cfg: Config, hw: Hardware) -> str:
    """leantrain.device's rule, as the trainer applies it: `auto` is bf16 where the hardware's bf16 is fast."""
    return choose_dtype(cfg.precision.dtype, hw.bf16_fast)


def attention_kernel(cfg: Config, hw: Hardware, dtype: str) -> str:
    """leantrain.device's rule, as the trainer applies it: matmul attention for bf16 on CPU at short contexts."""
    return choose_attention(cfg.train.attention, "cuda" if hw.kind == "gpu" else "cpu", dtype, cfg.model.seq_len)


def config_layout(cfg: Config, hw: Hardware, devices: int) -> Layout:
    """The layout the trainer would run `cfg` in on `devices` processes."""
    p = cfg.parallel
    if devices % p.ep:
        raise ConfigError(f"config: parallel.ep = {p.ep} does not divide {devices} devices; pick an ep that divides "
                          "the number of devices (--gpus) or lower parallel.ep")
    rest = devices // (p.dp_replicate * p.tp) if p.dp_shard == -1 else p.dp_shard
    if p.dp_replicate * max(rest, 1) * p.tp != devices:
        raise ConfigError(f"config: parallel.dp_replicate x dp_shard x tp = {p.dp_replicate} x {p.dp_shard} x {p.tp} "
                          f"does not multiply to {devices} devices; change [parallel] or --gpus")
    dtype = resolve_dtype(cfg, hw)
    return Layout(dp_replicate=p.dp_replicate, dp_shard=max(rest, 1), tp=p.tp, ac=cfg.train.activation_checkpointing,
                  ac_every=cfg.train.ac_every, micro_batch_size=cfg.train.micro_batch_size,
                  grad_accum_steps=grad_accum_steps(cfg.train, p.dp_replicate * max(rest, 1)), dtype=dtype,
                  attention=attention_kernel(cfg, hw, dtype), reshard_after_forward=p.fsdp_reshard_after_forward,
                  ep=p.ep)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, hw: Hardware, devices: int, global_batch: int) -> list[Layout]:
    """Every layout worth trying on `devices` that keeps the global batch (sequences per step)."""
    dtype = resolve_dtype(cfg, hw)
    out = []
    tps = [t for t in (1, 2, 4, 8) if devices % t == 0 and t <= hw.node_size and cfg.model.n_kv_heads % t == 0
           and (t == 1 or not cfg.model.moe_experts)]  # MoE does not combine with tensor parallel (config.py)
    for tp in tps:
        dp = devices // tp
        dp_layouts = [(dp, 1)] if dp == 1 else [(dp, 1), (1, dp)]
        if 1 < hw.node_size < dp and dp % hw.node_size == 0:  # HSDP: shard inside a node, replicate across
            dp_layouts.append((dp // hw.node_size, hw.node_size))
        per_rank = max(1, math.ceil(global_batch / dp))
        for rep, shard in dp_layouts:
            # the configured expert parallelism where it applies (FSDP2 ranks it divides)
            ep = cfg.parallel.ep if rep == 1 and shard % cfg.parallel.ep == 0 and cfg.model.moe_experts else 1
            for ac in ("none", "selective", "full"):
                for mb in _divisors(per_rank):
                    if mb > 64:
                        break
                    out.append(Layout(dp_replicate=rep, dp_shard=shard, tp=tp, ac=ac, ac_every=cfg.train.ac_every,
                                      micro_batch_size=mb, grad_accum_steps=per_rank // mb, dtype=dtype,
                                      attention=attention_kernel(cfg, hw, dtype), ep=ep))
    return out


# ---- one estimate --------------------------------------------------------------------------

def _footprint(cfg: Config, energy_kwh: float, device_hours: float, price: float) -> dict[str, Any]:
    """CO2e and cost exactly as the trainer accounts them (leantrain.energy, the [energy] section)."""
    from leantrain.energy.cost import footprint

    e = cfg.energy
    return footprint(energy_kwh, region=e.region, pue=e.pue, price_per_kwh=e.price_per_kwh,
                     device_hours=device_hours, price_per_device_hour=price)


def host_ram_w(cfg: Config, hw: Hardware) -> float:
    """Memory power the energy meter adds on this hardware: on a CPU the host's (energy.ram_w or CodeCarbon's
    rule on its installed memory); on a GPU 0, since the plan does not know the host."""
    from leantrain.energy.meters import is_arm, ram_power_w

    if hw.kind != "cpu":
        return 0.0
    return cfg.energy.ram_w or ram_power_w(hw.memory_bytes, is_arm())


def estimate(cfg: Config, hw: Hardware, layout: Layout, calibration: dict[str, Any] | None = None) -> Estimate:
    """Memory, time, energy, CO2e and cost of training `cfg` for cfg.train.steps in `layout` on `hw`."""
    m, t = cfg.model, cfg.train
    # on CPU the checkpoint snapshot (a copy of weights and AdamW state) is taken in the same memory;
    # the logged peak sees it once a checkpoint was written before the last step
    snapshot = hw.kind == "cpu" and 0 < cfg.checkpoint.every < t.steps
    mem = estimate_memory(m, layout, cpu=hw.kind == "cpu", checkpoint_snapshot=snapshot, optimizer=cfg.optim.name)
    fpt = flops_per_token(m)
    dp = layout.dp_replicate * layout.dp_shard
    tokens_per_step = layout.micro_batch_size * layout.grad_accum_steps * dp * m.seq_len
    mfu, mfu_source = mfu_for(hw, layout.dtype, m, calibration, layout.attention, layout.tp)
    recompute = 1 + wrapped_blocks(m.n_layers, layout.ac, layout.ac_every) / m.n_layers / 3  # forward again
    peak_all = hw.peak(layout.dtype) * layout.devices
    compute_s = tokens_per_step * fpt * recompute / (peak_all * mfu)
    comm_s, tp_s = _comm_seconds(m, hw, layout)
    step_s = max(compute_s, comm_s) + tp_s
    evals = len(range(t.eval_every, t.steps, t.eval_every)) + 1 if t.eval_every else 1
    eval_tokens = evals * t.eval_steps * layout.micro_batch_size * dp * m.seq_len
    train_s = step_s * t.steps
    eval_s = eval_tokens * fpt / 3 / (peak_all * mfu)  # forward only: a third of a training step's FLOPs
    time_s = train_s + eval_s
    ram_w = host_ram_w(cfg, hw)
    energy_kwh = (hw.tdp_w * layout.devices + ram_w) * time_s / 3.6e6
    price, price_source = device_hour_price(cfg.energy.price_per_device_hour, hw.price_hour_usd, hw.price_source)
    device_hours = layout.devices * time_s / 3600
    fp = _footprint(cfg, energy_kwh, device_hours, price)
    usable = hw.memory_bytes * (CPU_USABLE if hw.kind == "cpu" else GPU_USABLE)
    return Estimate(hw, layout, mem, usable, param_count(m), fpt, tokens_per_step, t.steps, step_s, compute_s,
                    comm_s + tp_s, time_s, mfu, mfu_source, energy_kwh, fp["co2_g"], fp["cost_usd"], fp,
                    train_s=train_s, eval_s=eval_s, evals=evals, device_hours=device_hours,
                    price_per_device_hour=price, price_source=price_source, ram_w=ram_w,
                    active_params=active_param_count(m))


def _comm_seconds(m: ModelConfig, hw: Hardware, layout: Layout) -> tuple[float, float]:
    """(data-parallel seconds per step, overlapped with compute; tensor- and expert-parallel seconds, not
    overlapped: the next layer waits for their activations)."""
    experts = routed_expert_params(m) if layout.ep > 1 else 0  # not gathered by FSDP2 under expert parallel
    n = (param_count(m) - experts) / layout.tp
    dp = layout.dp_replicate * layout.dp_shard

    def bw(group: int) -> float:
        return hw.link_bytes_s if group * (layout.tp if group == dp else 1) <= hw.node_size else INTER_NODE_BYTES_S

    dp_s = 0.0
    if layout.dp_shard > 1:  # all-gather in forward and backward, reduce-scatter of fp32 gradients
        s = layout.dp_shard
        gather = 2 if layout.dtype == "bf16" else 4  # under bf16, FSDP2's MixedPrecisionPolicy gathers bf16
        dp_s += (2 * gather + 4) * n * (s - 1) / s / bw(s) * layout.grad_accum_steps
    if layout.dp_replicate > 1:  # ring all-reduce of the (sharded) gradients
        r = layout.dp_replicate
        dp_s += 2 * 4 * n / layout.dp_shard * (r - 1) / r / (INTER_NODE_BYTES_S if layout.dp_shard > 1 else bw(r))
    tp_s = 0.0
    if layout.tp > 1:  # two all-reduces of the activations per block in forward, two in backward
        a = 2 if layout.dtype == "bf16" else 4
        tokens = layout.micro_batch_size * m.seq_len * layout.grad_accum_steps
        tp_s = 4 * m.n_layers * 2 * a * tokens * m.dim * (layout.tp - 1) / layout.tp / hw.link_bytes_s
    return dp_s, tp_s + all_to_all_seconds(m, hw, layout)


def all_to_all_seconds(m: ModelConfig, hw: Hardware, layout: Layout) -> float:
    """Expert parallel: per MoE layer and micro-batch, each token's top_k rows go to their experts' ranks and
    come back (two all-to-alls forward, two in backward); (ep - 1) / ep of them leave the rank."""
    if layout.ep <= 1:
        return 0.0
    a = 2 if layout.dtype == "bf16" else 4
    n_moe = sum(is_moe_layer(m, i) for i in range(m.n_layers))
    rows = layout.micro_batch_size * m.seq_len * layout.grad_accum_steps * m.moe_top_k
    link = hw.link_bytes_s if layout.ep <= hw.node_size else INTER_NODE_BYTES_S
    return 4 * n_moe * rows * m.dim * a * (layout.ep - 1) / layout.ep / link


# ---- the plan ------------------------------------------------------------------------------

@dataclass
class Plan:
    """The config as written, every layout tried, the recommendation, and advice when nothing fits."""

    configured: Estimate | None
    recommended: Estimate | None
    candidates: list[Estimate]
    advice: str = ""
    notes: list[str] = field(default_factory=list)
    serving: dict[str, Any] = field(default_factory=dict)  # plan/serving.py: weights + KV cache per format

    def to_dict(self) -> dict[str, Any]:
        return {"configured": self.configured.to_dict() if self.configured else None,
                "recommended": self.recommended.to_dict() if self.recommended else None,
                "fits": self.recommended is not None, "advice": self.advice, "notes": self.notes,
                "serving": self.serving,
                "candidates": [{**layout_dict(e.layout), "peak_memory_bytes": int(e.memory["total"]), "fits": e.fits,
                                "step_time_s": e.step_time_s, "time_s": e.time_s} for e in self.candidates]}


def _rank_key(e: Estimate) -> tuple:
    # fastest first; among equals the larger micro-batch (real MFU rises with it), then fewer steps of accumulation
    return (round(e.step_time_s, 9), -e.layout.micro_batch_size, e.memory["total"])


def plan(cfg: Config, hw: Hardware, devices: int = 1) -> Plan:
    """Estimate the config as written and search the layouts on `devices` for the fastest that fits."""
    if not 1 <= devices <= 1_000_000:  # the largest clusters have ~10^5 devices; more is a typo
        raise ConfigError(f"--gpus {devices}: the device count must be between 1 and 1,000,000")
    calibration = load_calibration()
    notes = []
    try:
        configured = estimate(cfg, hw, config_layout(cfg, hw, devices), calibration)
        global_batch = configured.tokens_per_step // cfg.model.seq_len
    except ConfigError as e:
        configured = None
        notes.append(str(e))
        global_batch = (cfg.train.global_batch_size
                        or cfg.train.micro_batch_size * cfg.train.grad_accum_steps * devices)
    if global_batch % max(1, devices) and devices > 1:
        notes.append(f"the global batch of {global_batch} sequences does not divide over {devices} devices; "
                     "layouts round it up per device")
    cands = [estimate(cfg, hw, lay, calibration) for lay in candidate_layouts(cfg, hw, devices, global_batch)]
    fitting = sorted((e for e in cands if e.fits), key=_rank_key)
    recommended = fitting[0] if fitting else None
    advice = "" if recommended else nothing_fits_advice(cfg, hw, devices, cands)
    ft = getattr(cfg, "finetune", None)
    if ft is not None and (ft.lora_rank or ft.freeze):
        notes.append("LoRA and frozen parameters are not modelled: memory is that of full training, an upper bound")
    if getattr(cfg.precision, "fp8", False):
        notes.append("precision.fp8 is not modelled: time and memory are those of bf16")
    from leantrain.plan.serving import serving_memory

    serving = serving_memory(cfg.model, group_size=cfg.quant.group_size) if hasattr(cfg, "quant") else {}
    return Plan(configured, recommended, cands, advice, notes, serving)


def _gib(x: float) -> str:
    return f"{x / 1024**3:.1f} GiB"


def nothing_fits_advice(cfg: Config, hw: Hardware, devices: int, cands: list[Estimate]) -> str:
    """One paragraph: what the smallest layout needs, what dominates it, and what to change."""
    smallest = min(cands, key=lambda e: e.memory["total"])
    mem = smallest.memory
    msg = (f"nothing fits: the smallest layout ({smallest.layout.strategy}, micro-batch "
           f"{smallest.layout.micro_batch_size}) needs {_gib(mem['total'])} per device; "
           f"{hw.name} offers {_gib(smallest.usable_bytes)}.")
    need = None
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if n <= devices:
            continue
        lay = dataclasses.replace(smallest.layout, dp_replicate=1, dp_shard=n // smallest.layout.tp, ac="full",
                                  micro_batch_size=1, grad_accum_steps=1)
        if estimate(cfg, hw, lay).fits:
            need = n
            break
    state = mem["weights"] + mem["optimizer"] + mem["gradients"]
    if need:
        msg += f" Use at least {need} devices with FSDP2 (parallel.dp_shard = -1) to shard weights and AdamW state"
    else:
        msg += " Even 1024 devices with FSDP2 would not fit it"
    msg += f" (they take {_gib(state)} here); or shrink the model"
    acts = mem["activations"] + mem["temporaries"]
    if acts > 0.3 * mem["total"]:
        msg += f" or model.seq_len (activations and buffers take {_gib(acts)} even at micro-batch 1 with full " \
               "activation checkpointing)"
    return msg + "."


def by_strategy(p: Plan) -> list[Estimate]:
    """Per strategy name (DDP, FSDP2 + AC full, ...): its fastest layout that fits, else its smallest."""
    best: dict[str, Estimate] = {}
    for e in p.candidates:
        name = e.layout.strategy
        cur = best.get(name)
        faster = e.fits and (cur is None or not cur.fits or _rank_key(e) < _rank_key(cur))
        smaller = not e.fits and (cur is None or (not cur.fits and e.memory["total"] < cur.memory["total"]))
        if faster or smaller:
            best[name] = e
    return sorted(best.values(), key=lambda e: (not e.fits, _rank_key(e)))


def _dur(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 72 * 3600 else f"{s / 86400:.1f} days"


def _mem(b: float) -> str:
    return f"{b / 1024**3:.1f} GiB" if b >= 1024**3 else f"{b / 1024**2:.0f} MiB"


def _layout_text(e: Estimate) -> str:
    lay = e.layout
    return (f"{lay.strategy} on {lay.devices}, micro-batch {lay.micro_batch_size}"
            + (f" x accumulation {lay.grad_accum_steps}" if lay.grad_accum_steps > 1 else "") + f", {lay.dtype}")


def _estimate_lines(e: Estimate) -> list[str]:
    mem = e.memory
    parts = ", ".join(f"{k.replace('_', ' ')} {_mem(v)}" for k, v in mem.items()
                      if k not in ("total", "activations_per_token", "peak_phase") and isinstance(v, float | int) and v)
    fp = e.footprint
    where = f"{fp.get('intensity_g_per_kwh', 0):.0f} g/kWh"
    return [f"  peak memory per device {_mem(mem['total'])} of {_mem(e.usable_bytes)} usable: "
            + ("fits" if e.fits else "DOES NOT FIT"),
            f"    {parts} (peak at the {mem['peak_phase']} phase)",
            f"  step {_dur(e.step_time_s)} (compute {_dur(e.compute_s)}, exposed communication "
            f"{_dur(max(0.0, e.step_time_s - e.compute_s))}) x {e.steps:,} steps = {_dur(e.train_s)} training "
            f"+ {_dur(e.eval_s)} evaluation ({e.evals:,} evals) = {_dur(e.time_s)} "
            f"at MFU {e.mfu_assumed:.0%} ({e.mfu_source})",
            f"  energy {e.energy_kwh:.3g} kWh (devices" + (f" + {e.ram_w:g} W host memory" if e.ram_w else "")
            + f"; {fp.get('facility_kwh', 0):.3g} kWh facility), {_co2(e.co2_g)} CO2e at {where}",
            f"  cost {_usd(e.cost_usd)} = rental {_usd(fp.get('rental_usd', 0.0))} ({e.device_hours:,.3g} device-hours "
            f"x ${e.price_per_device_hour:g}/h, {e.price_source}) + electricity {_usd(fp.get('energy_cost_usd', 0.0))}"]


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.2g}"


def _co2(g: float) -> str:
    return f"{g / 1000:,.3g} kg" if g >= 1000 else f"{g:.3g} g"


MAX_ROWS = 10


def describe(p: Plan) -> list[str]:
    """The plan as lines of text for a terminal (the CLI prints them)."""
    any_e = p.configured or p.recommended or (p.candidates[0] if p.candidates else None)
    if any_e is None:
        return [p.advice]
    hw = any_e.hardware
    active = any_e.active_params or any_e.params
    moe = f" ({active / 1e6:,.1f}M active per token)" if active != any_e.params else ""
    lines = [f"model: {any_e.params / 1e6:,.1f}M parameters{moe}, "
             f"{any_e.flops_per_token / 1e6:,.1f} MFLOP per token, "
             f"{any_e.steps:,} steps x {any_e.tokens_per_step:,} tokens = "
             f"{any_e.steps * any_e.tokens_per_step:,} tokens",
             f"hardware: {hw.name} x {any_e.layout.devices}: peak {hw.peak(any_e.layout.dtype) / 1e12:.3g} TFLOP/s "
             f"{any_e.layout.dtype}, {_mem(hw.memory_bytes)} memory, {hw.tdp_w:.0f} W each"
             + (f", {hw.interconnect}" if hw.interconnect else "")
             + (f", rents at ${hw.price_hour_usd:g}/h" if hw.price_hour_usd else ""), ""]
    if p.configured is not None:
        lines += [f"as configured ({_layout_text(p.configured)}):", *_estimate_lines(p.configured), ""]
    lines.append("per strategy (fastest layout that fits, else the smallest):")
    lines.append(f"  {'strategy':34} {'micro-batch':>11} {'memory':>10} {'fits':>5} {'step':>9} {'total':>10}")
    rows = by_strategy(p)
    for e in rows[:MAX_ROWS]:
        mb = f"{e.layout.micro_batch_size}x{e.layout.grad_accum_steps}"
        lines.append(f"  {e.layout.strategy:34} {mb:>11} {_mem(e.memory['total']):>10} {'yes' if e.fits else 'no':>5} "
                     f"{_dur(e.step_time_s):>9} {_dur(e.time_s):>10}")
    if len(rows) > MAX_ROWS:
        lines.append(f"  ... {len(rows) - MAX_ROWS} more strategies (--json lists every layout tried)")
    lines.append("")
    if p.recommended is not None and p.configured is not None and p.recommended.layout == p.configured.layout:
        lines.append(f"recommended: as configured ({_layout_text(p.recommended)})")
    elif p.recommended is not None:
        lines += [f"recommended: {_layout_text(p.recommended)}", *_estimate_lines(p.recommended)]
    else:
        lines.append(p.advice)
    if p.serving:
        kv = next(iter(p.serving.values()))["kv_cache_bytes"]
        lines.append("serving (weights, after `leantrain compress`; + " + _mem(kv) + " KV cache per sequence): "
                     + ", ".join(f"{fmt} {_mem(v['weights_bytes'])}" + (f" ({_mem(v['file_bytes'])} file)"
                                 if v["file_bytes"] != v["weights_bytes"] else "") for fmt, v in p.serving.items()))
    lines += [f"note: {n}" for n in p.notes]
    return lines


def run_layout(cfg: Config, hw: Hardware, info: DeviceInfo, dp_replicate: int = 1, dp_shard: int = 1,
               tp: int = 1) -> Layout:
    """The layout a run set up with these degrees, in the dtype and attention kernel `info` decided."""
    layout = config_layout(cfg, hw, dp_replicate * dp_shard * tp)
    return dataclasses.replace(layout, dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, dtype=info.dtype_name,
                               attention=info.attention)


def run_estimate(cfg: Config, info: DeviceInfo, dp_replicate: int = 1, dp_shard: int = 1,
                 tp: int = 1) -> dict[str, Any]:
    """The "estimate" block of a run's plan.json, for the layout the trainer actually set up on the device
    `describe_device` gave it: on CPU this machine with the measured peak (no second probe); on CUDA the
    catalog row of the device's name (an unknown GPU is planned as an A100 80GB, and says so)."""
    hw = hardware_for(info, cfg.energy.tdp_w)
    return estimate(cfg, hw, run_layout(cfg, hw, info, dp_replicate, dp_shard, tp)).block()


# ---- will it fit? (checked by the trainer before the model is allocated) ---------------------

def _overrides(lay: Layout, base: Layout) -> str:
    """The --section.field=value overrides that turn layout `base` into `lay`."""
    out = []
    if lay.ac != base.ac:
        out.append(f"--train.activation_checkpointing={lay.ac}")
    if lay.micro_batch_size != base.micro_batch_size:
        out.append(f"--train.micro_batch_size={lay.micro_batch_size}")
    if lay.grad_accum_steps != base.grad_accum_steps:
        out.append(f"--train.grad_accum_steps={lay.grad_accum_steps}")
    return " ".join(out)


def fitting_options(cfg: Config, hw: Hardware, base: Layout) -> list[str]:
    """What would fit instead of `base` (on `hw`, whose memory_bytes is what is available), mildest first:
    a smaller micro-batch with the same global batch, activation checkpointing, more ranks under FSDP2."""
    options = []
    per_rank = base.micro_batch_size * base.grad_accum_steps
    smaller = [mb for mb in _divisors(per_rank) if mb < base.micro_batch_size]
    best_mb = 0  # the largest micro-batch that fits without activation checkpointing
    for mb in sorted(smaller, reverse=True):
        lay = dataclasses.replace(base, micro_batch_size=mb, grad_accum_steps=per_rank // mb)
        if estimate(cfg, hw, lay).fits:
            options.append(_overrides(lay, base))
            best_mb = mb
            break
    # activation checkpointing is worth naming when it keeps a larger micro-batch than the option above
    fit = None
    for ac in {"none": ("selective", "full"), "selective": ("full",)}.get(base.ac, ()):
        for mb in sorted((d for d in _divisors(per_rank) if best_mb < d <= base.micro_batch_size), reverse=True):
            lay = dataclasses.replace(base, ac=ac, micro_batch_size=mb, grad_accum_steps=per_rank // mb)
            if estimate(cfg, hw, lay).fits and (fit is None or mb > fit.micro_batch_size):
                fit = lay
                break
    if fit is not None:
        options.append(_overrides(fit, base))
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        if n <= base.devices or n % base.tp or n % base.ep:
            continue
        lay = dataclasses.replace(base, dp_replicate=1, dp_shard=n // base.tp)
        if estimate(cfg, hw, lay).fits:
            options.append(f"{n} ranks with this much memory each under FSDP2 (--parallel.dp_shard=-1)")
            break
    return options


def memory_refusal(cfg: Config, info: DeviceInfo, available_bytes: float, where: str, dp_replicate: int = 1,
                   dp_shard: int = 1, tp: int = 1) -> str | None:
    """None when the run's layout fits in `available_bytes` per process (within the planner's usable
    fraction), else one line with the planner's numbers and the changes that would fit."""
    hw = dataclasses.replace(hardware_for(info, cfg.energy.tdp_w), memory_bytes=available_bytes)
    e = estimate(cfg, hw, run_layout(cfg, hw, info, dp_replicate, dp_shard, tp))
    if e.fits:
        return None
    mem = e.memory
    parts = sorted(((k, v) for k, v in mem.items() if k not in ("total", "activations_per_token", "peak_phase")
                    and isinstance(v, float | int) and v), key=lambda kv: -kv[1])[:3]
    options = fitting_options(cfg, hw, e.layout)
    fix = ("would fit: " + "; or ".join(options)) if options else \
        "nothing of micro-batch, activation checkpointing or up to 1024 ranks would fit it: shrink the model"
    return (f"the model does not fit in memory: the planner estimates {_mem(mem['total'])} per process ("
            + ", ".join(f"{k.replace('_', ' ')} {_mem(v)}" for k, v in parts)
            + f") but {where} offers {_mem(available_bytes)} ({_mem(e.usable_bytes)} usable); {fix}; "
            "or pass --force to start anyway")
