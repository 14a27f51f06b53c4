"""The SageMaker session every verb shares, and the small S3 helpers around it (SageMaker Python SDK v3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dogbreed._io import split_s3_uri


class LaunchError(ValueError):
    """A launcher setting is missing or inconsistent; the message names the setting and the fix."""


def make_session(*, region: str, bucket: str, telemetry_opt_out: bool = True) -> Any:
    """A ``sagemaker.core`` session for ``region`` and ``bucket``.

    boto3 honours ``AWS_ENDPOINT_URL`` (the tests' moto server). The SDK reports usage to AWS from every
    ``train``/``deploy`` call unless its config says ``TelemetryOptOut``; the opt-out is set here, on top of
    whatever the user's SageMaker config files say.
    """
    import boto3
    from sagemaker.core.config.config import load_sagemaker_config
    from sagemaker.core.helper.session_helper import Session

    config = load_sagemaker_config()
    if telemetry_opt_out:
        config.setdefault("SchemaVersion", "1.0")
        modules = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
        modules["TelemetryOptOut"] = True
    return Session(boto_session=boto3.Session(region_name=region), default_bucket=bucket, sagemaker_config=config)


def s3_uri(bucket: str, *parts: str) -> str:
    """``s3://bucket/part/part``, whatever slashes the parts carry."""
    return "s3://" + "/".join(p.strip("/") for p in (bucket, *parts) if p.strip("/"))


def upload_file(session: Any, path: Path, uri: str) -> str:
    """Upload one file to ``uri``; return ``uri``."""
    bucket, key = split_s3_uri(uri)
    session.boto_session.client("s3").upload_file(str(path), bucket, key)
    return uri
