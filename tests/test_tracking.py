"""MLflow tracking against a real ``mlflow server`` (conftest's ``mlflow_server``), read back with ``MlflowClient``.

A demo run and its resume (``resume=RUN_DIR`` continues the same MLflow run), then a 3-trial tune (one parent run,
a child per trial with its state). Commands run as users run them, in subprocesses.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dogbreed.rundir import LOGGED_METRICS, MLFLOW_RUN, trial_dir
from dogbreed.tracking import DATA_DIGEST_TAG, GIT_COMMIT_TAG, PARENT_RUN_TAG, TRIAL_STATE_TAG, flat_params

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "experiment=demo", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2", "data.num_workers=0", "data.cache=false", "data.image_size=32",
    "data.resize_size=36",
]  # fmt: skip


def run(args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stderr[-5000:]}"


def logged_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The CSV logger's ``metrics.csv`` files (one per process of a resumed run) as ``{name: [(step, value), ...]}``."""
    history: dict[str, list[tuple[int, float]]] = {}
    for path in run_dir.glob(LOGGED_METRICS):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key != "step":
                        history.setdefault(key, []).append((int(row["step"]), float(value)))
    return history


def test_flat_params_are_the_names_users_type() -> None:
    assert flat_params({"model": {"lr": 1e-3, "optimizer": {"_target_": "x"}}, "seed": 1, "tags": {}}) == {
        "model.lr": 1e-3, "model.optimizer._target_": "x", "seed": 1, "tags": {},
    }  # fmt: skip


@pytest.mark.slow
def test_a_run_and_its_resume_are_one_mlflow_run(mlflow_server: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracking = ["logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_server}", "logger.mlflow.experiment_name=demo"]
    run(["dogbreed.train", *SMALL, *tracking, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], ROOT)
    saved = json.loads((run_dir / MLFLOW_RUN).read_text())
    assert saved["tracking_uri"] == mlflow_server
    client = MlflowClient(mlflow_server)
    first = client.get_run(saved["run_id"])
    assert first.info.status == "FINISHED" and client.get_experiment(first.info.experiment_id).name == "demo"
    params = first.data.params
    assert params["model.lr"] == "0.002" and params["data.batch_size"] and params["trainer.max_epochs"] == "1"
    assert not [key for key in params if "/" in key]  # not Lightning's model/lr
    commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    assert first.data.tags[GIT_COMMIT_TAG] == commit  # of the folder the run started in
    assert len(first.data.tags[DATA_DIGEST_TAG]) == 64
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {
        "model",
        "metrics.json",
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "data-report.json",
        "report",
    } <= artifacts
    model = {a.path for a in client.list_artifacts(first.info.run_id, "model")}
    assert model >= {"model/model.pt", "model/classes.json"}

    run(["dogbreed.train", f"resume={run_dir}", "trainer.max_epochs=2"], tmp_path)
    assert json.loads((run_dir / MLFLOW_RUN).read_text())["run_id"] == saved["run_id"]  # the same run continued
    resumed = client.get_run(saved["run_id"])
    assert resumed.data.params["trainer.max_epochs"] == "1" and resumed.data.tags["changed.trainer.max_epochs"] == "2"
    # every metric of the CSV logger, at the same steps, across both processes
    for name, history in logged_metrics(run_dir).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(saved["run_id"], name))
        assert [step for step, _ in got] == [step for step, _ in sorted(history)], name
        assert [value for _, value in got] == pytest.approx([value for _, value in sorted(history)]), name
    assert max(step for step, _ in logged_metrics(run_dir)["epoch"]) > 0
    assert len(client.search_runs([first.info.experiment_id])) == 1


@pytest.mark.slow
def test_a_study_is_a_parent_run_with_a_child_per_trial(mlflow_server: str, tmp_path: Path) -> None:
    tune_dir = tmp_path / "tune"
    run(
        ["dogbreed.tune", *SMALL, "trainer.max_epochs=2", "tune.n_trials=3", "tune.pruner=asha",
         "logger=mlflow", f"logger.mlflow.tracking_uri={mlflow_server}", "logger.mlflow.experiment_name=study",
         f"hydra.run.dir={tune_dir}"],
        ROOT,
    )  # fmt: skip
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("study")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if PARENT_RUN_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_RUN_TAG) == parent.info.run_id]
    assert len(children) == len(runs) - 1 == 3
    assert parent.data.params["tune.n_trials"] == "3" and "hparams_search.params.model.lr.type" in parent.data.params
    study = json.loads((tune_dir / "study.json").read_text())
    assert parent.data.tags["best_trial"] == str(study["best_trial"])
    best_run = json.loads((trial_dir(tune_dir, study["best_trial"]) / MLFLOW_RUN).read_text())["run_id"]
    assert parent.data.tags["best_run_id"] == best_run
    with open(tune_dir / "trials.csv", newline="") as f:
        states = {int(row["trial"]): row["state"] for row in csv.DictReader(f)}
    for child in children:
        number = int(child.data.tags["optuna.trial"])
        assert child.data.tags[TRIAL_STATE_TAG] == states[number]
        assert child.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[states[number]]
        assert "model.lr" in child.data.params and client.get_metric_history(child.info.run_id, "val/acc")
