"""leantrain: train transformer language models efficiently, from one CPU to many GPUs, and know what it costs.

The public Python API (docs/api.md), defined in `leantrain.api`:

    import leantrain
    leantrain.prepare(...)       leantrain.load_config(...)   leantrain.train(...)
    leantrain.load_model(...)    leantrain.generate(...)      leantrain.evaluate(...)
    leantrain.export(...)        leantrain.report(...)        leantrain.compare(...)
    leantrain.compress(...)      leantrain.__version__

The functions load on first use, so `import leantrain` costs no torch import. `train`, `export`, `report`
and `compress` are also the names of subpackages (`leantrain.train.trainer`, `leantrain.export.hf`), and a
package attribute cannot be both: so those package modules are made callable here (the module
class swap the language reference documents under "customizing module attribute access"), and
`leantrain.train(cfg)` runs `leantrain.api.train` while `import leantrain.train.trainer` still works.
"""

from __future__ import annotations

import importlib
import types
from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("leantrain")
except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["LoadedModel", "TrainResult", "__version__", "compare", "compress", "evaluate", "export", "federate",
           "generate", "load_config", "load_model", "prepare", "report", "synth", "train", "tune", "tune_show"]
_FROM_API = frozenset({"LoadedModel", "TrainResult", "compare", "evaluate", "federate", "generate", "load_config",
                       "load_model", "prepare", "tune_show"})


def __getattr__(name: str) -> Any:
    if name in _FROM_API:
        from leantrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'leantrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _CallableRoom(types.ModuleType):
    """A subpackage that is also the API function of the same name (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from leantrain import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


# the package __init__ files are light: no torch here
for _room in ("train", "export", "report", "compress", "tune", "synth"):
    importlib.import_module(f"leantrain.{_room}").__class__ = _CallableRoom
del _room
