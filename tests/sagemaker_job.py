"""A SageMaker training job's container on this machine, for the tests that run SageMaker's training toolkit.

PyPI ``sagemaker-training`` (the ``train`` command the PyTorch training image starts) with
``SAGEMAKER_TRAINING_MODULE`` pointing at ``sagemaker-pytorch-training``, in the ``/opt/ml`` layout under
``SAGEMAKER_BASE_DIR``: ``input/config/*.json`` as SageMaker writes them, the ``training`` channel, and
``sourcedir.tar.gz`` packed as the SDK packs it. ``sagemaker_submit_directory`` may be a local tarball, so no S3
is involved. The toolkit pip-installs the source dir's ``requirements.txt``; ``PIP_NO_INDEX`` makes a requirement
the environment lacks fail the job instead of being downloaded into it.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from dogbreed.sagemaker.entry import DATA_CHANNEL, ENTRY_SCRIPT
from dogbreed.sagemaker.launcher import source_dir

from .installed import IsolatedPython

INSTANCE_TYPE = "ml.m5.xlarge"  # a CPU instance, as this machine is


def pack_source_dir(tarball: Path) -> Path:
    """The launcher's source dir as the SDK's ``tar_and_upload_dir`` packs it: the dir's entries at the top."""
    with source_dir() as code, tarfile.open(tarball, "w:gz") as tar:
        for path in sorted(code.iterdir()):
            tar.add(path, arcname=path.name)
    return tarball


def lay_out_job(
    base: Path, hyperparameters: Mapping[str, Any], sourcedir: Path, *, job_name: str = "dogbreed-test",
    hosts: Sequence[str] = ("localhost",), current_host: str = "localhost", checkpoints: bool = False,
) -> Path:  # fmt: skip
    """Write ``base`` (an ``/opt/ml``) as SageMaker does for ``current_host`` of ``hosts``; return ``base``.

    ``hyperparameters`` are the job's, decoded (as ``describe_training_job`` and the launcher's
    ``job_hyperparameters`` give them after ``json.loads``); the job runs ``sourcedir``. ``checkpoints``: the job
    has a ``checkpoint_s3_uri``, so SageMaker creates ``checkpoints/`` and syncs it. Every host name must resolve
    (``localhost`` does offline): the toolkit waits up to 15 minutes for each host's DNS.
    """
    config = base / "input" / "config"
    config.mkdir(parents=True)
    shutil.copytree(Path(str(files("dogbreed") / "demo_data")), base / "input" / "data" / DATA_CHANNEL)
    for made in ("model", "output/data"):  # SageMaker makes them: what is in them is uploaded when the job ends
        (base / made).mkdir(parents=True)
    if checkpoints:
        (base / "checkpoints").mkdir()
    local = {
        "sagemaker_program": ENTRY_SCRIPT, "sagemaker_submit_directory": str(sourcedir),
        "sagemaker_container_log_level": 20, "sagemaker_job_name": job_name, "sagemaker_region": "us-east-1",
    }  # fmt: skip
    (config / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in {**hyperparameters, **local}.items()})
    )
    (config / "inputdataconfig.json").write_text(
        json.dumps({DATA_CHANNEL: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}})
    )
    group = "homogeneousCluster"
    (config / "resourceconfig.json").write_text(
        json.dumps({
            "current_host": current_host, "current_instance_type": INSTANCE_TYPE, "current_group_name": group,
            "hosts": list(hosts), "network_interface_name": "lo",
            "instance_groups": [{"instance_group_name": group, "instance_type": INSTANCE_TYPE, "hosts": list(hosts)}],
        })
    )  # fmt: skip
    return base


def toolkit_env(python: IsolatedPython, base: Path, scratch: Path) -> dict[str, str]:
    """The environment the image starts ``train`` in, on ``python`` (which has no dogbreed), scratch at ``scratch``.

    No ``PYTHONUNBUFFERED`` (a custom image need not set it): the entry must keep its own lines whole.
    """
    env = {k: v for k, v in python.env().items() if k != "PYTHONUNBUFFERED"}
    return env | {
        "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
        "TMPDIR": str(scratch), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "2",
    }  # fmt: skip
