"""The report of a run (one offline HTML page built from its run directory) and the comparison of runs.

The names load on first use, so `import leantrain` (which makes this package callable as
`leantrain.report(...)`) does not pay for the page builders."""

from __future__ import annotations

from typing import Any

__all__ = ["render", "write_report"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from leantrain.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'leantrain.report' has no attribute {name!r}")
