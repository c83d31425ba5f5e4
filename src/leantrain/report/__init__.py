"""The report of a run: one offline HTML page built from its run directory."""

from leantrain.report.html import render, write_report

__all__ = ["render", "write_report"]
