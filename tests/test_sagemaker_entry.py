"""The SageMaker container side, without the SDK: hyperparameters -> overrides, metric regexes, the entry point."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dogbreed.callbacks.metrics_log import format_metrics
from dogbreed.models.classifier import BEST_MODES
from dogbreed.sagemaker.entry import ENTRY_SCRIPT, container_overrides, without_progress_bar
from dogbreed.sagemaker.hyperparameters import (
    hyperparameters_to_overrides,
    metric_definitions,
    overrides_to_hyperparameters,
)

from .conftest import compose_config

SAGEMAKER_METRICS = list(compose_config(["+sagemaker=default"]).sagemaker.metrics)


def test_hyperparameters_round_trip_as_sagemaker_stores_them() -> None:
    overrides = ["experiment=demo", "model.lr=3e-4", "data.mean=[0.5,0.5,0.5]", "~callbacks.early_stopping"]
    hps = overrides_to_hyperparameters(overrides)
    assert hps == {
        "experiment": "demo",
        "model.lr": "3e-4",
        "data.mean": "[0.5,0.5,0.5]",
        "~callbacks.early_stopping": "",
    }
    # the SDK JSON-encodes each value; SageMaker's own keys ride along
    stored = {k: json.dumps(v) for k, v in hps.items()} | {"sagemaker_program": '"dogbreed_entry.py"'}
    assert hyperparameters_to_overrides(stored) == overrides
    # the tuner writes raw values; JSON types render as Hydra values
    tuner = {"model.lr": "0.00123", "data.batch_size": "64", "_tuning_objective_metric": "val/acc"}
    assert hyperparameters_to_overrides(tuner) == ["model.lr=0.00123", "data.batch_size=64"]
    assert hyperparameters_to_overrides({"a": "true", "b": "null", "c": "[1, 2]", "d": "s3://b/k"}) == [
        "a=true", "b=null", "c=[1,2]", "d=s3://b/k",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="hydra"):
        overrides_to_hyperparameters(["hydra.run.dir=x"])


def test_container_overrides_map_channels_dirs_and_checkpoints(tmp_path: Path) -> None:
    weights = tmp_path / "input" / "data" / "weights"
    weights.mkdir(parents=True)
    (weights / "resnet18.pth").write_bytes(b"x")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    env = {
        "SAGEMAKER_BASE_DIR": str(tmp_path), "SM_CHANNEL_TRAINING": "/opt/ml/input/data/training",
        "SM_CHANNEL_WEIGHTS": str(weights), "SM_MODEL_DIR": "/opt/ml/model",
        "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data",
    }  # fmt: skip
    got = container_overrides(env)
    assert "data.source=/opt/ml/input/data/training" in got
    assert f"model.weights={weights / 'resnet18.pth'}" in got
    assert {"paths.model_dir=/opt/ml/model", "paths.output_dir=/opt/ml/output/data"} <= set(got)
    assert f"paths.checkpoint_dir={tmp_path / 'checkpoints'}" in got
    assert f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in got  # a restarted spot job resumes
    shutil.rmtree(tmp_path / "checkpoints")  # no checkpoint_s3_uri: scratch space, not output.tar.gz
    scratch = [o for o in container_overrides(env) if o.startswith(("paths.checkpoint_dir=", "ckpt_path="))]
    assert scratch == [f"paths.checkpoint_dir={Path(tempfile.gettempdir()) / 'dogbreed-checkpoints'}"]
    (weights / "other.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="exactly one"):
        container_overrides(env)


def test_every_printed_metric_has_a_definition() -> None:
    """The names the model logs (see DogBreedClassifier) are the ones the launcher defines regexes for."""
    assert {"epoch", "train/loss", "val/acc", "val/loss", "test/acc"} <= set(SAGEMAKER_METRICS)
    assert {f"{name}_best" for name in BEST_MODES} <= set(SAGEMAKER_METRICS)
    assert len({d["Regex"] for d in metric_definitions(SAGEMAKER_METRICS)}) == len(SAGEMAKER_METRICS)
    # one line with a distinct value per metric: each regex takes its own (val/acc, not val/acc_best's or _top5's)
    values = {name: i + 0.125 for i, name in enumerate(SAGEMAKER_METRICS)}
    line = f"[2026-01-01][dogbreed.callbacks.metrics_log][INFO] {format_metrics(values)} best_val/acc=9.5"
    assert {d["Name"]: float(re.search(d["Regex"], line).group(1)) for d in metric_definitions(values)} == values


def test_metric_lines_print_full_precision() -> None:
    """Each regex reads back the very float the model logged; a non-finite value matches nothing."""
    values = {"val/acc": 0.10000000149011612, "val/loss": 1e-05, "train/loss": -3.2e20, "train/acc": 12.0}
    line = format_metrics(values | {"test/loss": float("nan"), "test/acc": float("inf")})
    assert {d["Name"]: re.search(d["Regex"], line).group(1) for d in metric_definitions(values)} == {
        name: repr(value) for name, value in values.items()
    }
    assert not any(re.search(d["Regex"], line) for d in metric_definitions(["test/loss", "test/acc"]))


@pytest.mark.parametrize(
    "overrides",
    [[], ["callbacks=none"], ["+callbacks.rich._target_=lightning.pytorch.callbacks.RichProgressBar"]],
    ids=["default", "callbacks=none", "rich"],
)
def test_no_progress_bar_in_a_job(overrides: list[str]) -> None:
    """The job's stdout carries metric lines only: whatever the callbacks, no bar is configured."""
    from hydra.utils import get_class
    from lightning.pytorch.callbacks import ProgressBar

    cfg = without_progress_bar(compose_config(["experiment=demo", *overrides]))
    assert cfg.trainer.enable_progress_bar is False
    targets = [c._target_ for c in (cfg.callbacks or {}).values() if "_target_" in c]
    assert not [t for t in targets if issubclass(get_class(t), ProgressBar)]
    assert ("dogbreed.callbacks.LogMetrics" in targets) == ("callbacks=none" not in overrides)


def test_source_dir_ships_the_configs_and_not_the_demo_data() -> None:
    """The launcher's source dir (the job's code) holds the package's configs; the demo images stay behind.

    tests/test_sagemaker_training_toolkit.py runs this source dir in SageMaker's own training toolkit.
    """
    from dogbreed.sagemaker.launcher import source_dir

    with source_dir() as code:
        assert (code / ENTRY_SCRIPT).is_file() and (code / "dogbreed" / "conf" / "train.yaml").is_file()
        assert not (code / "dogbreed" / "demo_data").exists()


@pytest.mark.slow
def test_entry_point_failure_reason(tmp_path: Path) -> None:
    """A job that cannot start leaves SageMaker's failure file naming the problem."""
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text(json.dumps({"experiment": '"demo"'}))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path), "SM_CHANNEL_TRAINING": str(tmp_path / "missing")}
    proc = subprocess.run(
        [sys.executable, "-c", "from dogbreed.sagemaker.entry import main; main()"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    failure = (tmp_path / "output" / "failure").read_text()
    assert "data.source" in failure and failure.endswith("Job overrides: experiment=demo")
