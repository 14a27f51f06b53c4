"""The run report: one self-contained HTML file and rules.json, written at the end of training and on demand."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dogbreed._io import cpu_description
from dogbreed.report import build_report, plots
from dogbreed.report.__main__ import main as report_main
from dogbreed.report._html import table
from dogbreed.rules import PROFILER_RULES, RULES
from dogbreed.rundir import Trial

# a 1x1 PNG: a plot the tuning report embeds as it is
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.mark.slow  # reads the shared demo run (trained once per session)
def test_training_wrote_the_report(debug_demo_run: Path) -> None:
    html = (debug_demo_run / "report" / "profiler-report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    images = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(images) >= 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:|/|\.\./)', html)  # opens offline: nothing to fetch
    assert not re.search(r"&amp;(gt|lt|amp|quot|#x27);", html)  # text is escaped once, not twice
    for section in ("Rules", "Job summary", "Training and validation", "Gradient norms per layer",
                    "Step durations", "System usage", "Test results", "Worst classes"):  # fmt: skip
        assert f">{section}</h" in html, section
    assert {p.name for p in (debug_demo_run / "report").iterdir()} == {"profiler-report.html", "rules.json"}


@pytest.mark.slow  # reads the shared demo run (trained once per session)
def test_demo_report_shows_the_machine_the_training_processes_and_no_empty_header(debug_demo_run: Path) -> None:
    html = (debug_demo_run / "report" / "profiler-report.html").read_text()
    assert "<tr><th></th>" not in html
    # a step time means little without the CPU's vector extensions and the kernels torch chose on it
    cpu = f"{cpu_description()} ({torch.backends.cpu.get_cpu_capability()})"
    assert f"<td>CPU (torch kernels)</td><td>{cpu}</td>" in html
    assert "<td>CPU % of the training processes</td>" in html and "<td>CPU total % (machine)</td>" in html
    samples = (debug_demo_run / "profiler-output" / "system.jsonl").read_text().splitlines()
    assert all("proc_cpu" in json.loads(line) for line in samples)


@pytest.mark.slow  # reads the shared demo run (trained once per session)
def test_rules_json_lists_every_configured_rule(debug_demo_run: Path) -> None:
    rules = json.loads((debug_demo_run / "report" / "rules.json").read_text())
    assert [r["name"] for r in rules] == [*RULES, *PROFILER_RULES]
    html = (debug_demo_run / "report" / "profiler-report.html").read_text()
    for rule in rules:
        assert {"name", "status", "step", "message", "recommendation"} <= set(rule)
        assert rule["status"] in ("NoIssuesFound", "IssuesFound", "Error", "NotApplicable")
        assert f"<td>{rule['name']}</td>" in html


@pytest.mark.slow  # reads the shared demo run (trained once per session)
def test_report_cli_rebuilds_an_old_run_without_its_model(debug_demo_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(debug_demo_run, old, ignore=shutil.ignore_patterns("model", "checkpoints", "report"))
    done = subprocess.run(
        [sys.executable, "-m", "dogbreed.report", str(old)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (old / "report" / "profiler-report.html").is_file() and "report:" in done.stdout
    assert json.loads((old / "report" / "rules.json").read_text()) == json.loads(
        (debug_demo_run / "report" / "rules.json").read_text()
    )


def test_report_of_a_run_without_debug_output_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="callbacks=default"):
        build_report(tmp_path)
    done = subprocess.run([sys.executable, "-m", "dogbreed.report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "callbacks=default" in done.stderr


def test_report_cli_builds_the_tuning_report_of_a_tune_dir(tmp_path: Path) -> None:
    """A tune run dir (it has trials.csv), as python -m dogbreed.tune leaves it after one complete trial."""
    (tmp_path / "trials.csv").write_text(
        "trial,state,objective,epochs,duration_s,model.lr\n0,PRUNED,,1,3.5,1e-05\n1,COMPLETE,0.8125,2,7.5,0.0012345678\n"
    )
    study = {
        "study_name": "breeds",
        "direction": "maximize",
        "metric": "val/acc",
        "best_trial": 1,
        "best_value": 0.8125,
    }
    (tmp_path / "study.json").write_text(json.dumps(study))
    (tmp_path / "best_overrides.txt").write_text("experiment=demo\nmodel.lr=0.0012345678\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "optimization_history.png").write_bytes(base64.b64decode(TINY_PNG))

    assert report_main([str(tmp_path)]) == 0
    html = (tmp_path / "report" / "tuning-report.html").read_text()
    assert re.findall(r'<img[^>]*src="([^"]*)"', html) == [f"data:image/png;base64,{TINY_PNG}"]
    assert "Not drawn (needs at least two complete trials)" in html and html.count("Not drawn") == 2
    assert '<tr class="pruned"><td>0</td><td>PRUNED</td><td>-</td>' in html
    assert (
        '<tr class="best"><td>1 (best)</td><td>COMPLETE</td><td>0.8125</td><td>2</td><td>7.5 s</td><td>0.001235</td>'
        in html
    )
    assert "<td>trials</td><td>2 (1 complete, 1 pruned, 0 failed)</td>" in html
    assert "<pre>python -m dogbreed.train experiment=demo model.lr=0.0012345678</pre>" in html
    assert not (tmp_path / "report" / "rules.json").exists()  # not taken for a training run


# ---- what a newcomer saw in the reports (issue 11, item 11) ---------------------------------------------------------
def test_key_value_tables_have_no_empty_header_row() -> None:
    assert table(["", ""], [["study", "breeds"]]) == "<table><tr><td>study</td><td>breeds</td></tr></table>"
    assert table(["parameter", "value"], [["lr", 1]]).startswith("<table><tr><th>parameter</th><th>value</th></tr>")


def debugger_trial(gradient_steps: list[int], relu_only_steps: list[int], layers: int = 3) -> Trial:
    """What the debugger saves: gradients every save_interval, ReLU inputs alone at the steps between."""
    records = [
        {"name": f"gradients/net.layer{i}.weight", "mode": "train", "step": s, "l2": 0.1 * (i + 1) * (s + 1)}
        for s in gradient_steps
        for i in range(layers)
    ]
    records += [{"name": "relu_input/net.relu", "mode": "train", "step": s, "l2": 1.0} for s in relu_only_steps]
    return Trial(path=Path("."), records=records)


def test_gradient_heat_map_has_a_labelled_column_per_gradient_step() -> None:
    trial = debugger_trial(gradient_steps=[0, 16, 32, 48], relu_only_steps=list(range(1, 10)))
    assert len(trial.steps("train")) == 13  # the 13 saved steps of the newcomer's run
    names, steps, grid = plots.gradient_grid(trial)
    assert names == [f"gradients/net.layer{i}.weight" for i in range(3)]
    assert steps == [0, 16, 32, 48] and grid.shape == (3, 4) and np.isfinite(grid).all()  # no blank column
    ax = plots.gradient_figure(trial).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "16", "32", "48"]
    assert all(t.get_fontsize() >= plots.FONT for t in ax.get_yticklabels())


def test_gradient_heat_map_labels_every_kth_of_many_steps() -> None:
    ax = plots.gradient_figure(debugger_trial(list(range(0, 10_000, 100)), [])).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:3] == ["0", "300", "600"] and len(labels) <= 40


@pytest.mark.parametrize("classes", [10, 40, 133])
def test_confusion_matrix_names_classes_at_a_readable_size(classes: int) -> None:
    """10 pt names (12.5 px at the report's 90 dpi; they were 7 pt), one per 1.3 text heights at least."""
    names = [("Cavalier_king_charles_spaniel" if i % 7 == 0 else f"Breed_{i}") for i in range(classes)]
    fig = plots.confusion_figure(np.eye(classes, dtype=int).tolist(), names)
    fig.set_dpi(90)
    fig.tight_layout()
    fig.canvas.draw()
    ax = fig.axes[0]
    every = 1 if classes <= 40 else round(classes / len(ax.get_xticklabels()))
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [t.get_text() for t in labels] == names[::every]
        assert all(t.get_fontsize() >= plots.FONT for t in labels)
    pitch_px = ax.get_window_extent().width / classes * every
    assert pitch_px >= 1.3 * plots.FONT * 90 / 72, pitch_px
    assert fig.get_size_inches()[0] * 90 <= 1100  # as wide as the page at most: the browser does not shrink it
    assert ("named" in ax.get_xlabel()) == (every > 1)


def write_profile(run_dir: Path, samples: list[dict]) -> None:
    (run_dir / "profiler-output").mkdir(parents=True)
    (run_dir / "profiler-output" / "system.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_system_usage_shows_the_training_processes_beside_the_machine(tmp_path: Path) -> None:
    machine = {"cpu": [97.0, 99.0], "cpu_total": 98.0, "mem_percent": 40.0, "mem_used_gb": 50.0, "iowait": 0.0}
    old, new = tmp_path / "old", tmp_path / "new"
    write_profile(old, [{"t": i * 0.5, **machine, "gpus": []} for i in range(8)])  # recorded before proc_*
    write_profile(new, [{"t": i * 0.5, **machine, "proc_cpu": 25.0, "proc_mem_percent": 3.0, "gpus": []}
                        for i in range(8)])  # fmt: skip
    old_html, new_html = (build_report(d)[0].read_text() for d in (old, new))
    for html in (old_html, new_html):
        assert "<td>CPU total % (machine)</td><td>98.0</td>" in html and "<tr><th></th>" not in html
    assert "<td>CPU % of the training processes</td><td>25.0</td>" in new_html
    assert "<td>memory % of the training processes</td><td>3.0</td>" in new_html
    assert "training processes" not in old_html.split(">System usage<")[1].split("<h2>")[0]  # missing: not shown
    contention = {r["name"]: r for r in json.loads((new / "report" / "rules.json").read_text())}["CPUContention"]
    assert contention["status"] == "IssuesFound" and "other processes 73%" in contention["message"]
