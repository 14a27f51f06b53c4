"""The run report: ``RUN_DIR/report/profiler-report.html`` (one self-contained file) and ``rules.json``.

It reads the run directory only (``debug-output/``, ``profiler-output/``, ``metrics.json``,
``confusion_matrix.csv``, ``csv/metrics.csv``), so it can be rebuilt for an old run without its model:
``python -m dogbreed.report RUN_DIR``.
"""

from dogbreed.report.builder import build_report, collect_rules, report_run

__all__ = ["build_report", "collect_rules", "report_run"]
