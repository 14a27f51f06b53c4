"""What a training job reads: its code (``sourcedir.tar.gz``), the dataset and the pretrained weights, as channels.

Training and tuning jobs get the same three channels. The code always travels as the ``code`` channel, so a
network-isolated job, which cannot download from S3 itself, runs the same way as any other.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dogbreed
from dogbreed._io import declared_requirements
from dogbreed.config import CONFIG_DIR
from dogbreed.data.staging import is_remote
from dogbreed.sagemaker.entry import DATA_CHANNEL, ENTRY_SCRIPT, WEIGHTS_CHANNEL
from dogbreed.sagemaker.session import LaunchError, s3_uri, upload_file

log = logging.getLogger(__name__)

CODE_CHANNEL = "code"
SOURCEDIR = "sourcedir.tar.gz"
# The training container provides these; reinstalling torch from requirements.txt would replace its build.
CONTAINER_PROVIDED = {"torch", "torchvision", "boto3", "numpy", "pillow"}
ENTRY_PY = '''"""SageMaker entry point written by dogbreed's launcher: run dogbreed.train in the job's layout."""

from dogbreed.sagemaker.entry import main

if __name__ == "__main__":
    main()
'''


def requirements(extras: Sequence[str] = ()) -> list[str]:
    """dogbreed's own dependencies and those of ``extras`` (from its metadata), minus what the PyTorch container
    already has."""
    try:
        declared = declared_requirements(extras)
    except importlib.metadata.PackageNotFoundError:
        raise LaunchError("dogbreed is not installed; run `pip install -e .[sagemaker]` first.") from None
    return [requirement for name, requirement in declared if name not in CONTAINER_PROVIDED]


@contextlib.contextmanager
def source_dir(extras: Sequence[str] = ()) -> Iterator[Path]:
    """A temporary copy of the code the job runs: ``dogbreed/`` with its ``conf/``, the entry script, and
    ``requirements.txt`` (with those of ``extras``)."""
    with tempfile.TemporaryDirectory(prefix="dogbreed-source-") as tmp:
        root = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "demo_data")
        package = root / "dogbreed"
        shutil.copytree(Path(dogbreed.__file__).resolve().parent, package, ignore=ignore)
        # a wheel already holds dogbreed/conf; an editable install keeps it in the checkout's conf/
        shutil.copytree(CONFIG_DIR, package / "conf", ignore=ignore, dirs_exist_ok=True)
        (root / ENTRY_SCRIPT).write_text(ENTRY_PY)
        (root / "requirements.txt").write_text("\n".join(requirements(extras)) + "\n")
        yield root


def upload_source(session: Any, *, code_s3_uri: str, base_job_name: str, extras: Sequence[str] = ()) -> str:
    """Pack :func:`source_dir` as the training toolkit unpacks it (its entries at the top), upload it; return the URI.

    Each launch gets its own key: a running job keeps reading the code it started with.
    """
    key = f"{base_job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with source_dir(extras) as code, tempfile.TemporaryDirectory(prefix="dogbreed-sourcedir-") as tmp:
        archive = Path(tmp) / SOURCEDIR
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(code.iterdir()):
                tar.add(path, arcname=path.name)
        return upload_file(session, archive, f"{code_s3_uri.rstrip('/')}/{key}/{SOURCEDIR}")


def data_uri(*, source: str, data_s3_uri: str | None, bucket: str, prefix: str, network_isolation: bool) -> str | None:
    """The S3 URI of the ``training`` channel: configured, ``data.source`` itself, or ``data.source`` uploaded.

    None for an https archive: the job downloads it itself.
    """
    if data_s3_uri:
        return data_s3_uri
    if source.startswith("s3://"):
        return source
    if is_remote(source):
        if network_isolation:
            raise LaunchError(
                f"data.source={source!r} cannot be downloaded by a network-isolated job; upload it with "
                "`python -m dogbreed.data upload DIR s3://...` and set data.source (or sagemaker.data_s3_uri)."
            )
        return None
    from dogbreed.data import upload

    folder = Path(source).expanduser()
    uri = s3_uri(bucket, prefix, "data", folder.resolve().name)
    log.info("Uploading %s to %s", folder, uri)
    upload(folder, uri)
    return uri


def weights_uri(
    session: Any, *, weights: str | None, weights_s3_uri: str | None, bucket: str, prefix: str, network_isolation: bool
) -> str | None:
    """The S3 URI of the ``weights`` channel, or None when the job resolves ``model.weights`` itself."""
    if weights_s3_uri:
        return weights_s3_uri
    if weights is None or weights.startswith("s3://"):
        return weights
    path = Path(weights).expanduser()
    if path.is_file():
        return upload_file(session, path, s3_uri(bucket, prefix, "weights", path.name))
    if network_isolation:
        raise LaunchError(
            f"model.weights={weights!r} must be downloaded, which a network-isolated job cannot do; set "
            "model.weights=/path/to/resnet18-f37072fd.pth (uploaded for you) or sagemaker.weights_s3_uri=s3://..."
        )
    return None


def channels(*, code: str, data: str | None, weights: str | None) -> list[Any]:
    """``InputData`` for each S3 URI that is set: ``code``, ``training``, ``weights``."""
    from sagemaker.core.training.configs import InputData

    named = {CODE_CHANNEL: code, DATA_CHANNEL: data, WEIGHTS_CHANNEL: weights}
    return [InputData(channel_name=name, data_source=uri) for name, uri in named.items() if uri]
