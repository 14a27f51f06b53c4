"""The serving image's command, run as SageMaker runs the container, on a packaged model and a real photo.

No container engine runs on the test machines, so the test installs dogbreed as the Dockerfile does (not
editable, in an environment where the checkout cannot be imported) and runs its exact ENTRYPOINT plus
SageMaker's ``serve`` argument outside a container: the model unpacked where ``SM_MODEL_DIR`` says, the port
from ``SAGEMAKER_BIND_TO_PORT``, and ``DOGBREED_SERVE_HOST`` keeping it on 127.0.0.1 (the image binds 0.0.0.0).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ask_about_photo, free_port, wait_until_up
from .installed import IsolatedPython

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "container" / "Dockerfile"
PHOTO = ROOT / "examples" / "images" / "Labrador_retriever_06457.jpg"


def entry_command() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form) plus the ``serve`` argument SageMaker passes."""
    (entrypoint,) = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return [*json.loads(entrypoint), "serve"]


def test_dockerfile_installs_the_serve_extra_and_builds_both_variants() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", text, flags=re.MULTILINE)
    assert 'pip install -c constraints.txt ".[serve]"' in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text  # CUDA: --build-arg TORCH_INDEX=.../cu128
    assert "EXPOSE 8080" in text


def test_no_other_installed_package_claims_the_entry_command() -> None:
    """sagemaker-pytorch-inference installs a ``serve`` too: whichever was installed last would have answered."""
    from importlib.metadata import entry_points

    claims = entry_points(group="console_scripts", name=entry_command()[0])
    assert [script.dist.name for script in claims] == ["dogbreed"]


@pytest.mark.slow
def test_entry_command_serves_a_packaged_model(
    clone_copy: Path, tiny_package: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The image's install (``pip install ".[serve]"`` of the sources, not editable) runs its ENTRYPOINT."""
    from dogbreed.serve.package import extract_package

    image = IsolatedPython.create(tmp_path_factory.mktemp("image") / "venv")
    image.pip_install(f"{clone_copy}[serve]", cwd=tmp_path)
    command = entry_command()
    executable = image.bin / command[0]
    assert executable.is_file(), f"pip install '.[serve]' installed no {command[0]}"
    model_dir = extract_package(tiny_package(), tmp_path / "opt/ml/model")
    port = free_port()
    env = image.env(SM_MODEL_DIR=str(model_dir), SAGEMAKER_BIND_TO_PORT=str(port), DOGBREED_SERVE_HOST="127.0.0.1")
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([str(executable), *command[1:]], env=env, cwd=tmp_path, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(f"{url}/ping", server, timeout=120, log=log_path)
            predictions = ask_about_photo(url, PHOTO)
            assert len(predictions) == 5
            assert all(p["label"] and 0 <= p["probability"] <= 1 for p in predictions)
        finally:
            server.send_signal(signal.SIGTERM)  # how SageMaker stops a container
            # uvicorn re-raises the signal once shut down, so a clean stop exits "killed by SIGTERM"
            assert server.wait(timeout=30) in (0, -signal.SIGTERM), log_path.read_text()
    log_text = log_path.read_text()
    assert "Uvicorn running on http://127.0.0.1:" in log_text and "Application shutdown complete" in log_text
