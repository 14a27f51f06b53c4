"""The launcher's source dir run by SageMaker's own training toolkit, as the PyTorch training image runs it.

The container is ``tests/sagemaker_job.py``'s. The toolkit runs on ``bare_python`` (tests/installed.py), which
has no dogbreed: a module the source dir lacks fails the job, as in the image.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dogbreed.sagemaker.hyperparameters import metric_regex, overrides_to_hyperparameters

from .conftest import compose_config
from .installed import IsolatedPython
from .sagemaker_job import lay_out_job, pack_source_dir, toolkit_env

SAGEMAKER_METRICS = list(compose_config(["+sagemaker=default"]).sagemaker.metrics)
EPOCHS = 2
SMALL = [
    "experiment=demo", f"trainer.max_epochs={EPOCHS}", "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "data.num_workers=0", "data.cache=false",
    "data.image_size=32", "data.resize_size=36", "report=false",
]  # fmt: skip


def run_job(
    tmp_path: Path, python: IsolatedPython, overrides: list[str] = (), *, checkpoints: bool = False,
    sourcedir: Path | None = None, hyperparameters: dict[str, Any] | None = None,
) -> tuple[Path, str, int]:  # fmt: skip
    """Lay out ``<tmp>/opt/ml`` as SageMaker does, run the toolkit's ``train`` on ``python``; return base dir, log,
    exit code.

    The job runs ``sourcedir`` (default: the launcher's source dir from this checkout) with ``hyperparameters``
    (default: ``overrides``'); ``python`` has no dogbreed, as the PyTorch training image has none.
    """
    if hyperparameters is None:
        hyperparameters = overrides_to_hyperparameters(list(overrides))
    base = lay_out_job(
        tmp_path / "opt" / "ml", hyperparameters, sourcedir or pack_source_dir(tmp_path / "sourcedir.tar.gz"),
        checkpoints=checkpoints,
    )  # fmt: skip
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = toolkit_env(python, base, scratch)
    proc = subprocess.run([str(python.bin / "train")], env=env, cwd=tmp_path, capture_output=True, timeout=600)
    # bytes, not text=True: universal newlines would turn a progress bar's \r into line breaks
    return base, (proc.stdout + proc.stderr).decode("utf-8", "replace"), proc.returncode


def per_epoch_values(metrics_csv: Path) -> dict[str, list[float | int]]:
    """Each epoch-level metric in ``metrics.csv`` (``train/loss_epoch`` as ``train/loss``), in logged order."""
    values: dict[str, list[float | int]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and not key.endswith("_step") and key not in ("epoch", "step"):
                    values.setdefault(key.removesuffix("_epoch"), []).append(float(value))
    return values


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [False, True], ids=["no-checkpoint-dir", "checkpoint-dir"])
def test_training_toolkit_runs_the_job(tmp_path: Path, bare_python: IsolatedPython, checkpoints: bool) -> None:
    base, log, code = run_job(tmp_path, bare_python, SMALL, checkpoints=checkpoints)
    assert code == 0, log[-5000:]
    assert (base / "output" / "success").is_file() and not (base / "output" / "failure").exists()
    assert f"from {base / 'code' / 'dogbreed'}" in log  # the shipped copy ran, not the checkout
    assert "Requirement already satisfied" in log and "Collecting" not in log  # nothing downloaded
    model = base / "model"
    assert {"model.pt", "model_config.json", "classes.json"} <= {p.name for p in model.iterdir()}

    # no progress bar; every metric's regex matches once per epoch (test/*: once), at full precision
    assert "\r" not in log
    output = base / "output" / "data"
    logged = per_epoch_values(next(output.glob("csv/version_*/metrics.csv")))
    logged["epoch"] = list(range(EPOCHS))  # the line's header, an int
    test_metrics = json.loads((output / "metrics.json").read_text())
    for name in SAGEMAKER_METRICS:
        found = re.findall(metric_regex(name), log)
        expected = [test_metrics[name]] if name.startswith("test/") else logged[name]
        assert len(expected) == (1 if name.startswith("test/") else EPOCHS), name
        assert [float(v) for v in found] == expected, f"{name}: printed {found}, logged {expected}"
        assert found == [repr(v) for v in expected]  # the float's own digits, not a rounded form
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if re.search(r"\] (epoch=\d+|test) \S+=", line)]
    printed = {token.split("=")[0] for line in lines for token in line.split() if "=" in token}
    assert printed <= set(SAGEMAKER_METRICS), f"printed but not defined: {printed - set(SAGEMAKER_METRICS)}"
    # the tuner's objective: the best val/acc of the epochs so far, on every epoch line
    val_acc = [float(v) for v in re.findall(metric_regex("val/acc"), log)]
    best = [float(v) for v in re.findall(metric_regex("val/acc_best"), log)]
    assert best == [max(val_acc[: i + 1]) for i in range(EPOCHS)]

    # checkpoints: synced to <base>/checkpoints when SageMaker provides it, else scratch; never uploaded
    uploaded = [p for p in [*output.rglob("*"), *model.rglob("*")] if p.is_file()]
    assert not [p for p in uploaded if p.suffix == ".ckpt"]
    assert sum(p.stat().st_size for p in uploaded if output in p.parents) < (model / "model.pt").stat().st_size
    kept = base / "checkpoints" if checkpoints else tmp_path / "tmp" / "dogbreed-checkpoints"
    assert {"last.ckpt", Path(test_metrics["best_checkpoint"]).name} <= {p.name for p in kept.iterdir()}
    assert Path(test_metrics["best_checkpoint"]).parent == kept  # the test ran on the best checkpoint


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("model=resnet999", "Could not find 'model/resnet999'"),  # Hydra names it
        ("trainer.max_epochs=abc", "TypeError: '>' not supported"),  # the overrides that follow name it
    ],
)
def test_training_toolkit_reports_a_bad_override(
    tmp_path: Path, bare_python: IsolatedPython, override: str, error: str
) -> None:
    """SageMaker shows ``output/failure`` as the job's FailureReason: the error and the overrides given."""
    base, log, code = run_job(tmp_path, bare_python, ["experiment=demo", override])
    assert code != 0, log[-3000:]
    failure = (base / "output" / "failure").read_text()
    assert error in failure and f"Job overrides: experiment=demo {override}" in failure, failure
    assert len(failure) <= 1024 and not (base / "output" / "success").exists()
