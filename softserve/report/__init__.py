"""Reports on a label set: what the teacher saw and said, as figures, HTML and JSON.

``compute_report(StoreSource(path))`` reads every stored epoch once and returns the
numbers; ``write_report(data, out)`` draws the figures (matplotlib, the ``report`` extra)
and writes the page. ``softserve report`` does both.
"""

from softserve.report.numbers import ReportData, ReportOptions, compute_report, view_stats
from softserve.report.source import EpochRows, LabelSource, RemoteSource, SetInfo, StoreSource

__all__ = [
    "EpochRows",
    "LabelSource",
    "RemoteSource",
    "ReportData",
    "ReportOptions",
    "SetInfo",
    "StoreSource",
    "compute_report",
    "view_stats",
]
