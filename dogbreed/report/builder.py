"""Assemble the report from a run directory: rules first, then what explains them."""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dogbreed.report import plots
from dogbreed.report._html import img, page, read_csv, seconds, table
from dogbreed.rules import ERROR, ISSUES, NOT_APPLICABLE, RuleResult, build_profiler_rules, evaluate_profiler_rules
from dogbreed.rundir import (
    CONFUSION_CSV,
    DEBUG_DIR,
    LOGGED_METRICS,
    METRICS,
    PROFILER_DIR,
    REPORT_DIR,
    REPORT_HTML,
    REPORT_RULES,
    ProfileData,
    Trial,
    load_profile,
    load_trial,
    read_json,
    read_rule_results,
)

log = logging.getLogger(__name__)


def collect_rules(run_dir: str | Path) -> list[RuleResult]:
    """Every configured rule's result: the debugger's as written, the profiler's as written or evaluated now."""
    run_dir = Path(run_dir)
    results: list[RuleResult] = []
    results += [RuleResult.from_dict(r) for r in read_rule_results(run_dir / DEBUG_DIR) or []]
    profiler_results = read_rule_results(run_dir / PROFILER_DIR)
    if profiler_results is not None:
        results += [RuleResult.from_dict(r) for r in profiler_results]
    elif (run_dir / PROFILER_DIR).is_dir():
        results += evaluate_profiler_rules(load_profile(run_dir), build_profiler_rules())
    return results


def _rules_section(results: list[RuleResult]) -> str:
    fired = [r for r in results if r.status in (ISSUES, ERROR)]
    rows = [
        [r.name, r.kind, f'<span class="{r.status}">{r.status}</span>', "" if r.step is None else r.step,
         r.message, r.recommendation]
        for r in sorted(results, key=lambda r: (r.status not in (ISSUES, ERROR), r.kind, r.name))
    ]  # fmt: skip
    if fired:
        lead = f"<div class='box'><b>{len(fired)} of {len(results)} rules found issues.</b> What to change:<ul>"
        lead += "".join(
            f"<li><b>{html.escape(r.name)}</b>{'' if r.step is None else f' (step {r.step})'}: "
            f"{html.escape(r.message)}. "
            f"{html.escape(r.recommendation)}</li>"
            for r in fired
        )
        lead += "</ul></div>"
    else:
        lead = f"<div class='box'>All {len(results)} rules found no issues.</div>"
    return lead + table(["rule", "kind", "status", "step", "message", "recommendation"], rows, raw={2})


def _job_summary(profile: ProfileData) -> tuple[str, dict[str, float | None]]:
    meta = profile.meta
    created, first, train_end, end = (meta.get(k) for k in ("created", "first_step", "train_end", "end"))
    phases = {
        "initialisation": first - created if first and created else None,
        "training loop": train_end - first if train_end and first else None,
        "finalisation (test, export)": end - train_end if end and train_end else None,
    }
    durations = profile.step_values("duration")
    rows = [[k, seconds(v)] for k, v in phases.items()]
    rows += [
        ["training steps", len(profile.steps)],
        ["mean / median step", f"{np.nanmean(durations) * 1000:.0f} / {np.nanmedian(durations) * 1000:.0f} ms"]
        if durations.size else ["mean / median step", "-"],
        ["device", f"{meta.get('accelerator', '?')} x {meta.get('devices', '?')}, {meta.get('gpu_count', 0)} GPU(s)"],
        ["CPU (torch kernels)", f"{meta.get('cpu', '?')} ({meta.get('torch_cpu_kernels', '?')})"],
        ["CPU cores / dataloader workers", f"{meta.get('cpu_count', '?')} / {meta.get('num_workers', '?')}"],
        ["batch size", meta.get("batch_size", "?")],
    ]  # fmt: skip
    return table(["", ""], rows), phases


def _system_table(profile: ProfileData) -> str:
    def row(name: str, values: np.ndarray) -> list[Any]:
        values = values[np.isfinite(values)]
        if not values.size:
            return [name, "-", "-", "-", "-"]
        return [name, *(f"{np.percentile(values, q):.1f}" for q in (5, 50, 95)), f"{values.max():.1f}"]

    rows = [row("CPU total % (machine)", profile.series("cpu_total"))]
    if profile.series("proc_cpu").size:  # runs recorded before the monitor sampled the process tree lack it
        rows.append(row("CPU % of the training processes", profile.series("proc_cpu")))
    rows.append(row("memory % (machine)", profile.series("mem_percent")))
    if profile.series("proc_mem_percent").size:
        rows.append(row("memory % of the training processes", profile.series("proc_mem_percent")))
    rows.append(row("I/O wait %", profile.series("iowait")))
    cores = np.asarray([s["cpu"] for s in profile.system], dtype=float)
    if cores.ndim == 2 and cores.size:
        rows += [row(f"CPU core {i} %", cores[:, i]) for i in range(min(cores.shape[1], 16))]
    if profile.has_gpu:
        util, mem = profile.gpu_series("util"), profile.gpu_series("mem_percent")
        for g in range(util.shape[1]):
            rows += [row(f"GPU{g} utilisation %", util[:, g]), row(f"GPU{g} memory %", mem[:, g])]
    return table(["metric", "p5", "p50", "p95", "max"], rows)


def _phase_table(profile: ProfileData) -> str:
    rows = []
    for key in ("duration", "dataloader", "forward", "backward", "optimizer"):
        values = profile.step_values(key)[1:]
        values = values[np.isfinite(values)]
        if values.size:
            rows.append([key, f"{values.mean() * 1000:.1f}", f"{np.median(values) * 1000:.1f}",
                         f"{np.percentile(values, 95) * 1000:.1f}"])  # fmt: skip
    return table(["per step (first excluded)", "mean ms", "median ms", "p95 ms"], rows) if rows else ""


def _read_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _confusion_section(run_dir: Path) -> str:
    rows = _read_rows(run_dir / CONFUSION_CSV)
    metrics = read_json(run_dir / METRICS, {})
    if not rows and not metrics:
        return '<p class="muted">No test results in this run (metrics.json, confusion_matrix.csv).</p>'
    out = ""
    headline = {k: v for k, v in metrics.items() if k.startswith("test/") and isinstance(v, int | float)}
    if headline:
        out += table(["test metric", "value"], [[k, f"{v:.4f}"] for k, v in sorted(headline.items())])
    per_class = metrics.get("test/per_class_acc") or {}
    if per_class:
        worst = sorted(per_class.items(), key=lambda kv: kv[1])[:10]
        out += "<h3>Worst classes</h3>" + table(["class", "test accuracy"], [[n, f"{a:.1%}"] for n, a in worst])
    if rows:
        names = rows[0][1:]
        matrix = [[int(x) for x in r[1:]] for r in rows[1:]]
        pairs = sorted(
            ((matrix[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j),
            reverse=True,
        )[:10]
        pairs = [p for p in pairs if p[0] > 0]
        if pairs:
            out += "<h3>Most frequent confusions</h3>" + table(
                ["true", "predicted as", "images"], [[t, p, n] for n, t, p in pairs]
            )
        out += img(plots.confusion_png(matrix, names), "confusion matrix")
    return out


def _top_ops(profile: ProfileData) -> str:
    if not profile.top_ops:
        return (
            '<p class="muted">No torch.profiler trace (set callbacks.profiler.trace_steps=[10,15] to record one).</p>'
        )
    rows = [
        [o["name"], o["calls"], *(f"{o.get(k, 0):.2f}" for k in ("self_cpu_ms", "cpu_total_ms", "self_device_ms"))]
        for o in profile.top_ops
    ]
    return table(["operator", "calls", "self CPU ms", "CPU total ms", "self GPU ms"], rows) + (
        '<p class="muted">Full trace: profiler-output/trace.json (open in https://ui.perfetto.dev, offline too).</p>'
    )


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report/profiler-report.html`` and ``report/rules.json`` for ``run_dir``; return both paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory: pass a run directory (outputs/train/runs/<time>).")
    if not (run_dir / DEBUG_DIR).is_dir() and not (run_dir / PROFILER_DIR).is_dir():
        raise FileNotFoundError(
            f"{run_dir} has neither {DEBUG_DIR}/ nor {PROFILER_DIR}/: train with callbacks=default (which adds the "
            "debugger and profiler callbacks) to get a report."
        )
    results = collect_rules(run_dir)
    trial: Trial | None = load_trial(run_dir) if (run_dir / DEBUG_DIR).is_dir() else None
    profile = load_profile(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    rules_path = out_dir / REPORT_RULES
    rules_path.write_text(json.dumps([r.to_dict() for r in results], indent=2))

    summary_table, phases = _job_summary(profile)
    # the CSV logger writes csv/metrics.csv, or csv/version_N/metrics.csv: take the newest
    logged = sorted(run_dir.glob(LOGGED_METRICS), key=lambda p: p.stat().st_mtime)
    metrics_csv = read_csv(logged[-1]) if logged else []
    stddev = next((r.parameters.get("stddev", 3) for r in results if r.name == "StepOutlier"), 3)
    sections = [
        "<h2>Rules</h2>" + _rules_section(results),
        "<h2>Job summary</h2>" + summary_table + img(plots.summary_bar(phases), "job timeline"),
        "<h2>Training and validation</h2>" + img(plots.loss_curves(trial, metrics_csv), "loss and accuracy curves"),
        "<h2>Gradient norms per layer</h2>" + img(plots.gradient_norms(trial), "per-layer gradient norms"),
        "<h2>Step durations</h2>" + _phase_table(profile) + img(plots.step_plots(profile, stddev), "step durations"),
        "<h2>System usage</h2>" + _system_table(profile) + img(plots.system_timeline(profile), "system timeline"),
        "<h2>Top operators</h2>" + _top_ops(profile),
        "<h2>Test results</h2>" + _confusion_section(run_dir),
    ]  # fmt: skip
    html_path = out_dir / REPORT_HTML
    html_path.write_text(page(f"dogbreed report: {run_dir.name}", "Training report", run_dir, sections))
    not_applicable = sum(r.status == NOT_APPLICABLE for r in results)
    issues = [r.name for r in results if r.status == ISSUES]
    log.info(
        "Report %s: %d rules, issues: %s (%d not applicable)", html_path, len(results), issues or "none", not_applicable
    )
    return html_path, rules_path


def report_run(run_dir: str | Path) -> Path | None:
    """The end-of-training report: skipped without profiler/debugger output, and never fails the run."""
    run_dir = Path(run_dir)
    if not (run_dir / DEBUG_DIR).is_dir() and not (run_dir / PROFILER_DIR).is_dir():
        log.info("No debugger/profiler output in %s: no report (callbacks=default adds them).", run_dir)
        return None
    try:
        return build_report(run_dir)[0]
    except Exception:  # the model and metrics are already written; a broken plot must not fail training
        log.exception("Could not build the report; rerun it with: python -m dogbreed.report %s", run_dir)
        return None
