"""The run reports, one self-contained HTML file each, rebuilt from a run dir: ``python -m dogbreed.report DIR``.

- Training run: ``report/profiler-report.html`` and ``rules.json`` from ``debug-output/``,
  ``profiler-output/``, ``metrics.json``, ``confusion_matrix.csv`` and ``csv/metrics.csv``; it can be rebuilt
  for an old run without its model.
- Tuning run (``python -m dogbreed.tune``): ``report/tuning-report.html`` from ``study.json``,
  ``trials.csv``, ``best_overrides.txt`` and ``plots/``; it needs neither Optuna nor the study's database.
"""

from dogbreed.report.builder import build_report, collect_rules, report_run
from dogbreed.report.tuning import build_tuning_report, report_tuning
from dogbreed.rundir import is_tuning_dir

__all__ = ["build_report", "build_tuning_report", "collect_rules", "is_tuning_dir", "report_run", "report_tuning"]
