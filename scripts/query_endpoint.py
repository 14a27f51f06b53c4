"""Ask a dogbreed endpoint for the breeds in one or more photos and print the top 5 of each.

    python scripts/query_endpoint.py examples/images/Brittany_02625.jpg --url http://127.0.0.1:8080
    python scripts/query_endpoint.py dog.jpg --endpoint-name dogbreed            # SageMaker, through boto3
    python scripts/query_endpoint.py a.jpg b.jpg --url http://127.0.0.1:8080 --content-type application/json

Raw image content types send one request per photo; ``application/json`` sends all photos base64-encoded
in one batch request. ``--endpoint-url`` points boto3 at a local server (``python -m dogbreed.serve``).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RAW_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")


class EndpointError(RuntimeError):
    """The endpoint refused a request; the message is its JSON error."""


def invoke_http(url: str, body: bytes, content_type: str, accept: str, timeout: float) -> dict[str, Any]:
    """POST to ``{url}/invocations`` (the SageMaker container contract)."""
    request = urllib.request.Request(
        url.rstrip("/") + "/invocations", data=body, headers={"Content-Type": content_type, "Accept": accept}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise EndpointError(f"HTTP {err.code}: {err.read().decode(errors='replace')}") from None


def invoke_sagemaker(
    name: str, body: bytes, content_type: str, accept: str, *, region: str | None, endpoint_url: str | None
) -> dict[str, Any]:
    """``sagemaker-runtime`` ``invoke_endpoint``: credentials and region from the usual AWS settings on AWS;
    unsigned (no credentials needed) when ``endpoint_url`` points at a local ``dogbreed.serve``."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    local = {"region_name": region or "us-east-1", "config": Config(signature_version=UNSIGNED)}
    try:
        client = boto3.client(
            "sagemaker-runtime", endpoint_url=endpoint_url, **(local if endpoint_url else {"region_name": region})
        )
        response = client.invoke_endpoint(EndpointName=name, Body=body, ContentType=content_type, Accept=accept)
    except ClientError as err:
        raise EndpointError(str(err)) from None
    except BotoCoreError as err:  # no region, no credentials, unreachable endpoint
        raise EndpointError(
            f"{err} (set --region or AWS_DEFAULT_REGION, and AWS credentials, e.g. `aws configure`)"
        ) from None
    return json.loads(response["Body"].read())


def content_type_of(path: Path) -> str:
    guessed = mimetypes.guess_type(path.name)[0]
    return guessed if guessed in RAW_TYPES else "application/octet-stream"


def requests_for(images: list[Path], content_type: str) -> list[tuple[list[Path], bytes, str]]:
    """(photos, body, content type) of each request to send."""
    if content_type == "application/json":
        encoded = [base64.b64encode(path.read_bytes()).decode() for path in images]
        return [(images, json.dumps({"images": encoded}).encode(), content_type)]
    return [
        ([path], path.read_bytes(), content_type_of(path) if content_type == "auto" else content_type)
        for path in images
    ]


def print_predictions(path: Path, predictions: list[dict[str, Any]]) -> None:
    print(path)
    for rank, p in enumerate(predictions, 1):
        print(f"  {rank}. {p['label']:<32} {p['probability']:7.2%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="photos (JPEG, PNG, ...)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a local endpoint, e.g. http://127.0.0.1:8080")
    target.add_argument("--endpoint-name", help="a SageMaker endpoint (boto3 sagemaker-runtime)")
    parser.add_argument("--endpoint-url", help="with --endpoint-name: send boto3 to this URL instead of AWS")
    parser.add_argument("--region", help="with --endpoint-name: AWS region (default: your AWS config)")
    parser.add_argument(
        "--content-type", default="auto", choices=("auto", *RAW_TYPES, "application/json"),
        help="auto: raw bytes typed by file extension; application/json: one base64 batch request",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    accept = f"application/json;top_k={args.top_k}"
    for paths, body, content_type in requests_for(args.images, args.content_type):
        try:
            if args.url:
                answer = invoke_http(args.url, body, content_type, accept, args.timeout)
            else:
                answer = invoke_sagemaker(
                    args.endpoint_name, body, content_type, accept, region=args.region, endpoint_url=args.endpoint_url
                )
        except (EndpointError, OSError) as err:
            print(f"{', '.join(map(str, paths))}: {err}", file=sys.stderr)
            return 1
        rows = (
            answer["predictions"] if len(paths) > 1 or content_type == "application/json" else [answer["predictions"]]
        )
        for path, predictions in zip(paths, rows, strict=True):
            print_predictions(path, predictions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
