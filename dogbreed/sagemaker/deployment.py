"""Endpoints: a training job's ``model.tar.gz`` behind a SageMaker endpoint, as ``sagemaker.core`` resources.

Two ways to serve it:

- dogbreed's serving image (``container/Dockerfile``, pushed to ECR, ``sagemaker.deploy.image_uri``): its
  ``serve`` command reads the model from ``/opt/ml/model`` as the training job wrote it; nothing is repacked.
- the stock PyTorch inference container (no ``image_uri``; its last release is PyTorch 2.6, TorchServe based
  and out of patch since 2026-06-30): the model is repacked with ``code/inference.py`` and the serving handlers.

The Model (:class:`ServedModel`) is made by :func:`create_model`, which Batch Transform
(:mod:`dogbreed.sagemaker.transform`) shares.
The three resources (Model, EndpointConfig, Endpoint) are created directly: ``ModelBuilder`` exists to detect
a framework and package an in-memory model, and here both the package and the container are already known.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dogbreed._io import split_s3_uri
from dogbreed.sagemaker.session import LaunchError, s3_uri, upload_file

log = logging.getLogger(__name__)


def model_data_of(session: Any, *, training_job: str | None, model_data: str | None) -> str:
    """``model_data``, or the ``model.tar.gz`` that ``training_job`` uploaded."""
    if model_data:
        return model_data
    if not training_job:
        raise LaunchError("set sagemaker.deploy.training_job=<job name> or sagemaker.deploy.model_data=s3://...")
    job = session.sagemaker_client.describe_training_job(TrainingJobName=training_job)
    return job["ModelArtifacts"]["S3ModelArtifacts"]


def repack_with_code(session: Any, model_data: str, uri: str) -> str:
    """Upload ``model_data`` plus ``code/`` (``inference.py`` and the handlers) to ``uri``, for the stock container."""
    from dogbreed.serve.package import extract_package, write_code

    with tempfile.TemporaryDirectory(prefix="dogbreed-repack-") as tmp:
        bucket, key = split_s3_uri(model_data)
        archive = Path(tmp) / "original.tar.gz"
        session.boto_session.client("s3").download_file(bucket, key, str(archive))
        model = extract_package(archive, Path(tmp) / "model")
        write_code(model / "code", "eager")
        repacked = Path(tmp) / "model.tar.gz"
        with tarfile.open(repacked, "w:gz") as tar:
            for path in sorted(model.iterdir()):
                tar.add(path, arcname=path.name)
        return upload_file(session, repacked, uri)


def stock_container(
    session: Any, model_data: str, *, region: str, framework_version: str, py_version: str, instance_type: str, key: str
) -> tuple[str, str, dict[str, str]]:
    """Image, repacked model data and environment for the stock PyTorch inference container (the fallback)."""
    from sagemaker.core import image_uris

    log.warning(
        "Serving with the stock PyTorch %s inference container, which is no longer patched; build dogbreed's "
        "serving image (container/Dockerfile) and set sagemaker.deploy.image_uri.",
        framework_version,
    )
    image = image_uris.retrieve(
        "pytorch", region=region, version=framework_version, py_version=py_version, instance_type=instance_type,
        image_scope="inference",
    )  # fmt: skip
    bucket, _ = split_s3_uri(model_data)
    repacked = repack_with_code(session, model_data, s3_uri(bucket, key, "model.tar.gz"))
    environment = {
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": str(logging.INFO),
        "SAGEMAKER_REGION": region,
    }
    return image, repacked, environment


@dataclass(frozen=True)
class ServedModel:
    """What a SageMaker Model serves and how: the same for an endpoint and a Batch Transform job.

    ``image_uri`` is dogbreed's serving image; without it the stock PyTorch ``framework_version`` /
    ``py_version`` inference container serves the archive repacked with ``code/``.
    """

    model_data: str
    role: str
    image_uri: str | None
    network_isolation: bool
    framework_version: str
    py_version: str


def create_model(session: Any, served: ServedModel, *, name: str, instance_type: str, repack_key: str) -> str:
    """Create the SageMaker Model (an endpoint's or a transform job's); return its name.

    With an ``image_uri`` the archive is served as it is; otherwise it is repacked with ``code/`` under
    ``s3://<bucket of model_data>/<repack_key>/`` for the stock container.
    """
    from sagemaker.core.resources import Model
    from sagemaker.core.shapes import ContainerDefinition

    region = session.boto_region_name
    if served.image_uri:
        image, data, environment = served.image_uri, served.model_data, {}
    else:
        image, data, environment = stock_container(
            session, served.model_data, region=region, framework_version=served.framework_version,
            py_version=served.py_version, instance_type=instance_type, key=repack_key,
        )  # fmt: skip
    model = Model.create(
        model_name=name,
        primary_container=ContainerDefinition(image=image, model_data_url=data, environment=environment),
        execution_role_arn=served.role,
        enable_network_isolation=served.network_isolation,
        session=session.boto_session,
        region=region,
    )
    return model.model_name


def deploy(
    session: Any,
    served: ServedModel,
    *,
    instance_type: str,
    initial_instance_count: int,
    endpoint_name: str | None,
    base_name: str,
    prefix: str,
    wait: bool,
) -> str:
    """Create the model, endpoint config and endpoint; return the endpoint's name."""
    from sagemaker.core.resources import Endpoint, EndpointConfig
    from sagemaker.core.shapes import ProductionVariant

    region = session.boto_region_name
    name = endpoint_name or f"{base_name}-{time.strftime('%Y-%m-%d-%H-%M-%S')}"
    model_name = create_model(
        session, served, name=name, instance_type=instance_type, repack_key=f"{prefix}/deploy/{name}"
    )
    boto = session.boto_session
    variant = ProductionVariant(
        variant_name="AllTraffic", model_name=model_name, instance_type=instance_type,
        initial_instance_count=initial_instance_count,
    )  # fmt: skip
    config = EndpointConfig.create(
        endpoint_config_name=name, production_variants=[variant], session=boto, region=region
    )
    endpoint = Endpoint.create(
        endpoint_name=name, endpoint_config_name=config.endpoint_config_name, session=boto, region=region
    )
    if wait:
        endpoint.wait_for_status("InService")
    log.info(
        "Endpoint %s is being created. Query it with:\n  aws sagemaker-runtime invoke-endpoint --endpoint-name %s "
        "--content-type image/jpeg --body fileb://dog.jpg /dev/stdout",
        name, name,
    )  # fmt: skip
    return name
