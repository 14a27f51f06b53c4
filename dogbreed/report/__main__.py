"""``python -m dogbreed.report RUN_DIR``: (re)build a run's HTML report and rules.json."""

from __future__ import annotations

import argparse
import logging
import sys

from dogbreed.report.builder import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dogbreed.report", description=__doc__)
    parser.add_argument("run_dir", help="a run directory, e.g. outputs/train/runs/2026-01-01_12-00-00")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        html_path, rules_path = build_report(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {html_path}\nrules:  {rules_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
