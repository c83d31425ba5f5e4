"""Checkpoints that survive crashes and never execute code when loaded.

One `Checkpointer` per run directory (`checkpointer.py`) writes, lists, prunes and loads them, in
one of two formats, each a small writer/reader of its own:

    full.py      the whole state in one safetensors file per kind (model, optim), written by one
                 process; resumes at any world size and layout
    sharded.py   every rank writes its own shards (torch.distributed.checkpoint, safetensors storage)
                 for models whose full state does not fit one host

Both keep step, tokens, loader, RNG and optimizer scalars in state.json (`state.py`) and list every
file with its size and sha256 in manifest.json (`manifest.py`), written last. Loading reads only the
files the manifest lists, confined to the checkpoint folder, and never unpickles anything.
`checkpoints/step-0000100/` is one checkpoint; `checkpoints/latest` names the newest whole one.
"""

from leantrain.train.checkpoint.checkpointer import (
    Checkpointer,
    consolidate,
    read_checkpoint,
    restore,
    restore_full,
)
from leantrain.train.checkpoint.state import (
    Snapshot,
    gather_snapshot,
    rng_state,
    set_rng_state,
    snapshot,
)

__all__ = ["Checkpointer", "Snapshot", "consolidate", "gather_snapshot", "read_checkpoint", "restore",
           "restore_full", "rng_state", "set_rng_state", "snapshot"]
