"""dogbreed as a user installs it: the wheel, in an environment where the checkout cannot be imported.

``installed_python`` (tests/installed.py) has the wheel built once per session and the third-party packages,
and every command starts from a folder outside the repository, so a module or file the wheel lacks fails here
as it fails for a user. Each command also hides the extras it does not need (tests/installed.py ``hiding``).
The tour: train the demo with a user's own experiment, report, check the data, package, predict, serve a
photo, tune one trial, and launch SageMaker training and tuning jobs (moto) whose uploaded code SageMaker's
training toolkit then runs in ``bare_python``, which has no dogbreed but what the job brought.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import urllib.request
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from mlflow.tracking import MlflowClient

from dogbreed.serve.package import extract_package

from .conftest import ask_about_photo, free_port, wait_until_up, write_image_folder
from .installed import ROOT, IsolatedPython, hidden_except, hiding
from .test_sagemaker_serving_toolkit import sagemaker_serving
from .test_sagemaker_training_toolkit import run_job

PHOTO = ROOT / "examples" / "images" / "Labrador_retriever_06457.jpg"
SMALL_DEMO = """# @package _global_
# a user's experiment outside the package: the demo, one short epoch
defaults:
  - demo
trainer:
  max_epochs: 1
  limit_train_batches: 3
  limit_val_batches: 2
  limit_test_batches: 2
data:
  num_workers: 0
  cache: false
report: false
"""
SMALL = [
    "experiment=demo", "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2", "data.num_workers=0", "data.cache=false", "report=false",
]  # fmt: skip


def run(python: IsolatedPython, cmd: list[str], cwd: Path, *extras: str, timeout: float = 600) -> str:
    """Run ``cmd`` (a console script of ``python``'s venv) in ``cwd`` with only ``extras`` importable; its stdout."""
    env = python.env(**hiding(cwd / f".hide-{'-'.join(extras) or 'none'}", hidden_except(*extras)))
    result = subprocess.run(
        [str(python.bin / cmd[0]), *cmd[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder, outside the repository, with an experiment of their own in ``my_conf/``."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_conf" / "experiment").mkdir(parents=True)
    (folder / "my_conf" / "experiment" / "small_demo.yaml").write_text(SMALL_DEMO)
    return folder


@pytest.fixture(scope="module")
def demo_run(installed_python: IsolatedPython, work: Path) -> Path:
    """``dogbreed-train --config-dir my_conf experiment=small_demo`` with no extra installed; the run dir."""
    run(installed_python, ["dogbreed-train", "--config-dir", "my_conf", "experiment=small_demo", "hydra.run.dir=run"],
        work)  # fmt: skip
    return work / "run"


@pytest.fixture(scope="module")
def demo_package(installed_python: IsolatedPython, demo_run: Path, work: Path) -> Path:
    """``dogbreed-package RUN_DIR -o model.tar.gz`` of the demo run, with no extra installed."""
    run(installed_python, ["dogbreed-package", str(demo_run), "-o", "model.tar.gz"], work)
    return work / "model.tar.gz"


def test_the_checkout_is_out_of_reach(installed_python: IsolatedPython, bare_python: IsolatedPython) -> None:
    """A module that exists only in the checkout imports in the test environment but not in the isolated ones."""
    name = f"_checkout_only_{uuid.uuid4().hex[:8]}"
    probe = ROOT / "dogbreed" / f"{name}.py"
    probe.write_text('"""Written and deleted by tests/test_installed.py."""\n')
    code = f"import dogbreed.{name}"
    try:
        editable = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
        assert editable.returncode == 0, editable.stderr  # the editable finder answers from the checkout
        for python in (installed_python, bare_python):
            isolated = subprocess.run(
                [str(python.python), "-c", code], env=python.env(), cwd="/", capture_output=True, text=True, timeout=60
            )
            missing = "dogbreed" if python is bare_python else f"dogbreed.{name}"
            assert f"No module named '{missing}'" in isolated.stderr, isolated.stderr
    finally:
        probe.unlink()
    where = installed_python.check_output("import dogbreed, torch, lightning; print(dogbreed.__file__)")
    assert Path(where.strip()).is_relative_to(installed_python.root), where


@pytest.mark.slow
def test_wheel_trains_from_another_directory_with_no_extra(
    installed_python: IsolatedPython, demo_run: Path, work: Path
) -> None:
    """The configs, demo data and page come from the wheel; a user's config dir adds an experiment."""
    site = Path(installed_python.check_output("import dogbreed; print(dogbreed.__file__)", cwd=work).strip()).parent
    assert (site / "conf" / "train.yaml").is_file() and (site / "demo_data" / "train").is_dir()
    assert {path.name for path in (site / "serve" / "static").iterdir()} >= {"index.html", "app.js", "style.css"}
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test/acc" in metrics
    assert (demo_run / "model" / "model.pt").is_file()


@pytest.mark.slow
def test_report_check_package_predict_and_serve(
    installed_python: IsolatedPython, demo_run: Path, demo_package: Path, work: Path
) -> None:
    """The README's commands after training, each from the user's folder with only its own extra."""
    run(installed_python, ["dogbreed-report", str(demo_run)], work)
    assert (demo_run / "report" / "profiler-report.html").is_file()
    demo_data = installed_python.check_output("import dogbreed, pathlib; print(pathlib.Path(dogbreed.__file__).parent)")
    checked = run(installed_python, ["dogbreed-data", "check", f"{demo_data.strip()}/demo_data"], work)
    assert "10 classes" in checked and "problems: none" in checked

    with tarfile.open(demo_package) as tar:
        assert "code/dogbreed/serve/handlers.py" in tar.getnames()
    run(installed_python, ["dogbreed-predict", "model.tar.gz", str(PHOTO.parent), "-o", "predictions.csv"], work)
    with open(work / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list(PHOTO.parent.glob("*.jpg"))) and all(not row["error"] for row in rows)

    port = free_port()
    log = work / "serve.log"
    env = installed_python.env(**hiding(work / ".hide-serve", hidden_except("serve")))
    cmd = [str(installed_python.bin / "dogbreed-serve"), "model.tar.gz", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(cmd, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(f"{url}/ping", server, timeout=120, log=log)
            predictions = ask_about_photo(url, PHOTO)
            assert len(predictions) == 5 and predictions[0]["label"]
            with urllib.request.urlopen(f"{url}/", timeout=10) as page:
                assert b"<html" in page.read().lower()
            with urllib.request.urlopen(f"{url}/static/app.js", timeout=10) as script:
                assert script.headers["Content-Type"].startswith("text/javascript")  # the page's files, from the wheel
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


@pytest.mark.slow
def test_tune_one_trial(installed_python: IsolatedPython, work: Path) -> None:
    run(installed_python, ["dogbreed-tune", *SMALL, "tune.n_trials=1", "hydra.run.dir=tune"], work, "tune")
    assert (work / "tune" / "trials.csv").read_text().count("\n") == 2
    assert (work / "tune" / "report" / "tuning-report.html").is_file()


@pytest.mark.slow
def test_mlflow_extra_alone_tracks_a_run(installed_python: IsolatedPython, mlflow_server: str, work: Path) -> None:
    """``pip install "dogbreed[mlflow]"``: a run logs to a real MLflow server, without the other extras.

    mlflow-skinny itself depends on FastAPI and uvicorn, so the mlflow extra brings the serve extra's packages.
    """
    uri = f"logger.mlflow.tracking_uri={mlflow_server}"
    run(installed_python, ["dogbreed-train", *SMALL, "logger=mlflow", uri, "logger.mlflow.experiment_name=installed",
                           "hydra.run.dir=tracked"], work, "mlflow", "serve")  # fmt: skip
    client = MlflowClient(mlflow_server)
    (tracked,) = client.search_runs([client.get_experiment_by_name("installed").experiment_id])
    assert tracked.data.params["trainer.max_epochs"] == "1" and tracked.data.metrics["test/acc"] >= 0
    assert "model" in {a.path for a in client.list_artifacts(tracked.info.run_id)}


@pytest.mark.slow
def test_sagemaker_jobs_from_the_wheel_run_in_the_training_toolkit(
    installed_python: IsolatedPython, bare_python: IsolatedPython, aws_env: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``dogbreed-sagemaker train`` and ``tune`` from the wheel (moto); the training job's uploaded code then
    runs in SageMaker's training toolkit in an environment without dogbreed, as the PyTorch image runs it."""
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # SDK v3's role check needs IAM simulation, not in moto
    bucket = "dogbreed-installed"
    boto3.client("s3").create_bucket(Bucket=bucket)
    data = write_image_folder(tmp_path / "dogs")
    small = ["data.num_workers=0", "data.cache=false", "data.image_size=32", "data.resize_size=36", "report=false"]
    overrides = [
        "sagemaker.role=arn:aws:iam::123456789012:role/SM", f"sagemaker.bucket={bucket}", "experiment=demo",
        f"data.source={data}", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", *small,
    ]  # fmt: skip
    name = run(installed_python, ["dogbreed-sagemaker", "train", *overrides], tmp_path, "sagemaker").split()[-1]
    tuning = run(installed_python, ["dogbreed-sagemaker", "tune", *overrides], tmp_path, "sagemaker").split()[-1]
    sagemaker = boto3.client("sagemaker")
    assert sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning)[
        "HyperParameterTuningJobName"
    ]
    job = sagemaker.describe_training_job(TrainingJobName=name)
    code = next(c for c in job["InputDataConfig"] if c["ChannelName"] == "code")["DataSource"]["S3DataSource"]["S3Uri"]
    source_bucket, _, key = code.removeprefix("s3://").partition("/")
    sourcedir = tmp_path / "sourcedir.tar.gz"
    boto3.client("s3").download_file(source_bucket, key, str(sourcedir))

    hyperparameters = {k: json.loads(v) for k, v in job["HyperParameters"].items()}
    base, log, returncode = run_job(tmp_path / "job", bare_python, sourcedir=sourcedir, hyperparameters=hyperparameters)
    assert returncode == 0, log[-5000:]
    assert f"from {base / 'code' / 'dogbreed'}" in log  # the job's own copy ran
    assert (base / "output" / "success").is_file() and (base / "model" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+ on PATH; none found")
def test_torchserve_serves_the_demo_package_without_dogbreed(
    demo_package: Path, bare_python: IsolatedPython, tmp_path: Path
) -> None:
    """The wheel's ``model.tar.gz`` of the demo, as the stock PyTorch container serves it: SageMaker's toolkit and
    TorchServe, dogbreed only from the package's ``code/``."""
    extract_package(demo_package, tmp_path / "ml" / "model")
    photo = PHOTO.read_bytes()
    with sagemaker_serving(tmp_path / "ml", bare_python, tmp_path, tmp_path / "torchserve.log") as (url, _):
        jpeg = httpx.post(f"{url}/invocations", content=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert jpeg.status_code == 200, jpeg.text
        body = json.dumps({"image": base64.b64encode(photo).decode()})
        as_json = httpx.post(
            f"{url}/invocations", content=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert as_json.status_code == 200 and as_json.json() == jpeg.json()
        assert len(jpeg.json()["predictions"]) == 5
        bad = httpx.post(f"{url}/invocations", content=b"not a photo", headers={"Content-Type": "image/jpeg"})
        assert bad.status_code == 400 and bad.json()["error"] == "not_an_image"
    assert "ModuleNotFoundError" not in (tmp_path / "torchserve.log").read_text()  # no worker died loading it
