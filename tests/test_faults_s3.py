"""A flaky S3 (issue 24, item 4): staging from moto through a fault-injecting proxy on 127.0.0.1.

The proxy sits between boto3 and moto and answers GetObject requests with the faults a real S3 and the
networks on the way produce: a connection reset part-way through a body, HTTP 500 and 503, throttling
(503 SlowDown), a body that stalls. Every test checks the staged bytes against the uploaded ones and the
manifest's sha256, and what the client asked for (the ``Range`` it resumed from, the ``If-Match`` it bound it to).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import pytest

from dogbreed.data import DataError, staging
from dogbreed.data.staging import S3Retry

SIZE = 300_000  # bytes per object: several chunks on the wire, small enough to keep the tests fast
BUCKET = "flaky"
URI = f"s3://{BUCKET}/dogs"
CHUNK = 65_536  # staging reads bodies in 64 KiB chunks: a reset on a chunk boundary keeps all that came
FAST = S3Retry(give_up_s=30, read_timeout_s=1, max_attempts=2)


@dataclass
class Fault:
    """What the proxy does to one GetObject.

    ``reset`` after ``after`` body bytes, answer ``status`` with an S3 error ``code``, or ``stall`` after
    ``after`` bytes; ``then`` runs once the fault is done (e.g. changes the object in S3).
    """

    kind: str
    after: int = 0
    status: int = 0
    code: str = ""
    then: Callable[[], None] | None = None


@dataclass
class Seen:
    key: str
    range: str | None
    if_match: str | None
    status: int
    fault: str
    at: float


@dataclass
class FaultyS3:
    """A threaded reverse proxy in front of moto; GetObject requests meet the planned faults, in order."""

    upstream: str
    plan: deque[Fault] = field(default_factory=deque)
    always: Fault | None = None  # after the plan: every GetObject meets this fault
    seen: list[Seen] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def next_fault(self) -> Fault | None:
        return self.plan.popleft() if self.plan else self.always

    def gets(self, key: str) -> list[Seen]:
        return [s for s in self.seen if s.key.endswith(key)]


def make_handler(proxy: FaultyS3) -> type[BaseHTTPRequestHandler]:
    upstream = urlparse(proxy.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, *args: Any) -> None:
            pass

        def finish(self) -> None:
            with contextlib.suppress(OSError):  # the socket this handler reset on purpose
                super().finish()

        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urlparse(self.path)
            is_get_object = self.command == "GET" and "/" in path.path.strip("/") and "list-type" not in path.query
            fault = proxy.next_fault() if is_get_object else None
            if fault and fault.kind == "status":
                xml = f"<Error><Code>{fault.code}</Code><Message>injected</Message></Error>".encode()
                self.record(fault.status, fault.kind)
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)
                self.done(fault)
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = upstream.netloc
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            conn.close()
            if is_get_object:
                self.record(response.status, fault.kind if fault else "pass")
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                    self.send_header(key, value)
            self.send_header("Content-Length", response.getheader("Content-Length") or str(len(payload)))
            self.end_headers()
            if not fault or self.command == "HEAD":
                self.wfile.write(payload)
                return
            self.wfile.write(payload[: fault.after])
            self.wfile.flush()
            proxy.stop.wait(30 if fault.kind == "stall" else 0.2)  # a reset after the client read what came
            # RST rather than FIN: the client sees "connection reset by peer", as from a load balancer
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            self.done(fault)

        def record(self, status: int, fault: str) -> None:
            headers = self.headers
            proxy.seen.append(Seen(self.path, headers["Range"], headers["If-Match"], status, fault, time.monotonic()))

        def done(self, fault: Fault) -> None:
            if fault.then:
                fault.then()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    return Handler


@pytest.fixture
def s3(aws_env: str) -> Iterator[FaultyS3]:
    """Three objects in moto under ``URI`` and a proxy in front of moto; yields the proxy."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for name in ("a", "b", "c"):
        client.put_object(Bucket=BUCKET, Key=f"dogs/train/{name}.bin", Body=data(name))
    proxy = FaultyS3(aws_env)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(proxy))
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # resets on purpose are not errors
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.stop.set()
    server.shutdown()
    server.server_close()


def data(name: str, version: int = 0) -> bytes:
    """``SIZE`` bytes that differ per object and per version, so that a mixed file cannot pass."""
    seed = hashlib.sha256(f"{name}-{version}".encode()).digest()
    return (seed * (SIZE // len(seed) + 1))[:SIZE]


def etag_of(body: bytes) -> str:
    return f'"{hashlib.md5(body, usedforsecurity=False).hexdigest()}"'


def stage_through(proxy: FaultyS3, cache: Path, retry: S3Retry = FAST) -> Path:
    """Stage ``URI`` through the proxy; return the staged ``files`` folder (the one holding ``train/``)."""
    root = staging.stage(URI, cache, endpoint_url=proxy.url, s3_retry=retry)
    assert root == staging.state_dir(URI, cache) / "files" / "train"
    return root.parent


def staging_error(proxy: FaultyS3, cache: Path, retry: S3Retry, within_s: float) -> DataError:
    """The error staging through ``proxy`` stops with, within ``within_s``: a stager with no bound fails, not hangs."""
    outcome: list[BaseException | Path] = []

    def run() -> None:
        try:
            outcome.append(stage_through(proxy, cache, retry))
        except BaseException as err:
            outcome.append(err)

    attempt = threading.Thread(target=run, daemon=True)
    attempt.start()
    attempt.join(timeout=within_s)
    assert outcome, f"staging still retrying after {within_s:.0f} s: no bound"
    assert isinstance(outcome[0], DataError), outcome
    return outcome[0]


def assert_staged_whole(root: Path, versions: dict[str, int] | None = None) -> None:
    """Every object staged byte for byte, every sha256 in the manifest that of the staged file, no part left."""
    versions = versions or {}
    for name in ("a", "b", "c"):
        assert (root / "train" / f"{name}.bin").read_bytes() == data(name, versions.get(name, 0)), name
    manifest = json.loads((root.parent / staging.MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["train/a.bin", "train/b.bin", "train/c.bin"]
    for rel, entry in manifest.items():
        body = (root / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256(body).hexdigest() and entry["size"] == len(body), rel
        assert f'"{entry["etag"]}"' == etag_of(body), rel
    assert not list(root.rglob("*.part")), list(root.rglob("*.part"))


def test_resets_and_server_errors_mid_object_resume_from_the_bytes_already_written(s3, tmp_path):
    s3.plan.extend(
        [
            Fault("reset", after=2 * CHUNK),
            Fault("status", status=500, code="InternalError"),
            Fault("status", status=503, code="ServiceUnavailable"),
            Fault("reset", after=CHUNK),
        ]
    )
    root = stage_through(s3, tmp_path)
    assert_staged_whole(root)
    first = s3.gets("a.bin")
    etag = etag_of(data("a"))
    assert [(s.range, s.status, s.fault) for s in first] == [
        (None, 200, "reset"),
        ("bytes=131072-", 500, "status"),  # botocore's own retry (max_attempts=2) ...
        ("bytes=131072-", 503, "status"),  # ... then staging's, after a back-off
        ("bytes=131072-", 206, "reset"),
        ("bytes=196608-", 206, "pass"),
    ]
    assert {s.if_match for s in first} == {etag}  # every range bound to the ETag of the first byte


@pytest.mark.parametrize("mode", ["standard", "adaptive"])
def test_throttling_is_retried_with_growing_back_off(s3, tmp_path, mode):
    """``adaptive`` adds botocore's client-side rate limiter to the same retries: it slows, and still stages."""
    s3.plan.extend([Fault("status", status=503, code="SlowDown") for _ in range(4)])
    root = stage_through(s3, tmp_path, S3Retry(give_up_s=30, read_timeout_s=1, max_attempts=2, mode=mode))
    assert_staged_whole(root)
    at = [s.at for s in s3.gets("a.bin")]
    assert len(at) == 5
    # botocore retries each throttled request once (attempts 1-2, 3-4); staging pauses between its own tries:
    # 0.25-0.5 s after the first failure, 0.5-1 s after the second (half of each pause is jitter)
    assert at[2] - at[1] >= 0.25 and at[4] - at[3] >= 0.5, [b - a for a, b in itertools.pairwise(at)]


def test_a_stalled_read_times_out_and_resumes(s3, tmp_path):
    s3.plan.append(Fault("stall", after=CHUNK))
    start = time.monotonic()
    root = stage_through(s3, tmp_path)
    assert time.monotonic() - start < 10  # a read timeout of 1 s, not the stall's 30 s
    assert_staged_whole(root)
    assert [(s.range, s.fault) for s in s3.gets("a.bin")] == [(None, "stall"), ("bytes=65536-", "pass")]


@pytest.mark.slow
def test_faults_that_do_not_stop_give_up_in_one_line_and_the_next_run_resumes(s3, tmp_path):
    s3.plan.append(Fault("reset", after=2 * CHUNK))
    s3.always = Fault("reset", after=0)  # from then on, nothing gets through
    start = time.monotonic()
    error = staging_error(s3, tmp_path, S3Retry(give_up_s=3, read_timeout_s=1, max_attempts=2), within_s=15)
    took = time.monotonic() - start
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{URI}/train/a.bin: gave up after "), message
    assert "without a byte of progress (last: " in message and "131072 of 300000 bytes are kept" in message
    assert "data.s3_retry.give_up_s" in message
    assert 1.5 <= took < 8, took  # the bound (less a pause it would not wait out), plus one attempt at most
    target = staging.state_dir(URI, tmp_path)
    assert not (target / staging.MANIFEST).exists() and not (target / "files/train/a.bin").exists()

    s3.always = None  # the network recovers: the next run starts from the bytes it kept
    s3.seen.clear()
    assert_staged_whole(stage_through(s3, tmp_path))
    assert [s.range for s in s3.gets("a.bin")] == ["bytes=131072-"]


def test_an_object_changed_in_s3_since_it_was_staged_is_staged_again(s3, tmp_path):
    assert_staged_whole(stage_through(s3, tmp_path))
    boto3.client("s3").put_object(Bucket=BUCKET, Key="dogs/train/b.bin", Body=data("b", version=1))  # same size
    s3.seen.clear()
    assert_staged_whole(stage_through(s3, tmp_path), {"b": 1})
    assert [s.key.rsplit("/", 1)[-1] for s in s3.seen] == ["b.bin"]  # the others are still what S3 holds


def test_an_object_changed_in_the_middle_of_its_download_is_staged_again_never_mixed(s3, tmp_path):
    def replace_a() -> None:
        boto3.client("s3").put_object(Bucket=BUCKET, Key="dogs/train/a.bin", Body=data("a", version=1))

    s3.plan.append(Fault("reset", after=2 * CHUNK, then=replace_a))
    root = stage_through(s3, tmp_path)
    assert_staged_whole(root, {"a": 1})
    old, new = etag_of(data("a")), etag_of(data("a", version=1))
    assert [(s.range, s.if_match, s.status) for s in s3.gets("a.bin")] == [
        (None, old, 200),
        ("bytes=131072-", old, 412),  # the resumed range is refused: those bytes belong to another version
        (None, new, 200),  # staged again from its first byte, bound to the new ETag
    ]


def test_an_object_that_keeps_changing_stops_staging_in_one_line(s3, tmp_path):
    version = itertools.count(1)

    def replace_a() -> None:
        boto3.client("s3").put_object(Bucket=BUCKET, Key="dogs/train/a.bin", Body=data("a", version=next(version)))

    s3.always = Fault("reset", after=2 * CHUNK, then=replace_a)  # rewritten during every download of it
    message = str(staging_error(s3, tmp_path, FAST, within_s=20))
    assert "\n" not in message and message.startswith(f"{URI}/train/a.bin: changed 5 times in S3 while staging it")
    assert "stage the dataset once its upload has finished" in message
    target = staging.state_dir(URI, tmp_path)
    assert not (target / staging.MANIFEST).exists() and not list(target.rglob("*.part"))
    assert len([s for s in s3.gets("a.bin") if s.status == 412]) <= 5


def test_the_free_space_check_counts_the_bytes_a_run_kept_as_already_there(s3, tmp_path, monkeypatch):
    """A run that gave up kept 131,072 bytes of ``a.bin``; the disk has room for the rest, not for all of it."""
    kept = 2 * CHUNK
    files = staging.state_dir(URI, tmp_path) / "files" / "train"
    files.mkdir(parents=True)
    (files / f".a.bin.{etag_of(data('a')).strip(chr(34))}.part").write_bytes(data("a")[:kept])
    free = 3 * SIZE - kept + 10_000  # the manifest's few bytes too
    real = staging.shutil.disk_usage
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    assert_staged_whole(stage_through(s3, tmp_path))
    assert [s.range for s in s3.gets("a.bin")] == [f"bytes={kept}-"]
