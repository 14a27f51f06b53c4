"""Batch Transform: classify every image under an S3 prefix with the model the ``deploy`` verb serves.

SageMaker starts the serving container (dogbreed's image, or the stock PyTorch container with the repacked
``code/``, exactly as :func:`~dogbreed.sagemaker.deployment.create_model` makes it for an endpoint), sends each
S3 object under the input prefix whole as one ``/invocations`` request (``SplitType`` ``None``, one record per
request) and writes the answer, the endpoint's JSON top-k, to ``<output>/<key relative to the prefix>.out``.
The Model and the TransformJob are ``sagemaker.core`` resources (SDK v3), as the endpoint's resources are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dogbreed.sagemaker.deployment import ServedModel, create_model
from dogbreed.sagemaker.session import LaunchError, s3_uri

log = logging.getLogger(__name__)

SPLIT_TYPES = ("None", "Line", "RecordIO", "TFRecord")


def transform(
    session: Any,
    served: ServedModel,
    *,
    input_s3_uri: str | None,
    output_s3_uri: str | None,
    instance_type: str,
    instance_count: int,
    content_type: str,
    split_type: str,
    accept: str,
    max_payload_mb: int,
    max_concurrent_transforms: int | None,
    job_name: str | None,
    base_name: str,
    bucket: str,
    prefix: str,
    wait: bool,
) -> str:
    """Create the model and a transform job over ``input_s3_uri``; return the job's name.

    ``output_s3_uri`` defaults to ``s3://<bucket>/<prefix>/transform/<job name>``.
    """
    from sagemaker.core.resources import TransformJob
    from sagemaker.core.shapes import (
        TransformDataSource,
        TransformInput,
        TransformOutput,
        TransformResources,
        TransformS3DataSource,
    )

    if not input_s3_uri or not str(input_s3_uri).startswith("s3://"):
        raise LaunchError(
            f"sagemaker.transform.input={input_s3_uri!r} must be the s3://bucket/prefix of the images to classify; "
            "upload a folder with `python -m dogbreed.data upload DIR s3://bucket/prefix`."
        )
    if split_type not in SPLIT_TYPES:
        raise LaunchError(f"sagemaker.transform.split_type={split_type!r} is not one of {SPLIT_TYPES}.")
    if not 0 < max_payload_mb <= 100:
        raise LaunchError(f"sagemaker.transform.max_payload_mb={max_payload_mb} must be within 1..100 (MB).")
    name = job_name or f"{base_name}-transform-{time.strftime('%Y-%m-%d-%H-%M-%S')}"
    output = output_s3_uri or s3_uri(bucket, prefix, "transform", name)
    model_name = create_model(
        session, served, name=name, instance_type=instance_type, repack_key=f"{prefix}/transform/{name}"
    )
    job = TransformJob.create(
        transform_job_name=name,
        model_name=model_name,
        transform_input=TransformInput(
            data_source=TransformDataSource(
                s3_data_source=TransformS3DataSource(s3_data_type="S3Prefix", s3_uri=input_s3_uri)
            ),
            content_type=content_type,
            split_type=split_type,
        ),
        transform_output=TransformOutput(s3_output_path=output, accept=accept, assemble_with="None"),
        transform_resources=TransformResources(instance_type=instance_type, instance_count=instance_count),
        # one image per request: a request holding several concatenated images is no image at all
        batch_strategy="SingleRecord",
        max_payload_in_mb=max_payload_mb,
        **({"max_concurrent_transforms": max_concurrent_transforms} if max_concurrent_transforms else {}),
        session=session.boto_session,
        region=session.boto_region_name,
    )
    log.info("Transform job %s: the answer for each image under %s goes to %s/<key>.out", name, input_s3_uri, output)
    if wait:
        job.wait()
    return name
