"""The endpoint against an attacker on 127.0.0.1: malformed requests, slow clients, pixel amplification, bad models.

One server process with small limits (2 MB bodies, 1.5 s to send a body, 8 bodies in flight, 10 MP per
request and in flight) answers every test here; each test checks that ``/ping`` still answers afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from dogbreed.serve.codec import BYTES_PER_PIXEL, InferenceError
from dogbreed.serve.handlers import model_fn
from dogbreed.serve.server import PixelBudget
from tests.test_serve_server import PHOTO, Endpoint, start_endpoint, stop_endpoint

BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 1.5
MAX_RECEIVING = 8
MAX_PIXELS = 10_000_000  # per request and in flight


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    torch.set_num_threads(1)  # see tests/test_serve_handlers.py


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    log = tmp_path_factory.mktemp("hardened") / "server.log"
    limits = ["--max-body-mb", "2", "--body-timeout", str(BODY_TIMEOUT_S), "--max-receiving", str(MAX_RECEIVING)]
    limits += ["--header-timeout", str(HEADER_TIMEOUT_S)]
    pixels = ["--max-request-pixels", str(MAX_PIXELS), "--max-inflight-pixels", str(MAX_PIXELS)]
    endpoint = start_endpoint(tiny_model_dir.parent, log, *limits, *pixels, "--log-level", "debug")
    yield endpoint
    stop_endpoint(endpoint)
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def with_shape(shape: bytes, dtype: str = "<u1") -> bytes:
    """An .npy header declaring any shape, followed by 64 bytes of data."""
    header = b"{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (dtype.encode(), shape)
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(64)


def http_cases() -> list[tuple[str, bytes | str, dict[str, str | bytes]]]:
    """(what, body, headers) of requests the app must refuse with its JSON error body."""
    photo = b64(PHOTO.read_bytes())
    as_json = {"Content-Type": "application/json"}
    as_npy = {"Content-Type": "application/x-npy"}
    as_jpeg = {"Content-Type": "image/jpeg"}
    deep = '{"image": ' + "[" * 5000 + "]" * 5000 + "}"
    bad_npy = [
        ("npy (0, 0)", npy(np.zeros((0, 0), np.uint8))),
        ("npy (1, 0, 3)", npy(np.zeros((1, 0, 3), np.uint8))),
        ("npy (0, 4, 4, 3)", npy(np.zeros((0, 4, 4, 3), np.uint8))),
        ("npy shape product overflows int64", with_shape(b"(4294967296, 4294967296)")),
        ("npy negative dimension", with_shape(b"(-4, 4)")),
        ("npy 65 images", npy(np.zeros((65, 1, 1, 3), np.uint8))),
        ("npy all NaN float32", npy(np.full((3, 32, 32), np.nan, np.float32))),
        ("npy inf float32 batch", npy(np.full((2, 3, 32, 32), np.inf, np.float32))),
        ("npy float64 beyond float32", npy(np.full((3, 32, 32), 1e300))),
        ("npy float16 wrong size", npy(np.zeros((3, 7, 7), np.float16))),
        ("npy complex64", npy(np.zeros((3, 32, 32), np.complex64))),
        ("npy bool", npy(np.zeros((4, 4), bool))),
        ("npy int64", npy(np.zeros((4, 4), np.int64))),
        ("npy big-endian int16", npy(np.zeros((4, 4, 3), ">i2"))),
        ("npy structured", npy(np.zeros((4, 4), [("r", "u1"), ("g", "f4")]))),
        ("npy fortran 5 channels", npy(np.asfortranarray(np.zeros((4, 4, 5), np.uint8)))),
        ("npy 2 channels batch", npy(np.zeros((2, 4, 4, 2), np.uint8))),
        ("npy 5-d", npy(np.zeros((1, 1, 4, 4, 3), np.uint8))),
        ("npy truncated", npy(np.zeros((64, 64, 3), np.uint8))[:500]),
        ("npy header garbage", b"\x93NUMPY\x01\x00\x10\x00{'descr': [[[[[\n"),
        ("npy version 9.9", b"\x93NUMPY\x09\x09" + bytes(100)),
        ("npz", b"PK\x03\x04" + bytes(100)),
        ("npy pixels over the request budget", npy(np.zeros((3, 2000, 2000, 1), np.uint8))),
    ]
    bad_json = [
        ("[ x 100000", "[" * 100000),
        ('{"image": [[[...]]]} 5000 deep', deep),
        ("integer of 5000 digits", "1" * 5000),
        ("null", "null"),
        ("true", "true"),
        ("string", '"image"'),
        ("float", "3.5"),
        ("empty object", "{}"),
        ("empty list", "[]"),
        ("[null]", "[null]"),
        ("images is an object", '{"images": {"a": 1}}'),
        ("image is a number", '{"image": 5}'),
        ("image empty", '{"image": ""}'),
        ("data URL without data", '{"image": "data:,"}'),
        ("data URL base64 empty", '{"image": "data:image/png;base64,"}'),
        ("unicode in base64", '{"image": "aé=="}'),
        ("lone surrogate", '{"image": "\\ud800"}'),
        ("base64 without padding", '{"image": "aGVsbG8"}'),
        ("base64 with a newline", json.dumps({"image": photo[:76] + "\n" + photo[76:]})),
        ("urlsafe base64", json.dumps({"image": photo.replace("+", "-").replace("/", "_")})),
        ("base64 of text", json.dumps({"image": b64(b"hello")})),
        ("top_k 0", json.dumps({"image": photo, "top_k": 0})),
        ("top_k -1", json.dumps({"image": photo, "top_k": -1})),
        ("top_k string", json.dumps({"image": photo, "top_k": "3"})),
        ("top_k float", json.dumps({"image": photo, "top_k": 2.5})),
        ("top_k true", json.dumps({"image": photo, "top_k": True})),
        ("top_k NaN", json.dumps({"image": photo, "top_k": float("nan")})),
        ("top_k Infinity", json.dumps({"image": photo, "top_k": float("inf")})),
        ("top_k object", json.dumps({"image": photo, "top_k": {"k": 1}})),
        ("65 images", json.dumps(["aGVsbG8="] * 65)),
        ("not UTF-8", b'{"image": "\xff\xfe"}'),
        ("bomb header in a batch", json.dumps([b64(png((20000, 20000), "1"))])),
        ("16 PNGs of 6300x6300 (issue 11)", json.dumps({"images": [b64(png((6300, 6300), "L"))] * 16})),
    ]
    bad_headers = [
        ("text/plain", PHOTO.read_bytes(), {"Content-Type": "text/plain"}),
        ("two content types", PHOTO.read_bytes(), {"Content-Type": "application/json, image/png"}),
        ("multipart", PHOTO.read_bytes(), {"Content-Type": "multipart/form-data; boundary=x"}),
        ("latin-1 content type", PHOTO.read_bytes(), {"Content-Type": "application/j\xe9son".encode("latin-1")}),
        ("charset utf-32 JSON in UTF-8", b'{"image": 1}', {"Content-Type": "application/json; charset=utf-32"}),
        ("Accept text/csv", PHOTO.read_bytes(), {**as_jpeg, "Accept": "text/csv"}),
        ("Accept top_k superscript", PHOTO.read_bytes(), {**as_jpeg, "Accept": "application/json;top_k=²".encode()}),
        ("Accept top_k 0", PHOTO.read_bytes(), {**as_jpeg, "Accept": "application/json;top_k=0"}),
        ("Accept top_k -1", PHOTO.read_bytes(), {**as_jpeg, "Accept": "application/json;top_k=-1"}),
        ("Accept top_k empty", PHOTO.read_bytes(), {**as_jpeg, "Accept": "application/json;top_k="}),
        ("Accept top_k 1e3", PHOTO.read_bytes(), {**as_jpeg, "Accept": "*/*;top_k=1e3"}),
        ("Accept top_k 5000 digits", PHOTO.read_bytes(), {**as_jpeg, "Accept": "*/*;top_k=" + "9" * 5000}),
        ("Accept top_k fullwidth", PHOTO.read_bytes(), {**as_jpeg, "Accept": "*/*;top_k=\uff13".encode()}),
        ("empty body", b"", as_jpeg),
        ("garbage image", b"\x00" * 100, as_jpeg),
        ("truncated PNG", png((64, 64))[:60], {"Content-Type": "image/png"}),
        ("PNG header of 20000x20000", png((20000, 20000), "1"), {"Content-Type": "image/png"}),
        ("6300x6300 PNG over the request budget", png((6300, 6300)), {"Content-Type": "image/png"}),
        ("body over 2 MB", b"\xff" * (3 * 2**20), as_jpeg),
    ]
    return [
        *((what, body, as_npy) for what, body in bad_npy),
        *((what, body, as_json) for what, body in bad_json),
        *bad_headers,
    ]


def raw_exchange(url: str, request: bytes, wait_s: float = 5.0) -> bytes:
    """Send raw bytes over one connection; what the server answers before closing or ``wait_s`` passes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as conn:
        conn.sendall(request)
        answer = b""
        deadline = time.monotonic() + wait_s
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def raw_cases() -> list[tuple[str, bytes]]:
    """(what, bytes) of HTTP-level lies; uvicorn's parser answers some itself (400 in plain text)."""
    head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
    return [
        ("Content-Length larger than the body", head + b"Content-Length: 5000\r\n\r\n" + b"\xff" * 100),
        ("Content-Length smaller than the body", head + b"Content-Length: 4\r\n\r\n" + b"\xff" * 100),
        ("Content-Length not a number", head + b"Content-Length: abc\r\n\r\n"),
        ("Content-Length negative", head + b"Content-Length: -1\r\n\r\n"),
        ("two Content-Lengths", head + b"Content-Length: 4\r\nContent-Length: 8\r\n\r\nabcdabcd"),
        ("chunked and Content-Length", head + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n4\r\nab"),
        ("bad chunk size", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("non-ASCII header name", head + b"X-\xff\xfe: 1\r\nContent-Length: 1\r\n\r\nx"),
        ("GET /invocations", b"GET /invocations HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]


@pytest.mark.slow
def test_malformed_requests_get_4xx_and_json_errors(endpoint: Endpoint) -> None:
    cases = http_cases()
    with httpx.Client(base_url=endpoint.url, timeout=30) as client:
        for what, body, headers in cases:
            response = client.post("/invocations", content=body, headers=headers)
            assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
            assert set(response.json()) == {"error", "message", "accepted"}, what
    raws = raw_cases()
    for what, request in raws:
        answer = raw_exchange(endpoint.url, request)
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
        assert status is not None and 400 <= status < 500, f"{what}: {answer[:300]!r}"
    assert len(cases) + len(raws) >= 40
    print(f"{len(cases) + len(raws)} malformed requests, all 4xx")
    assert httpx.get(f"{endpoint.url}/ping", timeout=2).status_code == 200
    ok = httpx.post(f"{endpoint.url}/invocations", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200 and json.loads(ok.content)["predictions"]


async def slow_client(url: str, statuses: list[int | None]) -> None:
    """Declare a 100 kB body and send 100 bytes of it every 0.2 s; record the answer's status."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
        )
        answer = asyncio.create_task(reader.read(65536))
        for _ in range(int(BODY_TIMEOUT_S / 0.2) + 10):
            if answer.done():
                break
            writer.write(b"\xff" * 100)
            with contextlib.suppress(ConnectionError):  # the server may have answered and closed
                await writer.drain()
            await asyncio.wait({answer}, timeout=0.2)
        data = await asyncio.wait_for(answer, 5)
        statuses.append(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None)
        await asyncio.wait_for(reader.read(), 5)  # the server closes the connection: EOF, not a timeout
    finally:
        writer.close()


def test_slow_clients_are_dropped_and_ping_keeps_answering(endpoint: Endpoint) -> None:
    """130 connections trickling their bodies: 8 may keep sending until 408, the others get 503 at once."""
    n = 130

    async def run() -> tuple[list[int | None], list[float]]:
        statuses: list[int | None] = []
        pings: list[float] = []
        clients = asyncio.gather(*(slow_client(endpoint.url, statuses) for _ in range(n)))
        async with httpx.AsyncClient(timeout=10) as client:
            while not clients.done():
                start = time.perf_counter()
                response = await client.get(f"{endpoint.url}/ping")
                pings.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
                await asyncio.wait({clients}, timeout=0.05)
        await clients
        return statuses, pings

    statuses, pings = asyncio.run(run())
    p99 = sorted(pings)[int(0.99 * (len(pings) - 1))]
    print(f"{n} slow connections; {len(pings)} pings, max {max(pings) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert statuses.count(408) == MAX_RECEIVING and statuses.count(503) == n - MAX_RECEIVING, statuses
    assert max(pings) < 2.0
    ok = httpx.post(f"{endpoint.url}/invocations", content=PHOTO.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200


@pytest.mark.slow
def test_connections_whose_headers_never_finish_are_closed(endpoint: Endpoint) -> None:
    """uvicorn alone keeps them open for ever (slowloris); a keep-alive connection that is used in time stays."""
    host, port = endpoint.url.removeprefix("http://").split(":")
    for sent in (b"", b"POST /invocations HTTP/1.1\r\nHost: x\r\n", b"GET /ping HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10) as conn:
            conn.sendall(sent)
            start = time.monotonic()
            assert conn.recv(1024) == b"", sent  # closed without an answer
            assert HEADER_TIMEOUT_S - 0.1 < time.monotonic() - start < HEADER_TIMEOUT_S + 5, sent
    with httpx.Client(timeout=10) as client:
        for _ in range(3):  # one connection, each request within the deadline after the last response
            assert client.get(f"{endpoint.url}/ping").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 3)
        assert client.get(f"{endpoint.url}/ping").status_code == 200


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc")
def test_pixel_amplification_is_refused_before_decoding(endpoint: Endpoint) -> None:
    """16 PNGs of 6300x6300 (38 kB each) took 2 GB; now 413 from their headers, and a batch within the budget
    takes less than ``BYTES_PER_PIXEL`` bytes per pixel of it."""
    pid = endpoint.process.pid
    amplification = {"images": [b64(png((6300, 6300), "L"))] * 16}
    before = peak_rss(pid)
    response = httpx.post(f"{endpoint.url}/invocations", json=amplification, timeout=60)
    grown = peak_rss(pid) - before
    print(f"amplification request: {response.status_code}, peak RSS +{grown / 2**20:.0f} MB")
    assert response.status_code == 413 and response.json()["error"] == "too_many_pixels_in_request"
    assert grown < 64 * 2**20
    within = {"images": [b64(png((2236, 2236)))] * 2}  # 10.0 MP, the budget
    before = peak_rss(pid)
    response = httpx.post(f"{endpoint.url}/invocations", json=within, timeout=60)
    grown = peak_rss(pid) - before
    print(f"request of {MAX_PIXELS} pixels: {response.status_code}, peak RSS +{grown / 2**20:.0f} MB")
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2
    assert grown < BYTES_PER_PIXEL * MAX_PIXELS


def test_pixel_budget_refuses_what_does_not_fit_now() -> None:
    budget = PixelBudget(100)
    with budget.reserve(60):
        with pytest.raises(InferenceError) as info, budget.reserve(41):
            pass
        assert info.value.status == 503 and info.value.body["error"] == "busy"
        with budget.reserve(40):
            assert budget.used == 100
    assert budget.used == 0


def test_client_disconnecting_mid_body_is_logged_at_debug_level(endpoint: Endpoint) -> None:
    host, port = endpoint.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n" + b"\xff" * 100)
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while "disconnected before sending its whole body" not in endpoint.log.read_text():
        assert time.monotonic() < deadline, endpoint.log.read_text()[-3000:]
        time.sleep(0.1)
    text = endpoint.log.read_text()
    assert "Unexpected error" not in text and "Traceback" not in text
    assert httpx.get(f"{endpoint.url}/ping").status_code == 200


class Evil:
    """A pickle that would call a function on load (a harmless one); ``weights_only=True`` refuses it."""

    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_malicious_model_pt_gives_one_line_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    torch.save({"fc.weight": Evil()}, model_dir / "model.pt")
    with pytest.raises(ValueError, match="weights_only=True") as info:
        model_fn(str(model_dir))
    assert "\n" not in str(info.value)
    result = subprocess.run(
        [sys.executable, "-m", "dogbreed.serve", str(model_dir), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot load {model_dir}") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
