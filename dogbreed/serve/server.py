"""Local HTTP endpoint speaking the SageMaker container contract, with dynamic batching.

Routes: ``GET /ping`` (200 once the model is loaded), ``POST /invocations`` and
``POST /endpoints/{name}/invocations`` (the path boto3's ``sagemaker-runtime`` client calls when given
``endpoint_url``), and for people ``GET /``: a page that asks ``/invocations?explain=true`` about a photo
and shows the top 5 and the Grad-CAM heat map below what it serves (``GET /model``: the classes, the runtime
and the run the model came from). The page's files, ``static/``, ship in the package; it loads nothing from
elsewhere, and its Content-Security-Policy allows only this server.

Each request is decoded and preprocessed by the same code SageMaker runs (:mod:`dogbreed.serve.codec`,
:mod:`dogbreed.serve.runtime`), in a thread pool; a single inference thread runs one forward pass over
everything queued meanwhile, up to ``max_batch_size`` images, waiting at most ``max_delay_ms`` and only while
more requests are still being decoded. The event loop never
runs model code, so ``/ping`` answers under load. Grad-CAM (``explain``) runs on the same inference thread,
between batches.

Admission is the app's, not uvicorn's (whose ``limit_concurrency`` answers 503 to ``/ping`` too): a body must
arrive within ``body_timeout_s`` (408 and the connection closed), at most ``max_receiving`` requests may
still be sending their body and ``max_requests`` be in progress, and the images being decoded may hold at
most ``max_inflight_pixels`` pixels (503 with ``Retry-After`` beyond these). ``/ping`` is never refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

import torch
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dogbreed._io import available_cpus
from dogbreed.serve.codec import (
    BYTES_PER_PIXEL,
    CheckedRequest,
    InferenceError,
    Limits,
    Prediction,
    accept_top_k,
    check_request,
)
from dogbreed.serve.handlers import output_fn
from dogbreed.serve.runtime import DogBreedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page uses nothing but its own files and /invocations: no inline script or style, no other origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class ServerConfig:
    """Batching, size and thread settings of the endpoint (``python -m dogbreed.serve --help``)."""

    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    max_body_bytes: int = 32 * 2**20
    max_queued_images: int = 512
    num_threads: int | None = None
    limits: Limits = field(default_factory=Limits.from_env)
    max_requests: int = 128
    max_receiving: int = 32
    body_timeout_s: float = 30.0
    max_inflight_pixels: int = 200_000_000

    def __post_init__(self) -> None:
        if self.limits.max_request_pixels > self.max_inflight_pixels:
            raise ValueError(
                f"max_request_pixels={self.limits.max_request_pixels} is more than max_inflight_pixels="
                f"{self.max_inflight_pixels}: a request within its own limit could never be decoded."
            )
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1 (1 turns batching off).")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms={self.max_delay_ms} must be >= 0.")


@dataclass
class _Item:
    pixels: torch.Tensor
    future: asyncio.Future[torch.Tensor]


class Batcher:
    """Groups concurrent requests into one forward pass on a dedicated inference thread."""

    def __init__(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queued: int,
    ) -> None:
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000
        self.max_queued = max_queued
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._incoming = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.batches = 0
        self.images = 0

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that is being decoded, so that the current batch may wait for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wakeup.set()

    def enqueue(self, pixels: torch.Tensor) -> asyncio.Future[torch.Tensor]:
        """Queue preprocessed images; the future resolves to their probabilities."""
        if self._queued_images + len(pixels) > self.max_queued:
            raise InferenceError(
                503, "overloaded", f"{self._queued_images} images are already waiting for the model; retry shortly.",
                accepted="fewer concurrent requests",
            )  # fmt: skip
        item = _Item(pixels, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._queued_images += len(pixels)
        self._wakeup.set()
        return item.future

    async def run(self) -> None:
        """Form and run batches until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.max_delay
            while self._queued_images < self.max_batch_size and self._incoming and loop.time() < deadline:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), deadline - loop.time())
            await self._run_batch(self._take(), loop)

    def _take(self) -> list[_Item]:
        batch = [self._queue.popleft()]
        size = len(batch[0].pixels)
        while self._queue and size + len(self._queue[0].pixels) <= self.max_batch_size:
            batch.append(self._queue.popleft())
            size += len(batch[-1].pixels)
        self._queued_images -= size
        return batch

    async def _run_batch(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        pixels = batch[0].pixels if len(batch) == 1 else torch.cat([item.pixels for item in batch])
        try:
            probabilities = await loop.run_in_executor(self._executor, self._predict, pixels)
        except Exception as err:
            log.exception("Forward pass over %d images failed", len(pixels))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        self.batches += 1
        self.images += len(pixels)
        start = 0
        for item in batch:
            end = start + len(item.pixels)
            if not item.future.done():  # a client that went away cancelled its future
                item.future.set_result(probabilities[start:end])
            start = end

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function`` on the inference thread between batches (Grad-CAM: it needs the whole CPU and the
        network's hooks to itself)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class PixelBudget:
    """Pixels of the images being decoded by all requests, reserved from their headers before decoding.

    Decoding takes up to ``BYTES_PER_PIXEL`` bytes per pixel, so this bounds the server's decoding memory
    whatever the concurrency; a request that does not fit now gets 503 and may retry.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()  # decode threads reserve and release

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.used + pixels > self.limit:
                raise InferenceError(
                    503,
                    "busy",
                    f"the server is decoding {self.used} pixels; this request's {pixels} would pass its limit of "
                    f"{self.limit} (about {self.limit * BYTES_PER_PIXEL / 2**30:.1f} GiB): retry shortly.",
                    accepted="a retry after the Retry-After header's seconds",
                )
            self.used += pixels
        try:
            yield
        finally:
            with self._lock:
                self.used -= pixels


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise InferenceError(
            413, "body_too_large", f"the body is {declared} bytes, more than the limit of {limit}.",
            accepted=f"<= {limit} bytes per request",
        )  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InferenceError(
                413, "body_too_large", f"the body passed the limit of {limit} bytes.",
                accepted=f"<= {limit} bytes per request",
            )  # fmt: skip
        chunks.append(chunk)
    return b"".join(chunks)


def explain_requested(query: QueryParams) -> bool:
    """The ``explain`` query parameter: ``true``/``1`` or ``false``/``0`` (absent: false)."""
    value = query.get("explain", "false").strip().lower()
    if value not in ("true", "1", "false", "0"):
        raise InferenceError(
            400, "bad_explain", f"explain={value[:50]!r} must be true or false.", accepted=["explain=true|false"]
        )
    return value in ("true", "1")


def page_files() -> dict[str, tuple[bytes, str]]:
    """The web page's files by name, with their content types: read once from the installed package."""
    folder = importlib.resources.files("dogbreed.serve") / "static"
    return {
        item.name: (item.read_bytes(), PAGE_TYPES[PurePosixPath(item.name).suffix])
        for item in folder.iterdir()
        if PurePosixPath(item.name).suffix in PAGE_TYPES
    }


def error_response(err: InferenceError, *, close: bool = False) -> JSONResponse:
    """The JSON error body; ``Retry-After`` on a 503, and ``Connection: close`` for a body left unread."""
    headers = {"Retry-After": "1"} if err.status == 503 else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse(err.body, status_code=err.status, headers=headers)


def create_app(model: DogBreedModel, config: ServerConfig | None = None) -> Starlette:
    """The Starlette app serving ``model``; sets torch's thread count for this process."""
    config = config or ServerConfig()
    cpus = available_cpus()
    torch.set_num_threads(config.num_threads or cpus)
    decoders = ThreadPoolExecutor(max(2, cpus), thread_name_prefix="decode")
    batcher = Batcher(
        model.predict,
        max_batch_size=config.max_batch_size,
        max_delay_ms=config.max_delay_ms,
        max_queued=config.max_queued_images,
    )

    pixel_budget = PixelBudget(config.max_inflight_pixels)
    admitted = {"requests": 0, "receiving": 0}
    files = page_files()

    def decode(body: bytes, content_type: str | None, explain: bool) -> tuple[CheckedRequest, torch.Tensor]:
        """Check the request from its headers, reserve its pixels, then decode and preprocess image by image."""
        request = check_request(body, content_type, config.limits)
        if explain or request.explain:
            model.require_explainable()
        with pixel_budget.reserve(request.pixels):
            return request, model.preprocess(request.decode())

    async def ping(request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "runtime": model.runtime, "batches": batcher.batches, "images": batcher.images}
        )

    async def describe(request: Request) -> Response:
        """What the page says it serves: the classes, the runtime and the run the model came from."""
        return JSONResponse({"runtime": model.runtime, "classes": model.class_names, **model.about})

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in files:
            return JSONResponse({"error": "not_found", "message": f"no page file {name[:50]!r}."}, status_code=404)
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    def refuse(status: int, error: str, message: str, accepted: str) -> Response:
        return error_response(InferenceError(status, error, message, accepted=accepted), close=True)

    async def invocations(request: Request) -> Response:
        if admitted["requests"] >= config.max_requests:
            return refuse(
                503, "busy", f"{admitted['requests']} requests are in progress; retry shortly.",
                f"<= {config.max_requests} concurrent requests",
            )  # fmt: skip
        admitted["requests"] += 1
        try:
            return await answer(request)
        finally:
            admitted["requests"] -= 1

    async def receive(request: Request) -> bytes | Response:
        """The body, or the answer to a client that sends it too slowly (408) or when too many do (503)."""
        if admitted["receiving"] >= config.max_receiving:
            return refuse(
                503, "busy", f"{admitted['receiving']} requests are still sending their body; retry shortly.",
                f"<= {config.max_receiving} requests sending their body at once",
            )  # fmt: skip
        admitted["receiving"] += 1
        try:
            async with asyncio.timeout(config.body_timeout_s):
                return await read_body(request, config.max_body_bytes)
        except TimeoutError:
            return refuse(
                408, "body_timeout", f"the request body did not arrive within {config.body_timeout_s:g} s.",
                f"a body sent within {config.body_timeout_s:g} s",
            )  # fmt: skip
        finally:
            admitted["receiving"] -= 1

    async def answer(request: Request) -> Response:
        accept = request.headers.get("accept")
        try:
            accept_top_k(accept)  # refuse an unsupported Accept or explain before doing any work
            explain = explain_requested(request.query_params)
            if explain:
                model.require_explainable()
            body = await receive(request)
            if isinstance(body, Response):
                return body
            with batcher.incoming():
                loop = asyncio.get_running_loop()
                checked, pixels = await loop.run_in_executor(
                    decoders, decode, body, request.headers.get("content-type"), explain
                )
                future = batcher.enqueue(pixels)
            probabilities = await future
            explanations = None
            if explain or checked.explain:
                explanations = await batcher.call(model.explain, pixels, probabilities)
            prediction = Prediction(
                probabilities, model.class_names, checked.batched, checked.top_k, default_top_k=model.top_k,
                explanations=explanations,
            )  # fmt: skip
            content, media_type = output_fn(prediction, accept)
        except InferenceError as err:
            return error_response(err)
        except ClientDisconnect:  # nobody is left to answer
            log.debug("Client %s disconnected before sending its whole body", request.client)
            return Response(status_code=499)  # nginx's "client closed request"; never sent
        except Exception:
            log.exception("Unexpected error while answering %s", request.url.path)
            return JSONResponse(
                {"error": "internal_error", "message": "the server failed on this request; see its log."},
                status_code=500,
            )
        return Response(content, media_type=media_type)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        log.info(
            "Serving %d classes (%s runtime) with %d torch threads, batches of up to %d, max delay %g ms",
            len(model.class_names), model.runtime, torch.get_num_threads(), config.max_batch_size, config.max_delay_ms,
        )  # fmt: skip
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests by now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            batcher.close()
            decoders.shutdown(wait=True)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", page, methods=["GET"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/model", describe, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/endpoints/{name}/invocations", invocations, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
