"""``python -m dogbreed.serve MODEL --host 127.0.0.1 --port 8080``: serve a model.tar.gz or a run dir locally.

The ``dogbreed-serve-container`` console script, the serving image's ENTRYPOINT, is the same server started
the way SageMaker starts a container (``docker run IMAGE serve``, so ``serve`` is its argument): model from
``SM_MODEL_DIR`` or ``/opt/ml/model``, all interfaces, port ``SAGEMAKER_BIND_TO_PORT`` or 8080.
``DOGBREED_SERVE_HOST`` narrows the interface (``127.0.0.1`` for a test that runs the container's command
outside a container).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from dogbreed._io import available_cpus
from dogbreed.serve.codec import BYTES_PER_PIXEL, Limits
from dogbreed.serve.package import extract_package, find_model_dir
from dogbreed.serve.runtime import RUNTIME_CHOICES, load_model
from dogbreed.serve.server import ServerConfig, create_app

log = logging.getLogger("dogbreed.serve")


def _parser(*, model_default: str | None, host_default: str, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a dogbreed model with the SageMaker container contract."
    )
    parser.add_argument(
        "model", nargs="?" if model_default else None, default=model_default,
        help="model.tar.gz (from python -m dogbreed.package), an unpacked package, or a run dir with model/",
    )  # fmt: skip
    limits, config = Limits.from_env(), ServerConfig
    parser.add_argument("--host", default=host_default, help=f"interface to bind (default: {host_default})")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SAGEMAKER_BIND_TO_PORT", 8080)))
    parser.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        help="override the runtime the package recorded (auto: the fastest it carries)",
    )
    parser.add_argument("--max-batch-size", type=int, default=config.max_batch_size, help="1 turns batching off")
    parser.add_argument("--max-delay-ms", type=float, default=config.max_delay_ms, help="longest wait to fill a batch")
    parser.add_argument("--max-body-mb", type=float, default=config.max_body_bytes / 2**20, help="request size limit")
    parser.add_argument("--max-pixels", type=int, default=limits.max_pixels, help="per image (decompression bombs)")
    parser.add_argument("--max-images", type=int, default=limits.max_images, help="images per request")
    parser.add_argument(
        "--max-request-pixels", type=int, default=limits.max_request_pixels,
        help="pixels of all the images of one request, read from their headers before decoding (413 beyond)",
    )  # fmt: skip
    parser.add_argument(
        "--max-inflight-pixels", type=int, default=config.max_inflight_pixels,
        help=f"pixels being decoded by all requests (503 beyond): peak decoding memory is at most {BYTES_PER_PIXEL} "
        "bytes per pixel of it",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections", type=int, default=config.max_requests,
        help="/invocations requests in progress before answering 503 (/ping is never refused)",
    )  # fmt: skip
    parser.add_argument(
        "--max-receiving", type=int, default=config.max_receiving,
        help="requests still sending their body before answering 503",
    )  # fmt: skip
    parser.add_argument(
        "--body-timeout", type=float, default=config.body_timeout_s,
        help="seconds a request may take to send its body (408 and the connection closed beyond)",
    )  # fmt: skip
    parser.add_argument(
        "--header-timeout", type=float, default=30,
        help="seconds a connection may wait for a request's headers (closed beyond)",
    )  # fmt: skip
    parser.add_argument(
        "--max-queued", type=int, default=config.max_queued_images, help="images waiting for the model before 503"
    )
    parser.add_argument("--threads", type=int, help=f"torch / ONNX Runtime threads (default: {available_cpus()} CPUs)")
    parser.add_argument("--shutdown-timeout", type=float, default=30, help="seconds to finish requests on SIGTERM")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None, *, container: bool = False) -> None:
    """Load the model, then serve until SIGINT/SIGTERM (in-flight requests are finished first)."""
    import uvicorn

    from dogbreed.serve.protocol import HeaderDeadlineH11

    argv = sys.argv[1:] if argv is None else argv
    if container and argv[:1] == ["serve"]:  # SageMaker passes "serve" as the container's argument
        argv = argv[1:]
    parser = _parser(
        model_default=os.environ.get("SM_MODEL_DIR", "/opt/ml/model") if container else None,
        host_default=os.environ.get("DOGBREED_SERVE_HOST", "0.0.0.0") if container else "127.0.0.1",
        prog="dogbreed-serve-container" if container else "python -m dogbreed.serve",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits.from_env()
    try:
        config = ServerConfig(
            max_batch_size=args.max_batch_size,
            max_delay_ms=args.max_delay_ms,
            max_body_bytes=int(args.max_body_mb * 2**20),
            max_queued_images=args.max_queued,
            num_threads=args.threads,
            limits=Limits(
                limits.max_image_bytes,
                max_pixels=args.max_pixels,
                max_images=args.max_images,
                max_request_pixels=args.max_request_pixels,
            ),
            max_requests=args.max_connections,
            max_receiving=args.max_receiving,
            body_timeout_s=args.body_timeout,
            max_inflight_pixels=args.max_inflight_pixels,
        )
    except ValueError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory(prefix="dogbreed-serve-") as tmp:
        try:
            source = Path(args.model)
            model_dir = extract_package(source, tmp) if source.is_file() else find_model_dir(source)
            model = load_model(model_dir, runtime=args.runtime, num_threads=args.threads)
        except (OSError, ValueError, ImportError, tarfile.TarError) as err:
            parser.exit(2, f"error: cannot load {args.model}: {err}\n")
        uvicorn.run(
            create_app(model, config),
            http=functools.partial(HeaderDeadlineH11, header_timeout_s=args.header_timeout),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )


def container_main() -> None:
    """Entry of the ``dogbreed-serve-container`` console script."""
    main(container=True)


if __name__ == "__main__":
    main()
