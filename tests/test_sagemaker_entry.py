"""The SageMaker container side, without the SDK: hyperparameters -> overrides, metric regexes, the entry point."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.resources import files
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
from .installed import IsolatedPython

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


@pytest.mark.slow
def test_entry_point_trains_in_a_simulated_sagemaker_container(tmp_path: Path, bare_python: IsolatedPython) -> None:
    """SageMaker's layout and env, the launcher's source dir on a Python without dogbreed, two demo epochs; then the
    metric regexes."""
    from dogbreed.sagemaker.launcher import source_dir

    opt_ml = tmp_path / "opt" / "ml"
    channel = opt_ml / "input" / "data" / "training"
    shutil.copytree(Path(str(files("dogbreed") / "demo_data")), channel)
    (opt_ml / "input" / "config").mkdir(parents=True)
    (opt_ml / "model").mkdir()
    (opt_ml / "output" / "data").mkdir(parents=True)
    (opt_ml / "checkpoints").mkdir()
    overrides = [
        "experiment=demo", "model.lr=0.002", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "data.image_size=32", "data.resize_size=36",
    ]  # fmt: skip
    hps = {k: json.dumps(v) for k, v in overrides_to_hyperparameters(overrides).items()}
    hps |= {"sagemaker_program": json.dumps(ENTRY_SCRIPT), "sagemaker_region": '"us-east-1"'}
    (opt_ml / "input" / "config" / "hyperparameters.json").write_text(json.dumps(hps))
    env = {
        **bare_python.env(),
        "SAGEMAKER_BASE_DIR": str(opt_ml), "SM_CHANNELS": '["training"]', "SM_CHANNEL_TRAINING": str(channel),
        "SM_MODEL_DIR": str(opt_ml / "model"), "SM_OUTPUT_DATA_DIR": str(opt_ml / "output" / "data"),
        "SM_NUM_GPUS": "0", "SM_CURRENT_HOST": "algo-1", "SM_HOSTS": '["algo-1"]', "OMP_NUM_THREADS": "2",
    }  # fmt: skip
    assert "data.source=" + str(channel) in container_overrides(env)
    with source_dir() as code:
        proc = subprocess.run(
            [str(bare_python.python), ENTRY_SCRIPT], cwd=code, env=env, capture_output=True, text=True, timeout=300
        )
        assert (code / "dogbreed" / "conf" / "train.yaml").is_file() and not (code / "dogbreed" / "demo_data").exists()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert {"model.pt", "model_config.json", "classes.json"} <= {p.name for p in (opt_ml / "model").iterdir()}
    assert (opt_ml / "output" / "data" / "metrics.json").is_file()
    assert (opt_ml / "checkpoints" / "last.ckpt").is_file()

    # every generated regex matches its line of this real log and extracts the number printed there
    lines = [line for line in log.splitlines() if re.search(r"\] (epoch=\d+|test) \S+=", line)]
    printed: dict[str, float] = {}
    for line in lines:
        for token in line.split("] ", 1)[1].split():
            if "=" in token:
                key, value = token.split("=")
                printed[key] = float(value)
    assert set(printed) <= set(SAGEMAKER_METRICS), f"printed but not defined: {set(printed) - set(SAGEMAKER_METRICS)}"
    for definition in metric_definitions(SAGEMAKER_METRICS):
        found = [float(m.group(1)) for line in lines if (m := re.search(definition["Regex"], line))]
        assert found, f"{definition['Name']} never matched in:\n" + "\n".join(lines)
        assert found[-1] == printed[definition["Name"]]
    test_metrics = json.loads((opt_ml / "output" / "data" / "metrics.json").read_text())
    assert printed["test/acc"] == test_metrics["test/acc"]  # printed at full precision
    # the tuner's objective: the best val/acc of the epochs printed so far, on every epoch line
    epochs = [dict(t.split("=") for t in line.split("] ", 1)[1].split()) for line in lines if "] epoch=" in line]
    assert len(epochs) == 2
    for i, epoch in enumerate(epochs):
        assert float(epoch["val/acc_best"]) == max(float(e["val/acc"]) for e in epochs[: i + 1])


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
