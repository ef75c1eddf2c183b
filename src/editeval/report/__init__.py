"""A run's report: ``editeval report RUN_DIR`` writes one folder with ``index.html`` (leaderboard,
plots, one image grid row per sample, filters by task and method; opens offline by double-click)
and ``Leaderboard.md``. :mod:`.build` gathers what the report shows from a
:class:`~editeval.run.Run`, :mod:`.plots` draws the figures, :mod:`.html` writes the folder."""

from editeval.report.build import ReportData, collect, leaderboard_table
from editeval.report.html import build_report

__all__ = ["ReportData", "build_report", "collect", "leaderboard_table"]
