"""Optimizers beyond AdamW, in plain PyTorch: LAMB, Lion, Muon and schedule-free AdamW.

Each is a `torch.optim.Optimizer` over the same two parameter groups as AdamW (decay / no decay),
so checkpoints store their state like AdamW's: per-parameter tensors and scalars, group scalars in
the param groups. Under FSDP2 the parameters are DTensor shards; the element-wise math runs on the
local shard, and what needs the whole tensor (LAMB's norms, Muon's orthogonalisation) gathers it.
"""

from leantrain.train.optimizers.lamb import Lamb
from leantrain.train.optimizers.lion import Lion
from leantrain.train.optimizers.muon import Muon, newton_schulz
from leantrain.train.optimizers.schedule_free import ScheduleFreeAdamW

__all__ = ["Lamb", "Lion", "Muon", "ScheduleFreeAdamW", "newton_schulz"]
