"""A model package served by SageMaker's own PyTorch inference stack, as the stock PyTorch container runs it.

Both tests run the unpacked ``model.tar.gz`` on ``bare_python`` (tests/installed.py): torch, the toolkits and
TorchServe, and no dogbreed but the copy in the package's ``code/``, as in the stock container, so a module
the package lacks fails here. In a subprocess: the PyTorch toolkit's ``HandlerService`` (the
``sagemaker_inference`` ``Transformer`` with ``DefaultPytorchInferenceHandler``) called with a real
``ts.context.Context`` built by TorchServe's own request decoding, for every content type and every documented
4xx on the eager runtime, and the main requests on every export (``torch.export``, OpenVINO FP32 and INT8,
TorchScript, ONNX) and on ``DOGBREED_RUNTIME=auto``. End to end (slow):
``sagemaker_pytorch_serving_container.serving.main()`` starting TorchServe on 127.0.0.1, queried over HTTP
with a real photo.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from dogbreed.serve.codec import format_predictions
from dogbreed.serve.handlers import input_fn, model_fn, predict_fn
from dogbreed.serve.package import build_package, extract_package
from dogbreed.serve.runtime import load_model

from .conftest import TINY_BREEDS, wait_until_up, write_image_folder
from .installed import IsolatedPython

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "Labrador_retriever_06457.jpg"
TS_CONFIG_FILE = Path("/etc/sagemaker-ts.properties")  # where the toolkit writes TorchServe's config


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    torch.set_num_threads(1)  # see tests/test_serve_handlers.py


@pytest.fixture(scope="module")
def base_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``SAGEMAKER_BASE_DIR`` (``/opt/ml`` on SageMaker) with the unpacked package at ``model/``."""
    tmp = tmp_path_factory.mktemp("sagemaker")
    # served as eager unless DOGBREED_RUNTIME says otherwise; each export checked on images of the model's classes
    data = write_image_folder(tmp / "data", classes=TINY_BREEDS, counts={"train": 2, "valid": 2})
    archive = build_package(
        tiny_model_dir.parent, tmp / "model.tar.gz", exports=[*EXPORTED, INT8], runtime="eager", calibration=data
    )
    extract_package(archive, tmp / "ml" / "model")
    return tmp / "ml"


@pytest.fixture(scope="module")
def expected(base_dir: Path) -> list[dict]:
    """The photo's answer from this checkout's handlers: what the toolkit must answer too."""
    model = model_fn(str(base_dir / "model"))
    return format_predictions(predict_fn(input_fn(PHOTO.read_bytes(), "image/jpeg"), model))["predictions"]


@pytest.fixture(scope="module")
def expected_int8(base_dir: Path) -> list[dict]:
    """INT8's own answer from this checkout (quantised logits differ from eager's): what the toolkit must match."""
    model = load_model(base_dir / "model", runtime=INT8)
    return format_predictions(predict_fn(input_fn(PHOTO.read_bytes(), "image/jpeg"), model))["predictions"]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    """One request and what the toolkit must answer: a status and, for a refusal, the body's ``error``."""

    content_type: str
    body: bytes
    accept: str | None = "application/json"
    env: dict[str, str] = field(default_factory=dict)
    status: int = 200
    error: str | None = None
    images: int = 1  # rows in a batched answer; 1 for a single image
    top_k: int = 5


def cases(base_dir: Path) -> dict[str, Case]:
    """Every content type the README lists, the Accept defaulting, and every documented 4xx."""
    photo = PHOTO.read_bytes()
    rgb = Image.open(PHOTO).convert("RGB")
    b64 = base64.b64encode(photo).decode()
    single, batch = json.dumps({"image": b64}).encode(), json.dumps({"images": [b64, b64]}).encode()
    preprocessed = model_fn(str(base_dir / "model")).preprocess([rgb])[0].numpy()
    return {
        "image/jpeg": Case("image/jpeg", photo),
        "image/png": Case("image/png", png(rgb)),
        "application/x-image": Case("application/x-image", photo),
        "application/octet-stream": Case("application/octet-stream", photo),
        "json": Case("application/json", single),
        "json-charset": Case("application/json; charset=utf-8", single),
        "json-batch": Case("application/json", batch, images=2),
        "json-explain": Case("application/json", json.dumps({"image": b64, "explain": True}).encode()),
        "npy-uint8": Case("application/x-npy", npy(np.asarray(rgb))),
        "npy-float32": Case("application/x-npy", npy(preprocessed)),
        "accept-any": Case("image/jpeg", photo, accept="*/*"),  # the toolkit swaps in its default accept
        "no-accept": Case("image/jpeg", photo, accept=None),
        "accept-top-k": Case("image/jpeg", photo, accept="application/json;top_k=2", top_k=2),
        "empty-body": Case("image/jpeg", b"", status=400, error="empty_body"),
        "not-an-image": Case("image/jpeg", b"hello, I am not a photo", status=400, error="not_an_image"),
        "truncated-image": Case("image/jpeg", photo[:5000], status=400, error="corrupt_image"),
        "bad-base64": Case("application/json", b'{"image": "not base64!!"}', status=400, error="bad_base64"),
        "bad-json": Case("application/json", b"{not json", status=400, error="bad_json"),
        "bad-explain": Case(
            "application/json", json.dumps({"image": b64, "explain": "yes"}).encode(), status=400, error="bad_explain"
        ),
        "unsupported-content-type": Case("text/csv", b"a,b\n1,2\n", status=415, error="unsupported_content_type"),
        "unsupported-accept": Case("image/jpeg", photo, accept="text/csv", status=406, error="unsupported_accept"),
        "image-too-large": Case(
            "image/jpeg", photo, env={"DOGBREED_MAX_IMAGE_BYTES": "1000"}, status=413, error="image_too_large"
        ),
        "too-many-pixels": Case(
            "image/jpeg", photo, env={"DOGBREED_MAX_PIXELS": "10000"}, status=413, error="too_many_pixels"
        ),
        "too-many-images": Case(
            "application/json", batch, env={"DOGBREED_MAX_IMAGES": "1"}, status=413, error="too_many_images"
        ),
    }


EXPORTED = ["export", "openvino", "torchscript", "onnx"]  # the exports that answer as eager does (to 1e-4)
INT8 = "openvino-int8"  # answers as its own quantised model does; `auto` picks it where OpenVINO is installed
RUNTIME_CASES = ["image/jpeg", "json", "json-batch", "npy-float32", "json-explain", "not-an-image", "bad-json"]
CASE_NAMES = [
    "image/jpeg", "image/png", "application/x-image", "application/octet-stream", "json", "json-charset",
    "json-batch", "json-explain", "npy-uint8", "npy-float32", "accept-any", "no-accept", "accept-top-k",
    "empty-body", "not-an-image", "truncated-image", "bad-base64", "bad-json", "bad-explain",
    "unsupported-content-type", "unsupported-accept", "image-too-large", "too-many-pixels", "too-many-images",
]  # fmt: skip

# Runs in a fresh interpreter whose PYTHONPATH starts with the package's code/ (what the toolkit sets up for
# TorchServe's worker), so `inference` and `dogbreed` are the package's copies.
TOOLKIT_DRIVER = """
import json, os, sys
from pathlib import Path

from sagemaker_pytorch_serving_container.handler_service import HandlerService
from ts.context import Context
from ts.service import Service

model_dir, cases_dir = sys.argv[1], Path(sys.argv[2])
results, runtime = {}, None
for i, case in enumerate(json.loads((cases_dir / "cases.json").read_text())):
    if case["runtime"] != runtime:  # a new model: the endpoint's DOGBREED_RUNTIME overrides the package's
        runtime = os.environ["DOGBREED_RUNTIME"] = case["runtime"]
        service = HandlerService()  # Transformer(default_inference_handler=DefaultPytorchInferenceHandler())
        context = Context("model", model_dir, None, 1, None, "0.12.0")
        service.initialize(context)
    headers = {"Content-Type": case["content_type"]}
    if case["accept"] is not None:
        headers["Accept"] = case["accept"]
    request = {  # what TorchServe's frontend sends its Python worker
        "requestId": str(i).encode(),
        "parameters": [
            {"name": "body", "contentType": case["content_type"], "value": (cases_dir / f"{i}.bin").read_bytes()}
        ],
        "headers": [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()],
    }
    context.request_processor, data, context.request_ids = Service.retrieve_data_for_inference([request])
    saved = dict(os.environ)
    os.environ.update(case["env"])  # input_fn reads the limits from the endpoint's environment
    try:
        (body,) = service.handle(data, context)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    status, phrase = context.get_response_status(0)
    results[f"{runtime}:{case['name']}"] = {
        "status": status, "phrase": phrase, "content_type": context.get_response_content_type(0),
        "body": body.decode() if isinstance(body, bytes) else body,
    }
import dogbreed
print(json.dumps({"dogbreed": dogbreed.__file__, "results": results}))
"""


@pytest.fixture(scope="module")
def toolkit_run(base_dir: Path, bare_python: IsolatedPython, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case through the toolkit in one subprocess (one model load per runtime); answers by runtime:name."""
    folder = tmp_path_factory.mktemp("cases")
    table = cases(base_dir)
    runs = [("eager", name) for name in CASE_NAMES]
    runs += [(runtime, name) for runtime in [*EXPORTED, INT8, "auto"] for name in RUNTIME_CASES]
    manifest = []
    for i, (runtime, name) in enumerate(runs):
        case = table[name]
        (folder / f"{i}.bin").write_bytes(case.body)
        manifest.append(
            {
                "runtime": runtime,
                "name": name,
                "content_type": case.content_type,
                "accept": case.accept,
                "env": case.env,
            }
        )
    (folder / "cases.json").write_text(json.dumps(manifest))
    model_dir = base_dir / "model"
    result = subprocess.run(
        [str(bare_python.python), "-c", TOOLKIT_DRIVER, str(model_dir), str(folder)], cwd=folder,
        env=bare_python.env(PYTHONPATH=str(model_dir / "code"), OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    run = json.loads(result.stdout.splitlines()[-1])
    assert run["dogbreed"].startswith(str(model_dir / "code")), run["dogbreed"]  # the package's copy answered
    return run["results"] | {"_cases": table}


def check_answer(name: str, case: Case, status: int, content_type: str | None, body: str, expected: list) -> None:
    """Assert one HTTP-level answer: 200 with the expected top-k, or the case's 4xx with its JSON error line."""
    assert status == case.status, f"{name}: {status} {body[:2000]}"
    if case.status == 200:
        assert content_type == "application/json"
        predictions = json.loads(body)["predictions"]
        rows = predictions if case.images > 1 else [predictions]
        assert len(rows) == case.images
        for row in rows:
            assert [p["index"] for p in row] == [p["index"] for p in expected[: case.top_k]]
            assert [p["probability"] for p in row] == pytest.approx(
                [p["probability"] for p in expected[: case.top_k]], abs=1e-4
            )
    else:
        # transform_fn answers the refusal's JSON alone, not the toolkit's message + Python traceback
        assert content_type == "application/json" and "Traceback" not in body
        error = json.loads(body)
        assert error["error"] == case.error and error["message"] and error["accepted"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_toolkit_answers_every_content_type_and_refusal(name: str, toolkit_run: dict, expected: list) -> None:
    case, got = toolkit_run["_cases"][name], toolkit_run[f"eager:{name}"]
    check_answer(name, case, got["status"], got["content_type"], got["body"], expected)
    if case.status != 200:
        assert got["phrase"] == HTTPStatus(case.status).phrase
    if name == "json-explain":  # Grad-CAM from the package's own copy of dogbreed/serve/explain.py
        explanation = json.loads(got["body"])["explanation"]
        assert explanation["layer"] == "layer4" and explanation["index"] == expected[0]["index"]


@pytest.mark.parametrize("runtime", EXPORTED)
@pytest.mark.parametrize("name", RUNTIME_CASES)
def test_toolkit_answers_on_each_exported_runtime(name: str, runtime: str, toolkit_run: dict, expected: list) -> None:
    """The same answers from each of the package's exports; only eager explains (it has gradients)."""
    case, got = toolkit_run["_cases"][name], toolkit_run[f"{runtime}:{name}"]
    if name == "json-explain":
        case = Case(case.content_type, case.body, status=400, error="explain_needs_eager")
    check_answer(f"{runtime}:{name}", case, got["status"], got["content_type"], got["body"], expected)


@pytest.mark.parametrize("runtime", [INT8, "auto"])
@pytest.mark.parametrize("name", RUNTIME_CASES)
def test_toolkit_answers_on_int8_and_auto(name: str, runtime: str, toolkit_run: dict, expected_int8: list) -> None:
    """The INT8 package answers in the stock container as in the checkout; ``auto`` serves it (OpenVINO is there)."""
    case, got = toolkit_run["_cases"][name], toolkit_run[f"{runtime}:{name}"]
    if name == "json-explain":
        case = Case(case.content_type, case.body, status=400, error="explain_needs_eager")
    check_answer(f"{runtime}:{name}", case, got["status"], got["content_type"], got["body"], expected_int8)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1 (held open together so that none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def process_group(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group: the toolkit, TorchServe's Java frontend and its Python workers."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@contextlib.contextmanager
def restored(path: Path) -> Iterator[None]:
    """Put ``path`` back as it was (or absent) afterwards: the toolkit writes TorchServe's config there."""
    before = path.read_bytes() if path.exists() else None
    try:
        yield
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


@contextlib.contextmanager
def sagemaker_serving(
    base_dir: Path, python: IsolatedPython, workdir: Path, log: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``serving.main()`` as the container does, on 127.0.0.1 only; yield its URL once ``/ping`` is 200.

    The toolkit writes ``inference_address=http://0.0.0.0:PORT`` into its TorchServe config, but that config
    sets ``enable_envvars_config=true``, so TorchServe's ``TS_*`` variables override every address. On exit
    the serving process gets SIGTERM (what ``docker stop`` sends); whatever is left of its process group is
    killed, so that nothing leaks even when the test fails.
    """
    port, management, metrics, grpc, grpc_management = free_ports(5)
    tmp = workdir / "tmp"  # TorchServe's pid file and worker sockets: apart from any other TorchServe
    tmp.mkdir(parents=True)
    env = python.env(  # its bin/ first on PATH: the toolkit starts `torchserve`, which starts workers on its Python
        OMP_NUM_THREADS="1",
        SAGEMAKER_BASE_DIR=str(base_dir),
        SAGEMAKER_BIND_TO_PORT=str(port),
        SAGEMAKER_MODEL_SERVER_WORKERS="1",
        TS_INFERENCE_ADDRESS=f"http://127.0.0.1:{port}",
        TS_MANAGEMENT_ADDRESS=f"http://127.0.0.1:{management}",
        TS_METRICS_ADDRESS=f"http://127.0.0.1:{metrics}",
        TS_GRPC_INFERENCE_PORT=str(grpc),
        TS_GRPC_MANAGEMENT_PORT=str(grpc_management),
        TMPDIR=str(tmp),
        TEMP=str(tmp),
        DOGBREED_MAX_IMAGES="2",
    )
    command = [str(python.python), "-c", "from sagemaker_pytorch_serving_container import serving; serving.main()"]
    url = f"http://127.0.0.1:{port}"
    with restored(TS_CONFIG_FILE), open(log, "wb") as out:
        server = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            # Java, then a worker importing torch: tens of seconds on 2 cores
            wait_until_up(f"{url}/ping", server, timeout=240, log=log, interval=1)
            yield url, server
        finally:
            server.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=60)
            deadline = time.monotonic() + 30  # the Java frontend stops its workers, then itself
            while process_group(server.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = process_group(server.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    assert not left, f"still running 30 s after SIGTERM: {[p.cmdline() for p in left]}"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+ on PATH; none found")
def test_torchserve_serves_the_package(
    base_dir: Path, bare_python: IsolatedPython, expected: list, tmp_path: Path
) -> None:
    photo = PHOTO.read_bytes()
    three = json.dumps({"images": [base64.b64encode(photo).decode()] * 3}).encode()  # the server allows 2
    requests = {
        "photo": Case("image/jpeg", photo, accept=None),
        "accept-any": Case("image/jpeg", photo, accept="*/*"),
        "empty-body": Case("image/jpeg", b"", status=400, error="empty_body"),
        "not-an-image": Case("image/jpeg", b"not a photo", status=400, error="not_an_image"),
        "bad-json": Case("application/json", b"{not json", status=400, error="bad_json"),
        "unsupported-content-type": Case("text/csv", b"a,b\n", status=415, error="unsupported_content_type"),
        "too-many-images": Case("application/json", three, status=413, error="too_many_images"),
    }
    with sagemaker_serving(base_dir, bare_python, tmp_path, tmp_path / "torchserve.log") as (url, server):
        group = {p.pid for p in process_group(server.pid)}  # TorchServe's launcher exits; its Java stays in the group
        listening = [
            c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in group
        ]
        assert listening and all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening), listening
        assert httpx.get(f"{url}/ping", timeout=10).status_code == 200
        for name, case in requests.items():
            headers = {"Content-Type": case.content_type} | ({"Accept": case.accept} if case.accept else {})
            response = httpx.post(f"{url}/invocations", content=case.body, headers=headers, timeout=60)
            check_answer(
                name, case, response.status_code, response.headers.get("content-type"), response.text, expected
            )
        # TorchServe's own request size limit (6553500 bytes by default) answers before the handlers do.
        oversized = httpx.post(f"{url}/invocations", content=b"\0" * 7_000_000, headers={"Content-Type": "image/jpeg"})
        assert oversized.status_code == 413
