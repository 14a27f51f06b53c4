"""dogbreed as users install it: a built wheel run from another directory, and each extra on its own.

Every command runs in a subprocess whose ``sitecustomize`` hides the packages of the extras it does not
need, from imports and from ``importlib.metadata`` alike (as if never installed), so a stray import of
Optuna, the SageMaker SDK or the serving stack fails the test instead of passing on a developer's full install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import boto3
import pytest

from .conftest import ask_about_photo, free_port, wait_until_up, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "images" / "Labrador_retriever_06457.jpg"

# What each extra of pyproject.toml brings: top-level module -> its distributions (comma-separated)
EXTRA_PACKAGES = {
    "serve": {"starlette": "starlette", "uvicorn": "uvicorn"},
    "onnx": {"onnx": "onnx", "onnxruntime": "onnxruntime"},
    "tune": {"optuna": "optuna"},
    "sagemaker": {"sagemaker": "sagemaker-train,sagemaker-core"},
    "smdebug": {"smdebug": "smdebug"},
    "gpu": {"pynvml": "nvidia-ml-py"},
    "tensorboard": {"tensorboard": "tensorboard"},
}
# the dev extra's test tools and SageMaker's container toolkits: never needed by a user's command
DEV_PACKAGES = {
    "moto": "moto", "httpx": "httpx", "pytest": "pytest", "sagemaker_inference": "sagemaker-inference",
    "sagemaker_training": "sagemaker-training", "sagemaker_pytorch_serving_container": "sagemaker-pytorch-inference",
    "sagemaker_pytorch_container": "sagemaker-pytorch-training", "ts": "torchserve",
    "model_archiver": "torch-model-archiver", "playwright": "playwright",
}  # fmt: skip
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
HIDE_SITECUSTOMIZE = '''"""Test-only: hide packages as if not installed, from imports and from importlib.metadata."""
import os
import re
import sys

MODULES = frozenset(filter(None, os.environ["DOGBREED_HIDE_MODULES"].split(",")))
DISTRIBUTIONS = frozenset(filter(None, os.environ["DOGBREED_HIDE_DISTRIBUTIONS"].split(",")))


def _normalise(name):
    return re.sub(r"[-_.]+", "-", name or "").lower()


class Hiding:
    """Wraps one finder of sys.meta_path: hidden modules are not found, hidden distributions not listed."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MODULES or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs)
        return (d for d in found if _normalise(d.metadata["Name"]) not in DISTRIBUTIONS)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
'''


def hidden_except(*extras: str) -> dict[str, str]:
    """Modules -> distributions of every extra but ``extras``, and of the dev tools."""
    hidden = dict(DEV_PACKAGES)
    for extra, packages in EXTRA_PACKAGES.items():
        if extra not in extras:
            hidden.update(packages)
    return hidden


def env_with(tmp: Path, hidden: dict[str, str], pythonpath: Iterable[Path] = ()) -> dict[str, str]:
    """The current environment plus the hiding ``sitecustomize`` (and ``pythonpath`` in front of it)."""
    site = tmp / "hide"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_SITECUSTOMIZE)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, site]),
        "DOGBREED_HIDE_MODULES": ",".join(hidden),
        "DOGBREED_HIDE_DISTRIBUTIONS": ",".join(hidden.values()),
    }


def run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def test_hidden_packages_look_uninstalled(tmp_path: Path) -> None:
    """The hiding itself: a hidden package is neither importable nor in the metadata; the others are both."""
    probe = (
        "import importlib.util as u, importlib.metadata as m; print(u.find_spec('optuna'), "
        "u.find_spec('json') is not None, 'optuna' in {d.metadata['Name'] for d in m.distributions()}, "
        "m.version('torch'))"
    )
    out = run([sys.executable, "-c", probe], env=env_with(tmp_path, {"optuna": "optuna"}), cwd=tmp_path)
    assert out.stdout.split()[:3] == ["None", "True", "False"]
    failed = subprocess.run(
        [sys.executable, "-c", "import optuna"], env=env_with(tmp_path, {"optuna": "optuna"}), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert "ModuleNotFoundError: No module named 'optuna'" in failed.stderr


def test_readme_names_each_extra_install_line() -> None:
    """The README's install table lists exactly the extras whose commands the tests below run alone."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    extras = set(re.findall(r'pip install -e "\.\[(\w+)\]" -c constraints.txt', section))
    assert extras == {"serve", "tune", "sagemaker"}
    assert "pip install -e . -c constraints.txt" in section and "pip wheel --no-deps -w dist ." in section


@pytest.mark.slow
def test_wheel_trains_from_another_directory_with_no_extra(tmp_path: Path) -> None:
    """Build the wheel from the sources alone, install it into a target dir and train the demo elsewhere.

    No extra's package can be imported; the configs come from the wheel; a user's own config dir adds an
    experiment (``--config-dir``, as the README shows).
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dogbreed", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    wheels = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        env=dict(os.environ), cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = wheels.glob("dogbreed-*.whl")
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        env=dict(os.environ), cwd=tmp_path)  # fmt: skip
    assert (target / "dogbreed" / "conf" / "train.yaml").is_file()
    assert (target / "dogbreed" / "demo_data" / "train").is_dir()
    page = {path.name for path in (target / "dogbreed" / "serve" / "static").iterdir()}
    assert page >= {"index.html", "app.js", "style.css"}  # the web page of dogbreed.serve
    scripts = ("dogbreed-train", "dogbreed-tune", "dogbreed-package", "dogbreed-predict", "dogbreed-serve")
    for script in (*scripts, "dogbreed-sagemaker"):
        assert (target / "bin" / script).is_file(), script

    work = tmp_path / "elsewhere"
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "small_demo.yaml").write_text(SMALL_DEMO)
    env = env_with(tmp_path, hidden_except(), pythonpath=[target])
    where = run(
        [sys.executable, "-c", "import dogbreed.config as c; print(c.__file__, c.CONFIG_DIR)"], env=env, cwd=work
    )
    assert where.stdout.split() == [str(target / "dogbreed" / "config.py"), str(target / "dogbreed" / "conf")]
    run(
        [str(target / "bin" / "dogbreed-train"), "--config-dir", "my_conf", "experiment=small_demo",
         "hydra.run.dir=run"],
        env=env, cwd=work,
    )  # fmt: skip
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test/acc" in metrics
    assert (work / "run" / "model" / "model.pt").is_file()


@pytest.mark.slow
def test_tune_extra_alone(tmp_path: Path) -> None:
    """``pip install -e ".[tune]"``: one trial of the demo, without the SageMaker SDK or the serving stack."""
    run(
        [sys.executable, "-m", "dogbreed.tune", *SMALL, "tune.n_trials=1", f"hydra.run.dir={tmp_path / 'tune'}"],
        env=env_with(tmp_path, hidden_except("tune")), cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "tune" / "trials.csv").read_text().count("\n") == 2
    assert (tmp_path / "tune" / "report" / "tuning-report.html").is_file()


def test_serve_extra_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``pip install -e ".[serve]"``: package a model, serve it on 127.0.0.1 and ask about a photo."""
    env = env_with(tmp_path, hidden_except("serve"))
    run([sys.executable, "-m", "dogbreed.package", str(tiny_model_dir), "-o", str(tmp_path / "model.tar.gz")],
        env=env, cwd=tmp_path)  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "dogbreed.serve", str(tmp_path / "model.tar.gz"), "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/ping", server, timeout=120, log=tmp_path / "serve.log")
        predictions = ask_about_photo(url, PHOTO)
        assert len(predictions) == 5 and predictions[0]["label"]
        with urllib.request.urlopen(f"{url}/static/app.js", timeout=10) as script:
            assert script.headers["Content-Type"].startswith("text/javascript")  # the page's files
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def test_sagemaker_extra_alone(aws_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pip install -e ".[sagemaker]"``: the launcher creates a training job (moto), without Optuna."""
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")  # SDK v3's role check needs IAM simulation, not in moto
    bucket = "dogbreed-extra"
    boto3.client("s3").create_bucket(Bucket=bucket)
    data = write_image_folder(tmp_path / "dogs")
    result = run(
        [sys.executable, "-m", "dogbreed.sagemaker", "train", "sagemaker.role=arn:aws:iam::123456789012:role/SM",
         f"sagemaker.bucket={bucket}", "experiment=demo", f"data.source={data}"],
        env=env_with(tmp_path, hidden_except("sagemaker")), cwd=tmp_path,
    )  # fmt: skip
    name = result.stdout.strip().splitlines()[-1]
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert job["HyperParameters"]["experiment"] == '"demo"'


def test_launcher_errors_are_one_line_without_optuna(tmp_path: Path) -> None:
    """A launcher configuration mistake is one line and exit code 2, with only the SageMaker extra."""
    result = subprocess.run(
        [sys.executable, "-m", "dogbreed.sagemaker", "train", "sagemaker.bucket=b"],
        env=env_with(tmp_path, hidden_except("sagemaker")), cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "sagemaker.role is not set" in result.stderr and "Traceback" not in result.stderr


def test_launcher_help_is_usage_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    from dogbreed.sagemaker.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dogbreed-sagemaker {train,tune,deploy,transform,analytics}") and "ERROR" not in out
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage:" in capsys.readouterr().err
