"""The request codec: what a request may hold, how it is checked and decoded, and how an answer is written.

One home for the wire format, shared by the SageMaker handlers (:mod:`dogbreed.serve.handlers`), the local
server and batch prediction, so all three refuse and answer alike. It imports no model code.

Requests: ``image/jpeg``, ``image/png``, ``application/x-image``, ``application/octet-stream`` (raw image
bytes; any other ``image/*`` too), ``application/json`` (``{"image": "<base64>"}``; ``{"images": [...]}``
or a bare list for a batch; optional ``"top_k"``) and ``application/x-npy`` (uint8 pixels ``(H, W)``,
``(H, W, C)`` or ``(N, H, W, C)``, or float32 already preprocessed ``(3, S, S)`` / ``(N, 3, S, S)``).
Answers: ``application/json`` ``{"predictions": [{"label", "index", "probability"}, ...]}`` with the
top-k classes, or one such list per image for a batch; ``;top_k=N`` on the Accept header sets k.
Every refused request raises :class:`InferenceError`: a 4xx status with a JSON body saying what was
wrong and what is accepted. It subclasses the SageMaker toolkit's ``BaseInferenceToolkitError``, so the
toolkit answers its status too.

Explanations, on request only: ``"explain": true`` in a JSON body (the local server also takes
``?explain=true`` with any body; SageMaker passes no query string) adds ``"explanation"`` to the answer, one
object per image (a list for a batch): Grad-CAM of its top-1 class on the last convolutional block
(:mod:`dogbreed.serve.explain`), ``{"label", "index", "method": "grad-cam", "layer", "heatmap_png",
"input_jpeg"}``. ``heatmap_png`` is a base64 8-bit greyscale PNG of ``S x S`` pixels (value / 255 is the weight
in [0, 1]) and ``input_jpeg`` a base64 JPEG of the ``S x S`` crop the model saw, so the two overlay pixel for
pixel. It needs gradients, so only the eager runtime explains: an export, TorchScript or ONNX model answers 400
``explain_needs_eager``. Requests without it get exactly the answer above.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dogbreed.transforms import open_image, to_rgb

__all__ = [
    "ACCEPTED_INPUT",
    "ACCEPTS",
    "BYTES_PER_PIXEL",
    "CONTENT_TYPES",
    "IMAGE_CONTENT_TYPES",
    "JSON_CONTENT_TYPE",
    "NPY_CONTENT_TYPE",
    "CheckedRequest",
    "InferenceError",
    "Inputs",
    "Limits",
    "Prediction",
    "accept_top_k",
    "check_request",
    "decode_image",
    "decode_request",
    "format_predictions",
    "media_type",
]

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")
JSON_CONTENT_TYPE = "application/json"
NPY_CONTENT_TYPE = "application/x-npy"
CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE, NPY_CONTENT_TYPE)
ACCEPTS = (JSON_CONTENT_TYPE,)

# Peak memory of decoding one image and running the eval transform on it, per pixel: 11 bytes for RGB,
# 13 for greyscale and palette, 15 for CMYK, 17 for RGBA (measured with Pillow 13 and torchvision 0.29).
BYTES_PER_PIXEL = 17

ACCEPTED_INPUT = (
    f"send raw image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF) as {', '.join(IMAGE_CONTENT_TYPES)}; "
    f'{JSON_CONTENT_TYPE} as {{"image": "<base64>"}}, {{"images": ["<base64>", ...]}} or ["<base64>", ...]; '
    f"or {NPY_CONTENT_TYPE} holding uint8 pixels (H, W[, C]) / (N, H, W, C) or float32 preprocessed (N, 3, S, S)"
)

try:  # On SageMaker the toolkit turns this base class into the response's status code.
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:

    class _ToolkitError(Exception):  # type: ignore[no-redef]
        """Stand-in with the toolkit's constructor when ``sagemaker_inference`` is not installed."""

        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


class InferenceError(_ToolkitError):
    """A refused request: an HTTP status and a JSON body ``{"error", "message", "accepted"}``."""

    def __init__(self, status: int, error: str, message: str, accepted: Sequence[str] | str = CONTENT_TYPES) -> None:
        self.body = {
            "error": error,
            "message": message,
            "accepted": accepted if isinstance(accepted, str) else [*accepted],
        }
        super().__init__(status, json.dumps(self.body), HTTPStatus(status).phrase)

    @property
    def status(self) -> int:
        return self.status_code


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


@dataclass(frozen=True)
class Limits:
    """Per-request limits against oversized payloads and decompression bombs.

    ``max_request_pixels`` bounds the pixels of all the images of one request, read from their headers
    before decoding: decoding and preprocessing take up to :data:`BYTES_PER_PIXEL` bytes per pixel, so a
    request of small, highly compressed images cannot take gigabytes.
    """

    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_images: int = 64
    max_request_pixels: int = 100_000_000

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults overridden by ``DOGBREED_MAX_IMAGE_BYTES``, ``DOGBREED_MAX_PIXELS``, ``DOGBREED_MAX_IMAGES``
        and ``DOGBREED_MAX_REQUEST_PIXELS``."""
        return cls(
            max_image_bytes=_env_int("DOGBREED_MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_pixels=_env_int("DOGBREED_MAX_PIXELS", cls.max_pixels),
            max_images=_env_int("DOGBREED_MAX_IMAGES", cls.max_images),
            max_request_pixels=_env_int("DOGBREED_MAX_REQUEST_PIXELS", cls.max_request_pixels),
        )


@dataclass
class Inputs:
    """Decoded request: PIL images or already preprocessed ``(3, S, S)`` tensors."""

    items: list[Image.Image | torch.Tensor]
    batched: bool
    top_k: int | None = None
    explain: bool = False


@dataclass
class Prediction:
    """Class probabilities ``(N, num_classes)`` and how to report them.

    ``default_top_k`` (the model's, from its package) applies when neither the request nor the Accept header
    sets k.
    """

    probabilities: torch.Tensor
    class_names: list[str]
    batched: bool
    top_k: int | None
    default_top_k: int
    explanations: list[dict[str, Any]] | None = None


@dataclass
class CheckedRequest:
    """A request checked against every limit from its image headers alone; its pixels are not decoded yet.

    ``pixels`` (height x width summed over the images) is known before decoding, so a server can reserve
    memory for it first; :meth:`decode` then decodes one image at a time.
    """

    sources: list[Callable[[], Image.Image | torch.Tensor]]
    pixels: int
    batched: bool
    top_k: int | None = None
    explain: bool = False

    def decode(self) -> Iterator[Image.Image | torch.Tensor]:
        """Decode the images in order; each is decoded only when the caller asks for it."""
        for source in self.sources:
            yield source()


def media_type(header: str | None) -> str:
    """``"Image/JPEG; q=1"`` -> ``"image/jpeg"``."""
    return (header or "").split(";")[0].strip().lower()


def check_request(body: bytes | bytearray | str | None, content_type: str | None, limits: Limits) -> CheckedRequest:
    """Parse a request and check it against ``limits`` without decoding a pixel (see :func:`decode_request`)."""
    data = body.encode() if isinstance(body, str) else bytes(body or b"")
    kind = media_type(content_type) or "application/octet-stream"
    if not data:
        raise InferenceError(400, "empty_body", f"the request body is empty; {ACCEPTED_INPUT}.")
    if kind == JSON_CONTENT_TYPE:
        request = _from_json(data, limits)
    elif kind == NPY_CONTENT_TYPE:
        request = _from_npy(data, limits)
    elif kind in IMAGE_CONTENT_TYPES or kind.startswith("image/"):
        request = CheckedRequest(*_open_image(data, limits), batched=False)
    else:
        raise InferenceError(
            415, "unsupported_content_type", f"content type {content_type!r} is not supported; {ACCEPTED_INPUT}."
        )
    if request.pixels > limits.max_request_pixels:
        raise InferenceError(
            413,
            "too_many_pixels_in_request",
            f"the request's images hold {request.pixels} pixels in all, more than the limit of "
            f"{limits.max_request_pixels} per request (it bounds the memory decoding takes): send fewer or "
            "smaller images per request.",
            accepted=f"<= {limits.max_request_pixels} pixels per request",
        )
    return request


def decode_request(body: bytes | bytearray | str | None, content_type: str | None, limits: Limits) -> Inputs:
    """Decode a request body into images; raise :class:`InferenceError` for anything else.

    A missing content type is read as raw image bytes; a missing body (``None``) as an empty one.
    """
    request = check_request(body, content_type, limits)
    return Inputs(list(request.decode()), batched=request.batched, top_k=request.top_k, explain=request.explain)


def decode_image(data: bytes, limits: Limits, what: str = "the body") -> Image.Image:
    """Decode image bytes to upright RGB within the limits (greyscale, CMYK, alpha, EXIF rotation handled)."""
    [source], _ = _open_image(data, limits, what)
    return source()


def _open_image(data: bytes, limits: Limits, what: str = "the body") -> tuple[list[Callable[[], Image.Image]], int]:
    """Read an image's header within the limits; return its decoder and its pixel count."""
    if len(data) > limits.max_image_bytes:
        raise InferenceError(
            413,
            "image_too_large",
            f"{what} is {len(data)} bytes, more than the limit of {limits.max_image_bytes} "
            "bytes per image; send a smaller (e.g. resized to 1024 px) JPEG.",
            accepted=f"<= {limits.max_image_bytes} bytes",
        )
    try:
        image = open_image(data, max_pixels=limits.max_pixels)
    except Image.DecompressionBombError as err:
        raise InferenceError(
            413,
            "too_many_pixels",
            f"{what}: {err} Resize it before sending.",
            accepted=f"<= {limits.max_pixels} pixels",
        ) from None
    except UnidentifiedImageError:
        raise InferenceError(
            400,
            "not_an_image",
            f"{what} is not an image Pillow can read (it starts with {data[:16]!r}); {ACCEPTED_INPUT}.",
        ) from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on bad headers
        raise _corrupt(what, err) from None
    if image.width < 1 or image.height < 1:
        raise InferenceError(400, "empty_image", f"{what} is {image.width}x{image.height} pixels; {ACCEPTED_INPUT}.")

    def decode() -> Image.Image:
        try:
            with image:
                image.load()
                return to_rgb(image)
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad data
            raise _corrupt(what, err) from None

    return [decode], image.width * image.height


def _corrupt(what: str, err: Exception) -> InferenceError:
    return InferenceError(
        400,
        "corrupt_image",
        f"{what} could not be decoded ({type(err).__name__}: {err}): the image is truncated or "
        "corrupt; send the complete file.",
    )


def _from_json(body: bytes, limits: Limits) -> CheckedRequest:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, int over 4300 digits; nesting
        raise InferenceError(
            400, "bad_json", f"the body is not valid JSON ({type(err).__name__}: {err}); {ACCEPTED_INPUT}."
        ) from None
    top_k, explain = None, False
    if isinstance(payload, dict):
        explain = payload.get("explain", False)
        if not isinstance(explain, bool):
            raise InferenceError(
                400, "bad_explain", f'"explain" must be true or false, got {str(explain)[:50]!r}.', ["explain: bool"]
            )
        top_k = payload.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise InferenceError(
                400, "bad_top_k", f'"top_k" must be a positive integer, got {str(top_k)[:50]!r}.', ["top_k >= 1"]
            )
        if isinstance(payload.get("image"), str):
            encoded, batched = [payload["image"]], False
        elif isinstance(payload.get("images"), list):
            encoded, batched = payload["images"], True
        elif isinstance(payload.get("image"), list):
            encoded, batched = payload["image"], True
        else:
            raise InferenceError(
                400,
                "bad_json_shape",
                f'the JSON object has no "image" string or "images" list (keys: '
                f"{[key[:50] for key in sorted(payload)[:10]]}); {ACCEPTED_INPUT}.",
            )
    elif isinstance(payload, list):
        encoded, batched = payload, True
    else:
        raise InferenceError(400, "bad_json_shape", f"the JSON body is a {type(payload).__name__}; {ACCEPTED_INPUT}.")
    if not encoded:
        raise InferenceError(400, "empty_batch", f"the JSON list of images is empty; {ACCEPTED_INPUT}.")
    _check_count(len(encoded), limits)
    sources, pixels = [], 0
    for i, item in enumerate(encoded):
        what = f"image {i}" if batched else "the image"
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            item = item["image"]
        if not isinstance(item, str):
            raise InferenceError(400, "bad_json_shape", f"{what} is a {type(item).__name__}, not a base64 string.")
        [source], count = _open_image(_b64decode(item, what, limits), limits, what)
        sources.append(source)
        pixels += count
    return CheckedRequest(sources, pixels, batched=batched, top_k=top_k, explain=explain)


def _b64decode(text: str, what: str, limits: Limits) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL: data:image/jpeg;base64,....
        text = text.split(",", 1)[1]
    if len(text) * 3 // 4 > limits.max_image_bytes + 3:
        raise InferenceError(
            413,
            "image_too_large",
            f"{what} is about {len(text) * 3 // 4} bytes, more than the limit of "
            f"{limits.max_image_bytes} bytes per image.",
            accepted=f"<= {limits.max_image_bytes} bytes",
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InferenceError(
            400,
            "bad_base64",
            f"{what} is not valid base64 ({err}); encode the image file's bytes with standard "
            "base64 (RFC 4648, with padding), e.g. base64.b64encode(open(path, 'rb').read()).decode().",
        ) from None
    if not data:
        raise InferenceError(400, "empty_body", f"{what} is empty after base64 decoding.")
    return data


def _from_npy(body: bytes, limits: Limits) -> CheckedRequest:
    """uint8 pixels or float32 preprocessed tensors, every dimension checked from the header before loading."""
    shape, dtype, offset = _npy_header(body)
    if math.prod(shape) * dtype.itemsize > len(body) - offset:  # Python ints: a product of any size is exact
        raise InferenceError(
            400, "bad_npy", f"the .npy header declares shape {shape} {dtype}, more data than was sent."
        )
    if dtype == np.uint8 and len(shape) in (2, 3, 4):
        batched = len(shape) == 4
        channels = shape[-1] if len(shape) > 2 else 1
        if len(shape) > 2 and channels not in (1, 3, 4):
            raise InferenceError(
                400, "bad_npy", f"uint8 array of shape {shape}: channels last, 1 (grey), 3 (RGB) or 4 (RGBA) of them."
            )
        height, width = shape[1:3] if batched else shape[:2]
    elif dtype.kind == "f" and len(shape) in (3, 4) and shape[-3] == 3:
        batched = len(shape) == 4
        height, width = shape[-2:]
    else:
        raise InferenceError(400, "bad_npy", f"array of dtype {dtype} and shape {shape}; {ACCEPTED_INPUT}.")
    count = shape[0] if batched else 1
    _check_count(count, limits)
    if height < 1 or width < 1:
        raise InferenceError(400, "empty_image", f"array of shape {shape} holds images of {height}x{width} pixels.")
    if height * width > limits.max_pixels:
        raise InferenceError(
            413,
            "too_many_pixels",
            f"the array's images are {width}x{height} pixels, more than the limit of {limits.max_pixels}.",
            accepted=f"<= {limits.max_pixels} pixels",
        )
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError ... on inconsistent data
        raise InferenceError(
            400, "bad_npy", f"the .npy array could not be read ({type(err).__name__}: {err})."
        ) from None
    frames = list(array) if batched else [array]
    if dtype == np.uint8:
        sources = [functools.partial(_pixels_to_image, frame) for frame in frames]
    else:
        tensors = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not torch.isfinite(tensors).all():
            raise InferenceError(
                400, "non_finite_input", "the float array holds NaN or infinite values (after conversion to float32)."
            )
        sources = [(lambda tensor=tensor: tensor) for tensor in (tensors if batched else [tensors])]
    return CheckedRequest(sources, count * height * width, batched=batched)


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from the .npy header, so that a header promising terabytes costs nothing."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except Exception as err:  # ValueError, EOFError, SyntaxError, RecursionError ... from an untrusted header
        raise InferenceError(
            400,
            "bad_npy",
            f"the body is not a .npy array ({type(err).__name__}: {err}); write it with numpy.save(), not pickle "
            "or .npz.",
        ) from None
    if dtype.hasobject:
        raise InferenceError(400, "bad_npy", "object arrays are refused (they would need unpickling).")
    if any(dim < 0 for dim in shape):
        raise InferenceError(400, "bad_npy", f"the .npy header declares a negative dimension: {shape}.")
    return shape, dtype, stream.tell()


def _check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise InferenceError(400, "empty_batch", "the request holds no images.")
    if n > limits.max_images:
        raise InferenceError(
            413,
            "too_many_images",
            f"{n} images in one request; the limit is {limits.max_images}: split it.",
            accepted=f"<= {limits.max_images} images per request",
        )


def _pixels_to_image(frame: np.ndarray) -> Image.Image:
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(frame)))


def accept_top_k(accept: str | None) -> int | None:
    """Check that ``accept`` allows JSON; return its ``top_k`` parameter, if any.

    Raises:
        InferenceError: 406 when no acceptable type is listed, 400 for a bad ``top_k``.
    """
    if not accept or not accept.strip():
        return None
    for option in accept.split(","):
        kind, *params = (part.strip() for part in option.split(";"))
        if kind.lower() not in ("*/*", "application/*", JSON_CONTENT_TYPE):
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "top_k":
                # ASCII digits only: str.isdigit() accepts "²", which int() refuses
                if not re.fullmatch(r"[0-9]{1,9}", value.strip()) or int(value) < 1:
                    raise InferenceError(
                        400, "bad_top_k", f"top_k={value[:50]!r} in Accept must be a positive integer.", ["top_k >= 1"]
                    )
                return int(value)
        return None
    raise InferenceError(
        406,
        "unsupported_accept",
        f"accept {accept!r} is not supported; ask for {JSON_CONTENT_TYPE} (optionally {JSON_CONTENT_TYPE};top_k=N).",
        accepted=ACCEPTS,
    )


def format_predictions(prediction: Prediction, top_k: int | None = None) -> dict[str, Any]:
    """``{"predictions": [...top-k...]}``, or one top-k list per image for a batched request."""
    if not torch.isfinite(prediction.probabilities).all():
        raise InferenceError(
            400,
            "non_finite_output",
            "the model's output for this input is not finite: preprocessed float inputs must be normalised "
            "pixels (about -3 to 3); send uint8 pixels or an image to let the endpoint preprocess them.",
        )
    k = prediction.top_k or top_k or prediction.default_top_k
    k = min(k, prediction.probabilities.shape[1])
    values, indices = prediction.probabilities.topk(k, dim=1)
    rows = [
        [
            {"label": prediction.class_names[i], "index": i, "probability": round(p, 6)}
            for p, i in zip(vals.tolist(), idxs.tolist(), strict=True)
        ]
        for vals, idxs in zip(values, indices, strict=True)
    ]
    answer: dict[str, Any] = {"predictions": rows if prediction.batched else rows[0]}
    if prediction.explanations is not None:
        answer["explanation"] = prediction.explanations if prediction.batched else prediction.explanations[0]
    return answer
