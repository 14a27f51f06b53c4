"""Every ``scripts/bench_*.py`` runs end to end at tiny sizes, so that a refactor cannot break a benchmark unnoticed.

These check that each script runs and prints its table, not its figures: a few steps or images each, on the CPU.
A new benchmark script fails :func:`test_every_benchmark_has_a_smoke_test` until it gets a case here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY_BREEDS, write_image_folder

REPO = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    """Run a benchmark script from the repo root on one torch thread; return its output (stdout and stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{output[-4000:]}"
    return output


@pytest.fixture
def fashion_like_run(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A run dir as training leaves it: ``model/``, ``metrics.json`` and its staged data with a test split."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    data = write_image_folder(tmp_path / "data", classes=TINY_BREEDS, counts={"train": 3, "valid": 2, "test": 2})
    (run / "data-report.json").write_text(json.dumps({"root": str(data)}))
    (run / "metrics.json").write_text(json.dumps({"test/acc": 0.1}))
    return run


CASES = {
    "bench_data.py": (["--images", "24", "--workers", "0", "--batch-size", "8", "--repeats", "1"], "x baseline"),
    "bench_debugger.py": (["--epochs", "1", "--limit-batches", "2", "--repeats", "1"], "overhead ratio, CPU time"),
    "bench_train.py": (
        ["--steps", "2", "--warmup", "1", "--repeats", "1", "--batch-size", "4", "--threads", "1"],
        "ratio plain/Lightning",
    ),
    "bench_tune.py": (
        ["--trials", "2", "--epochs", "1", "--train-batches", "1", "--seeds", "0", "--pruners", "median"],
        "goal (within 1 point",
    ),
    "bench_quickstart.py": (
        [
            "--extra",
            "trainer.max_epochs=1 +trainer.limit_train_batches=2 +trainer.limit_val_batches=1 "
            "+trainer.limit_test_batches=1 data.image_size=24 data.resize_size=28 report=false",
            "unfused, EMA=model.optimizer.fused=false callbacks=[default,ema]",  # not a name for a Hydra path
            "--reference",
            "unfused, EMA=100",
        ],
        "| optimizer | est. 100 s x row / unfused, EMA |",
    ),
    "bench_serve.py": (
        shlex.split(
            "--threads 1 --runtimes eager openvino-int8 --iterations 1 --c1-requests 2 --requests 4 "
            "--calibration-size 8"
        ),
        "Goals at batch 1, one thread",
    ),
}


def test_every_benchmark_has_a_smoke_test() -> None:
    scripts = {path.name for path in (REPO / "scripts").glob("bench_*.py")}
    assert scripts == {*CASES, "bench_accuracy.py"}, "give each scripts/bench_*.py a tiny case in this file"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_at_tiny_sizes(script: str, tmp_path: Path) -> None:
    args, expected = CASES[script]
    if script == "bench_tune.py":
        args = [*args, "--out", str(tmp_path / "tune")]
    output = run_script(script, *args)
    assert expected in output


@pytest.mark.slow
def test_bench_train_options_rows_run_at_tiny_sizes(tmp_path: Path) -> None:
    """The fast-path option rows (the mode whose rows broke once unnoticed)."""
    output = run_script(
        "bench_train.py", "--device", "cpu", "--steps", "2", "--warmup", "1", "--images", "20", "--image-size", "32",
        "--workers", "0", "--batch-size", "4", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert "+ device augmentation" in output and "vs baseline" not in output  # the plain table without --markdown


@pytest.mark.slow
def test_bench_accuracy_scores_every_runtime_on_a_run(fashion_like_run: Path, tmp_path: Path) -> None:
    output = run_script(
        "bench_accuracy.py", "--runtimes", "--run", str(fashion_like_run), "--calibration-size", "8",
        "--test-images", "10", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    rows = [line for line in output.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["eager", "export", "onnx", "openvino", "openvino-int8"]
    assert rows[0].startswith("| `eager` |") and "+0.00 points | 1.0000 |" in rows[0]
    assert "10 test images" in output and "INT8 loses" in output
