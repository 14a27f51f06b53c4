"""A real endpoint process on 127.0.0.1: the SageMaker contract, boto3, the query script, load and shutdown."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import psutil
import pytest
import torch
from PIL import Image

from dogbreed.serve.codec import format_predictions
from dogbreed.serve.handlers import input_fn, model_fn, predict_fn
from dogbreed.serve.package import extract_package

from .conftest import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "images" / "Labrador_retriever_06457.jpg"
README = (ROOT / "README.md").read_text()
OTHER_PHOTO = ROOT / "examples" / "images" / "Brittany_02625.jpg"


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    torch.set_num_threads(1)  # see tests/test_serve_handlers.py


@dataclass
class Endpoint:
    url: str
    process: subprocess.Popen
    log: Path


def start_endpoint(model: Path, log: Path, *extra: str) -> Endpoint:
    """Start ``python -m dogbreed.serve`` and wait for ``/ping``."""
    port = free_port()
    command = [sys.executable, "-m", "dogbreed.serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen([*command, "--threads", "1", *extra], stdout=out, stderr=subprocess.STDOUT)
    endpoint = Endpoint(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until_up(f"{endpoint.url}/ping", process, timeout=90, log=log)
    except RuntimeError:
        process.kill()
        process.wait()
        raise
    return endpoint


def stop_endpoint(endpoint: Endpoint) -> None:
    """SIGTERM, as SageMaker and Kubernetes stop a container, then check the shutdown was clean."""
    endpoint.process.send_signal(signal.SIGTERM)
    try:
        code = endpoint.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        endpoint.process.kill()
        endpoint.process.wait()
        raise
    # uvicorn re-raises the signal once shut down, so a clean stop exits "killed by SIGTERM".
    assert code in (0, -signal.SIGTERM), endpoint.log.read_text()[-3000:]
    assert "Application shutdown complete" in endpoint.log.read_text()


@pytest.fixture(scope="module")
def package(tiny_package: Callable[..., Path]) -> Path:
    return tiny_package()


@pytest.fixture(scope="module")
def endpoint(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    log = tmp_path_factory.mktemp("endpoint") / "server.log"
    endpoint = start_endpoint(package, log, "--max-body-mb", "1", "--max-batch-size", "8")
    yield endpoint
    stop_endpoint(endpoint)


@pytest.fixture(scope="module")
def direct(package: Path, tmp_path_factory: pytest.TempPathFactory):
    """``predict_fn`` called directly on the unpacked package: what every HTTP answer must equal."""
    model = model_fn(str(extract_package(package, tmp_path_factory.mktemp("unpacked"))))

    def predict(path: Path) -> list[dict]:
        return format_predictions(predict_fn(input_fn(path.read_bytes(), "image/jpeg"), model))["predictions"]

    return predict


def readme_snippet(marker: str) -> str:
    """The README's one ``python`` block that contains ``marker``."""
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", README, re.S) if marker in block]
    return snippet


def same(got: list[dict], want: list[dict]) -> None:
    """Same classes in the same order; probabilities equal up to batched-vs-single float rounding."""
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in want], abs=1e-4)


def test_ping(endpoint: Endpoint) -> None:
    response = httpx.get(f"{endpoint.url}/ping")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_photo_as_raw_bytes_and_as_json_base64(endpoint: Endpoint, direct) -> None:
    raw = httpx.post(f"{endpoint.url}/invocations", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    same(raw.json()["predictions"], direct(PHOTO))
    b64 = base64.b64encode(PHOTO.read_bytes()).decode()
    as_json = httpx.post(f"{endpoint.url}/invocations", json={"image": b64, "top_k": 2})
    assert as_json.status_code == 200
    same(as_json.json()["predictions"], direct(PHOTO)[:2])


def test_batch_request(endpoint: Endpoint, direct) -> None:
    images = [base64.b64encode(p.read_bytes()).decode() for p in (PHOTO, OTHER_PHOTO, PHOTO)]
    response = httpx.post(f"{endpoint.url}/endpoints/any-name/invocations", json={"images": images})
    assert response.status_code == 200
    rows = response.json()["predictions"]
    assert len(rows) == 3
    for row, path in zip(rows, (PHOTO, OTHER_PHOTO, PHOTO), strict=True):
        same(row, direct(path))


def test_boto3_invoke_endpoint_matches_predict_fn(endpoint: Endpoint, direct) -> None:
    client = boto3.client(
        "sagemaker-runtime", endpoint_url=endpoint.url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    response = client.invoke_endpoint(
        EndpointName="dogbreed", Body=OTHER_PHOTO.read_bytes(), ContentType="image/jpeg", Accept="application/json"
    )
    assert response["ContentType"] == "application/json"
    same(json.loads(response["Body"].read())["predictions"], direct(OTHER_PHOTO))


def test_http_errors_are_json(endpoint: Endpoint) -> None:
    post = lambda body, **headers: httpx.post(f"{endpoint.url}/invocations", content=body, headers=headers)  # noqa: E731
    cases = [
        (post(b"", **{"Content-Type": "image/jpeg"}), 400, "empty_body"),
        (post(b"not an image", **{"Content-Type": "image/png"}), 400, "not_an_image"),
        (post(PHOTO.read_bytes()[:4000], **{"Content-Type": "image/jpeg"}), 400, "corrupt_image"),
        (post(PHOTO.read_bytes(), **{"Content-Type": "text/plain"}), 415, "unsupported_content_type"),
        (post(PHOTO.read_bytes(), **{"Content-Type": "image/jpeg", "Accept": "text/csv"}), 406, "unsupported_accept"),
        (post(b'{"image": "%%%"}', **{"Content-Type": "application/json"}), 400, "bad_base64"),
        (post(b"x" * (2 * 2**20), **{"Content-Type": "image/jpeg"}), 413, "body_too_large"),
    ]
    for response, status, error in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"] == error
        assert response.json()["message"] and response.json()["accepted"]


def test_explain_adds_grad_cam_and_keeps_the_answer(endpoint: Endpoint) -> None:
    """``?explain=true`` (any body) or ``"explain": true`` (JSON): the same predictions plus the heat map."""
    url, jpeg = f"{endpoint.url}/invocations", {"Content-Type": "image/jpeg"}
    plain = httpx.post(url, content=PHOTO.read_bytes(), headers=jpeg).json()
    explained = httpx.post(url, params={"explain": "true"}, content=PHOTO.read_bytes(), headers=jpeg).json()
    assert set(plain) == {"predictions"} and explained["predictions"] == plain["predictions"]
    assert explained["explanation"]["label"] == plain["predictions"][0]["label"]
    heatmap = Image.open(io.BytesIO(base64.b64decode(explained["explanation"]["heatmap_png"])))
    assert heatmap.size == (32, 32) and heatmap.mode == "L"  # the tiny model's input crop
    b64 = base64.b64encode(OTHER_PHOTO.read_bytes()).decode()
    batch = httpx.post(url, json={"images": [b64, b64], "explain": True}).json()
    assert len(batch["explanation"]) == 2
    off = httpx.post(url, params={"explain": "false"}, content=PHOTO.read_bytes(), headers=jpeg).json()
    assert off == plain
    bad = httpx.post(url, params={"explain": "maybe"}, content=PHOTO.read_bytes(), headers=jpeg)
    assert bad.status_code == 400 and bad.json()["error"] == "bad_explain"
    # the same limits as every request: this endpoint takes bodies of 1 MiB
    big = httpx.post(url, params={"explain": "true"}, content=b"x" * (2 * 2**20), headers=jpeg)
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"


@pytest.mark.slow
def test_explain_without_gradients_is_refused_and_plain_requests_answer(
    tiny_package: Callable[..., Path], tmp_path: Path
) -> None:
    """A torch.export endpoint: 400 explain_needs_eager for the query parameter (before the body is read) and the
    JSON field alike; the same request without explain answers."""
    endpoint = start_endpoint(tiny_package(exports=("export",)), tmp_path / "server.log", "--runtime", "export")
    try:
        url, photo, jpeg = f"{endpoint.url}/invocations", PHOTO.read_bytes(), {"Content-Type": "image/jpeg"}
        b64 = base64.b64encode(photo).decode()
        for response in [
            httpx.post(url, params={"explain": "true"}, content=photo, headers=jpeg),
            httpx.post(url, json={"image": b64, "explain": True}),
        ]:
            assert response.status_code == 400 and response.json()["error"] == "explain_needs_eager"
        plain = httpx.post(url, content=photo, headers=jpeg)
        assert plain.status_code == 200 and set(plain.json()) == {"predictions"}
    finally:
        stop_endpoint(endpoint)


def test_web_page_files_have_their_types_and_a_self_only_policy(endpoint: Endpoint) -> None:
    page = httpx.get(f"{endpoint.url}/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert links and all(link.startswith("static/") for link in links)  # nothing from another origin
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
        response = httpx.get(f"{endpoint.url}/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.headers["content-security-policy"] == policy
    for missing in ("/static/nope.js", "/static/..%2Fhandlers.py", "/static/../server.py", "/index.html"):
        assert httpx.get(f"{endpoint.url}{missing}").status_code == 404, missing
    assert httpx.post(f"{endpoint.url}/").status_code == 405


def test_query_script(endpoint: Endpoint) -> None:
    script = [sys.executable, str(ROOT / "scripts" / "query_endpoint.py"), str(PHOTO), str(OTHER_PHOTO)]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "PATH": ""}
    for extra in (
        ["--url", endpoint.url],
        ["--url", endpoint.url, "--content-type", "application/json"],
        ["--endpoint-name", "dogbreed", "--endpoint-url", endpoint.url, "--region", "us-east-1"],
        ["--endpoint-name", "dogbreed", "--endpoint-url", endpoint.url],  # local: no region, no credentials
    ):
        run_env = env if "--region" in extra else {"PATH": "", "HOME": str(ROOT / "nonexistent")}
        result = subprocess.run([*script, *extra], capture_output=True, text=True, timeout=60, env=run_env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == str(PHOTO) and lines[6] == str(OTHER_PHOTO)
        assert len(lines) == 12 and lines[1].strip().startswith("1. ") and lines[1].endswith("%")
    bad = subprocess.run([*script[:2], str(ROOT / "README.md"), "--url", endpoint.url], capture_output=True, text=True)
    assert bad.returncode == 1 and "not_an_image" in bad.stderr
    no_aws = subprocess.run(  # SageMaker without a region or credentials: one line, not a traceback
        [*script[:2], str(PHOTO), "--endpoint-name", "dogbreed"], capture_output=True, text=True, timeout=60,
        env={"PATH": "", "HOME": str(ROOT / "nonexistent")},
    )  # fmt: skip
    assert no_aws.returncode == 1 and "--region" in no_aws.stderr and "Traceback" not in no_aws.stderr


def test_readme_boto3_snippet_answers(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's boto3 snippet, run as written against the local server, with no AWS settings at all."""
    snippet = readme_snippet("invoke_endpoint")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(ROOT / "nonexistent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(ROOT / "nonexistent"))
    monkeypatch.chdir(ROOT)
    exec(snippet.replace("http://127.0.0.1:8080", endpoint.url), {})
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"]


def test_readme_explain_snippet_reads_the_heat_map(endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The web page section's client snippet, run as written: a heat map of the crop's size, in [0, 1]."""
    monkeypatch.chdir(ROOT)
    names: dict = {}
    exec(readme_snippet("explain=true").replace("http://127.0.0.1:8080", endpoint.url), names)
    assert names["heatmap"].shape == (32, 32) and 0 <= names["heatmap"].min() <= names["heatmap"].max() <= 1


async def hammer(url: str, n: int, concurrency: int) -> tuple[list[int], list[float]]:
    """``n`` photo requests, ``concurrency`` at a time, while /ping is polled; status codes and ping latencies."""
    body = PHOTO.read_bytes()
    statuses: list[int] = []
    pings: list[float] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency + 1)) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with semaphore:
                try:
                    response = await client.post(
                        f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"}
                    )
                    statuses.append(response.status_code)
                except httpx.HTTPError:
                    statuses.append(-1)

        async def ping() -> None:
            while len(statuses) < n:
                start = time.perf_counter()
                assert (await client.get(f"{url}/ping")).status_code == 200
                pings.append(time.perf_counter() - start)
                await asyncio.sleep(0.05)

        await asyncio.gather(ping(), *(one() for _ in range(n)))
    return statuses, pings


def test_500_requests_at_concurrency_16(endpoint: Endpoint) -> None:
    server = psutil.Process(endpoint.process.pid)
    before = httpx.get(f"{endpoint.url}/ping").json()
    statuses, _ = asyncio.run(hammer(endpoint.url, 100, 16))  # warm up: allocator pools, thread stacks
    warm_rss = server.memory_info().rss
    statuses2, pings = asyncio.run(hammer(endpoint.url, 400, 16))
    grown_mb = (server.memory_info().rss - warm_rss) / 2**20
    after = httpx.get(f"{endpoint.url}/ping").json()
    assert statuses + statuses2 == [200] * 500
    assert grown_mb < 64, f"server RSS grew by {grown_mb:.0f} MB over 400 requests"
    assert max(pings) < 2.0, f"/ping took up to {max(pings):.2f} s under load"
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 500 and batches < images  # concurrent requests were batched


def held_upload(url: str, body: bytes) -> socket.socket:
    """Start a POST of ``body`` that the server provably holds: it has answered ``100 Continue`` (it is reading
    the body in the handler), and it has half the body; the rest is still to be sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):  # nothing else can come before the rest of the body
        chunk = sock.recv(1)
        assert chunk, f"the server closed the connection after {interim!r}"
        interim += chunk
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    sock.sendall(body[: len(body) // 2])
    return sock


def listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def test_graceful_shutdown_finishes_in_flight_requests(package: Path, tmp_path: Path) -> None:
    """SIGTERM while 8 requests are half uploaded: the server stops listening, yet reads and answers all 8."""
    endpoint = start_endpoint(package, tmp_path / "server.log", "--max-delay-ms", "50")
    body = PHOTO.read_bytes()
    held = [held_upload(endpoint.url, body) for _ in range(8)]
    try:
        endpoint.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while listening(endpoint.url):  # the shutdown has begun while every request is still in flight
            assert time.monotonic() < deadline, "the server still accepts connections 30 s after SIGTERM"
            time.sleep(0.05)
        assert endpoint.process.poll() is None, "the server exited with requests in flight"
        for sock in held:
            sock.sendall(body[len(body) // 2 :])
        for sock in held:
            response = http.client.HTTPResponse(sock)
            response.begin()
            answer = response.read()
            assert response.status == 200, answer
            assert json.loads(answer)["predictions"][0]["label"]
    finally:
        for sock in held:
            sock.close()
        stop_endpoint(endpoint)


def test_serve_console_script_reads_the_sagemaker_model_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dogbreed.serve.__main__ import main

    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["serve"], container=True)  # `docker run IMAGE serve`, as SageMaker starts a container
    assert info.value.code == 2
    assert f"cannot load {tmp_path}" in capsys.readouterr().err
