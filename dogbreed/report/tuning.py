"""The tuning report: ``TUNE_DIR/report/tuning-report.html`` from what ``python -m dogbreed.tune`` wrote.

It reads the run dir only (``study.json``, ``trials.csv``, ``best_overrides.txt``, ``plots/*.png``), never the
Optuna study, so it rebuilds without Optuna or the study's database: ``python -m dogbreed.report TUNE_DIR``.
"""

from __future__ import annotations

import base64
import html
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap

from dogbreed.report._html import img, page, read_csv, seconds, table
from dogbreed.rundir import (
    BEST_OVERRIDES,
    PLOT_DIR,
    REPORT_DIR,
    STUDY_JSON,
    TRIAL_COLUMNS,
    TRIALS_CSV,
    TUNING_HTML,
    is_tuning_dir,
    read_json,
)

log = logging.getLogger(__name__)

# plots/<name>.png: title, and why it may be missing
PLOTS = {
    "optimization_history": ("Optimisation history", "drawn once a trial has completed"),
    "param_importances": ("Parameter importance", "needs at least two complete trials"),
    "parallel_coordinate": ("Parallel coordinates", "drawn once a trial has completed"),
}


def readable_parallel_coordinate(ax: Axes) -> Axes:
    """Make every trial visible in Optuna's parallel-coordinates plot (``plots/parallel_coordinate.png``).

    Optuna colours the lines with ``Blues`` from its white end, so the worst trial is drawn white on the
    light background and disappears; keep the hue (darker is better) but start at a mid blue, and widen the lines.
    """
    for lines in (c for c in ax.collections if isinstance(c, LineCollection)):
        cmap = lines.get_cmap()
        low, high = (0.0, 0.55) if cmap.name.endswith("_r") else (0.45, 1.0)  # _r: minimised, best is low
        lines.set_cmap(ListedColormap(cmap(np.linspace(low, high, 256)), name=f"{cmap.name}_visible"))
        lines.set_linewidth(2.0)
    return ax


def _number(text: str) -> str:
    """A parameter value as written in trials.csv, floats shortened to 4 significant digits for the table."""
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def _objective(text: str) -> str:
    return f"{float(text):.4f}" if text else "-"


def _summary(study: dict[str, Any], trials: list[dict[str, str]]) -> str:
    counts = Counter(t["state"] for t in trials)
    shown = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}  # and any other state seen (RUNNING)
    shown |= {s: s.lower() for s in sorted(counts) if s not in shown}
    states = ", ".join(f"{counts[s]} {word}" for s, word in shown.items())
    best = study.get("best_trial")
    epochs = sum(int(t["epochs"] or 0) for t in trials)
    durations = [float(t["duration_s"]) for t in trials if t["duration_s"]]
    rows = [
        ["study", study.get("study_name", "-")],
        ["direction", study.get("direction", "-")],
        ["objective metric", study.get("metric") or "-"],
        ["trials", f"{len(trials)} ({states})"],
        ["best trial", "-" if best is None else best],
        ["best objective", "-" if study.get("best_value") is None else f"{study['best_value']:.4f}"],
        ["epochs spent (all trials)", epochs],
        ["trial time (sum)", seconds(sum(durations) if durations else None)],
    ]
    lead = ""
    if not study:
        lead = (
            f"<div class='box'>No {STUDY_JSON} in this run dir: run the same <code>python -m dogbreed.tune</code> "
            "command again; with its trials already finished it only rewrites the results.</div>"
        )
    elif best is None:
        lead = "<div class='box'><b>No trial has completed yet</b>: there is no best configuration so far.</div>"
    return lead + table(["", ""], rows)


def _best_section(run_dir: Path, best: dict[str, str] | None, params: list[str]) -> str:
    if best is None:
        return '<p class="muted">No best trial (see the summary).</p>'
    out = table(["parameter", "value"], [[p, best[p]] for p in params])
    overrides = run_dir / BEST_OVERRIDES
    if not overrides.is_file():
        return out + f'<p class="muted">No {BEST_OVERRIDES} in this run dir.</p>'
    command = " ".join(["python -m dogbreed.train", *overrides.read_text().split()])
    return (
        out + "<p>Train it (the overrides of <code>best_overrides.txt</code>; <code>tuned/best.yaml</code> holds the "
        f"same values as a config file):</p><pre>{html.escape(command)}</pre>"
    )


def _plots_section(run_dir: Path) -> str:
    out = ""
    for name, (title, why) in PLOTS.items():
        path = run_dir / PLOT_DIR / f"{name}.png"
        out += f"<h3>{title}</h3>"
        if path.is_file():
            out += img(base64.b64encode(path.read_bytes()).decode("ascii"), title)
        else:
            out += f'<p class="muted">Not drawn ({why}).</p>'
    return out


def _trials_section(trials: list[dict[str, str]], best: int | None, metric: str, params: list[str]) -> str:
    if not trials:
        return '<p class="muted">No trial has started yet.</p>'
    rows, classes = [], []
    for t in trials:
        is_best = best is not None and int(t["trial"]) == best
        rows.append(
            [f"{t['trial']} (best)" if is_best else t["trial"], t["state"], _objective(t["objective"]),
             t["epochs"], seconds(float(t["duration_s"])) if t["duration_s"] else "-",
             *(_number(t[p]) if t[p] else "-" for p in params)]
        )  # fmt: skip
        classes.append("best" if is_best else {"PRUNED": "pruned", "FAIL": "failed"}.get(t["state"], ""))
    headers = ["trial", "state", f"objective ({metric})", "epochs", "duration", *params]
    return table(headers, rows, row_classes=classes)


def build_tuning_report(run_dir: str | Path) -> Path:
    """Write ``report/tuning-report.html`` for a tuning run dir and return its path."""
    run_dir = Path(run_dir)
    if not is_tuning_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} has no {TRIALS_CSV}: pass the run dir of python -m dogbreed.tune.")
    study_path = run_dir / STUDY_JSON
    study = read_json(study_path, {})
    trials = read_csv(run_dir / TRIALS_CSV)
    params = [c for c in (trials[0] if trials else {}) if c not in TRIAL_COLUMNS]
    best_number = study.get("best_trial")
    best = next((t for t in trials if best_number is not None and int(t["trial"]) == best_number), None)
    sections = [
        "<h2>Summary</h2>" + _summary(study, trials),
        "<h2>Best configuration</h2>" + _best_section(run_dir, best, params),
        "<h2>Plots</h2>" + _plots_section(run_dir),
        "<h2>Trials</h2>" + _trials_section(trials, best_number, study.get("metric") or "objective", params),
    ]
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / TUNING_HTML
    name = study.get("study_name", run_dir.name)
    html_path.write_text(page(f"dogbreed tuning report: {name}", "Tuning report", run_dir, sections))
    log.info("Tuning report %s: %d trials, best trial %s", html_path, len(trials), best_number)
    return html_path


def report_tuning(run_dir: str | Path) -> Path | None:
    """The end-of-tuning report; never fails the study, whose results are already written."""
    try:
        return build_tuning_report(run_dir)
    except Exception:
        log.exception("Could not build the tuning report; rerun it with: python -m dogbreed.report %s", run_dir)
        return None
