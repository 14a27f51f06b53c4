"""The run report: one self-contained HTML file and rules.json, written at the end of training and on demand."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dogbreed.callbacks.debugger_rules import RULES
from dogbreed.callbacks.profiler_rules import PROFILER_RULES
from dogbreed.report import build_report
from dogbreed.report.__main__ import main as report_main

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
