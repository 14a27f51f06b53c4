"""Interpreters where the checkout cannot be imported: what users install, run as they run it.

The test environment installs dogbreed in editable mode, and setuptools' editable finder answers any
``dogbreed.*`` import from the checkout, in this process and in every subprocess that starts this
interpreter, even where ``dogbreed`` itself was imported from a wheel or a model package's ``code/``. So a
module missing from a wheel or a package goes unseen by any test run with ``sys.executable``.

An :class:`IsolatedPython` is a virtual environment of its own (no pip, no packages) whose one ``.pth`` file
names this environment's site-packages as a plain path: the third-party packages import from there, but the
``.pth`` files in it, the editable finder's among them, never run. No second 7 GB environment is needed.
Into it goes either the wheel (``installed_python``: what ``pip install dogbreed-*.whl`` gives a user) or
nothing (``bare_python``: SageMaker's stock PyTorch containers, with their toolkits and without dogbreed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# What each extra of pyproject.toml brings: top-level module -> its distributions (comma-separated)
EXTRA_PACKAGES = {
    "serve": {"starlette": "starlette", "uvicorn": "uvicorn"},
    "onnx": {"onnx": "onnx", "onnxruntime": "onnxruntime"},
    "openvino": {"openvino": "openvino", "nncf": "nncf"},
    "tune": {"optuna": "optuna"},
    "sagemaker": {"sagemaker": "sagemaker-train,sagemaker-core"},
    "smdebug": {"smdebug": "smdebug"},
    "gpu": {"pynvml": "nvidia-ml-py"},
    "tensorboard": {"tensorboard": "tensorboard"},
    "mlflow": {"mlflow": "mlflow,mlflow-skinny,mlflow-tracing", "sagemaker_mlflow": "sagemaker-mlflow"},
}
# the dev extra's test tools and SageMaker's container toolkits: never needed by a user's command
DEV_PACKAGES = {
    "moto": "moto", "httpx": "httpx", "pytest": "pytest", "sagemaker_inference": "sagemaker-inference",
    "sagemaker_training": "sagemaker-training", "sagemaker_pytorch_serving_container": "sagemaker-pytorch-inference",
    "sagemaker_pytorch_container": "sagemaker-pytorch-training", "ts": "torchserve",
    "model_archiver": "torch-model-archiver", "playwright": "playwright",
}  # fmt: skip
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


def hiding(folder: Path, hidden: dict[str, str]) -> dict[str, str]:
    """Environment variables that hide ``hidden`` (module -> distributions) from a Python started with them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HIDE_SITECUSTOMIZE)
    return {
        "PYTHONPATH": str(folder),
        "DOGBREED_HIDE_MODULES": ",".join(hidden),
        "DOGBREED_HIDE_DISTRIBUTIONS": ",".join(hidden.values()),
    }


class IsolatedPython:
    """A venv that imports this environment's third-party packages, and dogbreed only from what it was given."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.python = self.bin / "python"

    @classmethod
    def create(cls, root: Path) -> IsolatedPython:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
        isolated = cls(root)
        site = Path(isolated.check_output("import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
        ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
        (site / "_dogbreed_test_dependencies.pth").write_text("\n".join(ours) + "\n")
        return isolated

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without ``PYTHONPATH`` or ``DOGBREED_*``, with this venv first on ``PATH``."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("DOGBREED_")}
        return env | {"PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(self.root)} | extra

    def check_output(self, code: str, cwd: Path | None = None) -> str:
        return subprocess.run(
            [str(self.python), "-c", code], env=self.env(), cwd=cwd or self.root, check=True, capture_output=True,
            text=True, timeout=300,
        ).stdout  # fmt: skip

    def pip_install(self, *args: str, cwd: Path | None = None) -> None:
        """``pip install`` into this venv, offline and without dependencies (they are importable already)."""
        result = subprocess.run(
            [str(self.python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "-q", *args],
            env=self.env(PIP_DISABLE_PIP_VERSION_CHECK="1"), cwd=cwd or self.root, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, f"pip install {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    def expose(self, *scripts: str) -> None:
        """Copy console scripts of this environment (``torchserve``, ``train`` ...) to run on this venv's Python.

        TorchServe starts its workers with the Python that runs ``torchserve``, and the training toolkit runs
        the job's entry script with the Python that runs ``train``: each must be this venv's.
        """
        here = Path(sys.executable).parent
        for name in scripts:
            lines = (here / name).read_text().splitlines(keepends=True)
            assert lines[0].startswith("#!"), f"{here / name} is not a script"
            target = self.bin / name
            target.write_text(f"#!{self.python}\n" + "".join(lines[1:]))
            target.chmod(0o755)


def copy_clone(dest: Path) -> Path:
    """Copy the files a clone of this checkout holds (tracked or new, not ignored) to ``dest``; return it."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, check=True,
        capture_output=True, timeout=60,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not in a clone of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def build_wheel(src: Path, out: Path) -> Path:
    """``pip wheel`` the sources at ``src`` into ``out``, offline; return the wheel."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        cwd=out.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (wheel,) = out.glob("dogbreed-*.whl")
    return wheel
