"""``python -m dogbreed.report DIR``: (re)build the HTML report of a run dir.

A training run dir (outputs/train/runs/<time>) gets report/profiler-report.html and report/rules.json; a
tuning run dir (outputs/tune/<study_name>, recognised by its trials.csv) gets report/tuning-report.html.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dogbreed.report.builder import build_report
from dogbreed.report.tuning import build_tuning_report
from dogbreed.rundir import is_tuning_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dogbreed.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="e.g. outputs/train/runs/2026-01-01_12-00-00 or outputs/tune/dogbreed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if is_tuning_dir(args.run_dir):
            print(f"report: {build_tuning_report(args.run_dir)}")
            return 0
        html_path, rules_path = build_report(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {html_path}\nrules:  {rules_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
