"""The transform verb with the real SageMaker SDK v3 against moto: the CreateModel and CreateTransformJob requests."""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from dogbreed.sagemaker import launcher
from dogbreed.sagemaker.__main__ import main

from . import test_sagemaker_launcher as launcher_tests
from .test_sagemaker_launcher import BUCKET, ROLE, _s3_object, _training_output

sm = launcher_tests.sm  # the launcher tests' fixture: config, session and the requests sent

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/dogbreed-serve:cpu"
PHOTOS = f"s3://{BUCKET}/photos/test"


def test_transform_job_request_with_the_serving_image(sm: Callable, tmp_path: Path) -> None:
    model_data = _training_output(tmp_path)
    cfg, session, sent = sm(
        f"sagemaker.deploy.model_data={model_data}", f"sagemaker.deploy.image_uri={IMAGE}",
        f"sagemaker.transform.input={PHOTOS}", "sagemaker.transform.job_name=dogbreed-batch",
        "sagemaker.transform.instance_type=ml.c5.xlarge", "sagemaker.transform.max_concurrent_transforms=4",
    )  # fmt: skip
    assert launcher.transform(cfg, session=session) == "dogbreed-batch"

    (model,) = sent["CreateModel"]
    assert model["ModelName"] == "dogbreed-batch" and model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == model_data  # the deploy verb's package, as it is
    (job,) = sent["CreateTransformJob"]
    assert job["TransformJobName"] == "dogbreed-batch" and job["ModelName"] == model["ModelName"]
    assert job["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": PHOTOS}},
        "ContentType": "application/x-image",
        "SplitType": "None",
    }
    assert job["TransformOutput"] == {
        "S3OutputPath": f"s3://{BUCKET}/dogbreed/transform/dogbreed-batch",
        "Accept": "application/json",
        "AssembleWith": "None",
    }
    assert job["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 1}
    assert (job["BatchStrategy"], job["MaxPayloadInMB"], job["MaxConcurrentTransforms"]) == ("SingleRecord", 6, 4)

    # and moto holds the job as SageMaker would describe it
    described = boto3.client("sagemaker").describe_transform_job(TransformJobName="dogbreed-batch")
    assert described["ModelName"] == "dogbreed-batch"
    assert described["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == PHOTOS
    assert described["TransformOutput"]["S3OutputPath"] == job["TransformOutput"]["S3OutputPath"]
    assert described["TransformResources"]["InstanceType"] == "ml.c5.xlarge"


def test_transform_with_the_stock_container_ships_the_handlers(sm: Callable, tmp_path: Path) -> None:
    model_data = _training_output(tmp_path)
    output = f"s3://{BUCKET}/answers"
    cfg, session, sent = sm(
        f"sagemaker.deploy.model_data={model_data}", f"sagemaker.transform.input={PHOTOS}",
        f"sagemaker.transform.output={output}", "sagemaker.transform.job_name=dogbreed-batch-stock",
    )  # fmt: skip
    assert launcher.transform(cfg, session=session) == "dogbreed-batch-stock"
    (model,) = sent["CreateModel"]
    container = model["PrimaryContainer"]
    assert container["Image"].endswith("/pytorch-inference:2.6.0-cpu-py312")
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/dogbreed/transform/dogbreed-batch-stock/model.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(_s3_object(container["ModelDataUrl"]))) as tar:
        assert {"model.pt", "code/inference.py", "code/dogbreed/serve/handlers.py"} <= set(tar.getnames())
    (job,) = sent["CreateTransformJob"]
    assert job["TransformOutput"]["S3OutputPath"] == output
    assert job["TransformResources"] == {"InstanceType": "ml.m5.large", "InstanceCount": 1}
    assert "MaxConcurrentTransforms" not in job  # null: SageMaker's choice


def test_missing_or_wrong_settings_are_one_line_errors(
    sm: Callable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_data = _training_output(tmp_path)
    cases = [
        ([f"sagemaker.deploy.model_data={model_data}"], r"sagemaker\.transform\.input is not set"),
        ([f"sagemaker.transform.input={PHOTOS}"], r"sagemaker\.deploy\.training_job"),
        (
            [f"sagemaker.deploy.model_data={model_data}", "sagemaker.transform.input=/local/photos"],
            r"must be the s3://bucket/prefix",
        ),
        (
            [
                f"sagemaker.deploy.model_data={model_data}",
                f"sagemaker.transform.input={PHOTOS}",
                "sagemaker.transform.split_type=Lines",
            ],
            r"split_type='Lines' is not one of",
        ),
    ]
    for overrides, message in cases:
        cfg, session, sent = sm(*overrides)
        with pytest.raises(launcher.LaunchError, match=message):
            launcher.transform(cfg, session=session)
        assert "CreateTransformJob" not in sent and "CreateModel" not in sent
    # from the command line: one line, exit status 2, and the role is asked for before anything else
    with pytest.raises(SystemExit) as exited, caplog.at_level(logging.ERROR):
        main(["transform", f"sagemaker.bucket={BUCKET}", f"sagemaker.transform.input={PHOTOS}"])
    assert exited.value.code == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "sagemaker.role is not set" in record.getMessage() and "\n" not in record.getMessage()
