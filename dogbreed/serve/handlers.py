"""SageMaker PyTorch inference handlers: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``, ``transform_fn``.

The model package ships this module (``code/inference.py`` re-exports ``model_fn`` and ``transform_fn``, which
runs the other three) and the local server calls the same building blocks, so an endpoint answers identically
on SageMaker and on a laptop.
It imports only torch, torchvision, Pillow, numpy and the light ``dogbreed`` modules (never Lightning),
so the stock SageMaker PyTorch container runs it without extra installs.

Requests: ``image/jpeg``, ``image/png``, ``application/x-image``, ``application/octet-stream`` (raw image
bytes; any other ``image/*`` too), ``application/json`` (``{"image": "<base64>"}``; ``{"images": [...]}``
or a bare list for a batch; optional ``"top_k"``) and ``application/x-npy`` (uint8 pixels ``(H, W)``,
``(H, W, C)`` or ``(N, H, W, C)``, or float32 already preprocessed ``(3, S, S)`` / ``(N, 3, S, S)``).
Answers: ``application/json`` ``{"predictions": [{"label", "index", "probability"}, ...]}`` with the
top-k classes, or one such list per image for a batch; ``;top_k=N`` on the Accept header sets k.
Every refused request raises :class:`InferenceError`: a 4xx status with a JSON body saying what was
wrong and what is accepted. On SageMaker, :func:`transform_fn` answers it with its status and the JSON
alone (the toolkit's own error path would append the Python traceback to the body); it also subclasses the
toolkit's ``BaseInferenceToolkitError``, so a package whose ``inference.py`` exports the four handlers still
answers its status.

Explanations, on request only: ``"explain": true`` in a JSON body (the local server also takes
``?explain=true`` with any body; SageMaker passes no query string) adds ``"explanation"`` to the answer, one
object per image (a list for a batch): Grad-CAM of its top-1 class on the last convolutional block
(:mod:`dogbreed.serve.explain`), ``{"label", "index", "method": "grad-cam", "layer", "heatmap_png",
"input_jpeg"}``. ``heatmap_png`` is a base64 8-bit greyscale PNG of ``S x S`` pixels (value / 255 is the weight
in [0, 1]) and ``input_jpeg`` a base64 JPEG of the ``S x S`` crop the model saw, so the two overlay pixel for
pixel. It needs gradients, so only the eager runtime explains: a TorchScript or ONNX model answers 400
``explain_needs_eager``. Requests without it get exactly the answer above.

The toolkit (``sagemaker_inference.transformer.Transformer``) counts each handler's parameters and passes
the request context as one more positional argument when a handler takes one more than the toolkit's own.
So each handler takes exactly the toolkit's arguments and nothing optional: ``input_fn`` reads its limits
from the environment (:meth:`Limits.from_env`), and the local server calls :func:`decode_request` with its
own limits.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dogbreed.artifacts import MODEL_WEIGHTS, read_model_dir
from dogbreed.models.backbone import flip_averaged
from dogbreed.serve.explain import grad_cam, heatmap_png, input_jpeg
from dogbreed.transforms import Preprocessing, open_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")
JSON_CONTENT_TYPE = "application/json"
NPY_CONTENT_TYPE = "application/x-npy"
CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE, NPY_CONTENT_TYPE)
ACCEPTS = (JSON_CONTENT_TYPE,)

PACKAGE_MANIFEST = "package.json"
RUNTIMES = ("eager", "torchscript", "onnx")
EXPORT_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
DEFAULT_TOP_K = 5
# Peak memory of decoding one image and running the eval transform on it, per pixel: 11 bytes for RGB,
# 13 for greyscale and palette, 15 for CMYK, 17 for RGBA (measured with Pillow 13 and torchvision 0.29).
BYTES_PER_PIXEL = 17

_ACCEPTED_INPUT = (
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
    """Class probabilities ``(N, num_classes)`` and how to report them."""

    probabilities: torch.Tensor
    class_names: list[str]
    batched: bool
    top_k: int | None
    default_top_k: int = DEFAULT_TOP_K
    explanations: list[dict[str, Any]] | None = None


class DogBreedModel:
    """What ``model_fn`` returns: a forward function (eager, TorchScript or ONNX Runtime) plus its metadata.

    ``net`` is the eager network behind ``forward`` (``None`` for TorchScript and ONNX): Grad-CAM needs it.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        class_names: list[str],
        preprocessing: Preprocessing,
        runtime: str = "eager",
        top_k: int = DEFAULT_TOP_K,
        net: torch.nn.Module | None = None,
        test_time_flip: bool = False,
    ) -> None:
        self.forward = forward
        self.test_time_flip = test_time_flip
        self.net = net
        self.explain_layer: str | None = None  # found on the first explanation, then reused
        self.class_names = class_names
        self.preprocessing = preprocessing
        self.runtime = runtime
        self.top_k = top_k
        self._transform = preprocessing.eval_transform()

    def preprocess(self, items: Iterable[Image.Image | torch.Tensor]) -> torch.Tensor:
        """Eval transform of each image (the same code as validation), stacked to ``(N, 3, S, S)``.

        Given an iterator (:meth:`CheckedRequest.decode`), only one decoded image is alive at a time.
        """
        size = self.preprocessing.image_size
        tensors = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                if tuple(item.shape) != (3, size, size):
                    raise InferenceError(
                        400,
                        "bad_tensor_shape",
                        f"preprocessed input {i} has shape {tuple(item.shape)}; this model takes (3, {size}, {size}). "
                        "Send uint8 pixels instead to let the endpoint resize and crop them.",
                    )
                tensors.append(item)
            else:
                tensors.append(self._transform(item))
            del item  # free this decoded image before the next one is decoded
        return torch.stack(tensors)

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(N, num_classes)`` for preprocessed pixels, flip-averaged as the model was tested."""
        logits = flip_averaged(self.forward, pixels) if self.test_time_flip else self.forward(pixels)
        return torch.softmax(logits.float(), dim=1)

    def require_explainable(self) -> None:
        """Refuse ``explain=true`` before any decoding when this runtime has no gradients."""
        if self.net is None:
            raise InferenceError(
                400,
                "explain_needs_eager",
                f"explain=true needs gradients, which the {self.runtime} runtime does not give: serve the model with "
                "the eager runtime (--runtime eager, or DOGBREED_RUNTIME=eager), or ask without explain.",
                accepted=["explain=false on this endpoint"],
            )

    def explain(self, pixels: torch.Tensor, probabilities: torch.Tensor) -> list[dict[str, Any]] | None:
        """Grad-CAM of each preprocessed image for its top-1 class, as the JSON objects of ``"explanation"``.

        ``None`` when the probabilities are not finite: :func:`format_predictions` refuses that answer anyway.
        """
        self.require_explainable()
        if not torch.isfinite(probabilities).all():
            return None
        try:
            classes = probabilities.argmax(dim=1).tolist()
            cam = grad_cam(self.net, pixels, classes, layer=self.explain_layer, mirrored=self.test_time_flip)
        except ValueError as err:  # not a convolutional backbone
            raise InferenceError(400, "explain_unsupported", str(err), accepted=["explain=false"]) from None
        self.explain_layer = cam.layer
        mean, std = self.preprocessing.mean, self.preprocessing.std
        return [
            {
                "label": self.class_names[index],
                "index": index,
                "method": "grad-cam",
                "layer": cam.layer,
                "heatmap_png": base64.b64encode(heatmap_png(heatmap)).decode(),
                "input_jpeg": base64.b64encode(input_jpeg(image, mean, std)).decode(),
            }
            for image, heatmap, index in zip(pixels, cam.heatmaps, cam.classes, strict=True)
        ]


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """``package.json`` of a model package, or ``{}`` for a bare ``model/`` dir of a run."""
    path = Path(model_dir) / PACKAGE_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(
    model_dir: str | Path,
    *,
    runtime: str | None = None,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
) -> DogBreedModel:
    """Load a model package or a run's ``model/`` dir with the runtime the package recorded (or ``runtime``).

    Weights are read with ``weights_only=True``; nothing is unpickled. ``device`` (batch prediction's
    ``--device``) wins over ``DOGBREED_DEVICE``, which wins over CUDA when there is one.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    runtime = runtime or os.environ.get("DOGBREED_RUNTIME") or manifest.get("runtime", "eager")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not one of {RUNTIMES}.")
    exported = manifest.get("exports", {})
    if runtime != "eager" and runtime not in exported:
        raise ValueError(
            f"{model_dir} has no {runtime} export (exports: {sorted(exported) or 'none'}); rebuild the package "
            f"with `python -m dogbreed.package RUN_DIR --export {runtime}` or use runtime eager."
        )
    try:
        md = read_model_dir(model_dir)
    except (pickle.UnpicklingError, RuntimeError) as err:  # a pickle weights_only refuses; a corrupt archive
        reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line), None)
        raise ValueError(
            f"{model_dir / MODEL_WEIGHTS} is not a state dict that loads with weights_only=True "
            f"({reason or str(err).splitlines()[0]}); rebuild the package with `python -m dogbreed.package`."
        ) from err
    # A GPU endpoint instance (ml.g4dn ...) runs eager and TorchScript on its GPU; DOGBREED_DEVICE overrides.
    device = torch.device(
        device or os.environ.get("DOGBREED_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    net = None  # only the eager runtime has a network to explain with
    if runtime == "eager":
        # oneDNN's convolutions run faster on NHWC tensors, by about 20% at batch 16 on CPU.
        net = md.network().to(device, memory_format=torch.channels_last)
        forward = _eager_forward(net, device, channels_last=True)
    elif runtime == "torchscript":
        scripted = torch.jit.load(str(model_dir / EXPORT_FILES["torchscript"]), map_location=device)
        forward = _eager_forward(scripted, device)
    else:
        forward = _onnx_forward(model_dir / EXPORT_FILES["onnx"], num_threads)
    where = device if runtime != "onnx" else "cpu"
    log.info(
        "Loaded %s (%s, %d classes, %s runtime on %s)", model_dir, md.backbone, len(md.class_names), runtime, where
    )
    return DogBreedModel(
        forward,
        class_names=md.class_names,
        preprocessing=md.preprocessing,
        runtime=runtime,
        top_k=int(manifest.get("top_k", DEFAULT_TOP_K)),
        net=net,
        test_time_flip=md.test_time_flip,
    )


def _eager_forward(
    net: torch.nn.Module, device: torch.device, *, channels_last: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device)
        with torch.inference_mode():
            return net(pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels).cpu()

    return forward


def _onnx_forward(path: Path, num_threads: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "this package selects the onnx runtime but onnxruntime is not installed: `pip install onnxruntime` "
            "(the package's code/requirements.txt lists it for SageMaker), or set DOGBREED_RUNTIME=eager."
        ) from None
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: pixels.numpy()})[0])

    return forward


def model_fn(model_dir: str) -> DogBreedModel:
    """SageMaker: load the unpacked package from ``model_dir`` (``DOGBREED_RUNTIME`` overrides the runtime)."""
    return load_model(model_dir)


def transform_fn(
    model: DogBreedModel, request_body: bytes | bytearray | str | None, request_content_type: str | None,
    accept: str | None, context: Any,
) -> tuple[bytes, str]:  # fmt: skip
    """SageMaker: ``input_fn``, ``predict_fn`` and ``output_fn`` for one request, answering failures in JSON.

    The toolkit answers an exception from a handler with its message followed by the Python traceback, which
    shows clients the endpoint's code and paths. Here a refusal answers its own status and JSON body, and
    anything else a 500 ``internal_error`` whose traceback goes to the endpoint's log (CloudWatch), as the
    local server does. ``context`` is TorchServe's request context, which the toolkit passes as the argument
    after its own four.
    """
    try:
        return output_fn(predict_fn(input_fn(request_body, request_content_type), model), accept)
    except InferenceError as err:
        status, body = err.status, err.body
    except Exception:
        log.exception("Unexpected error while answering a %s request", request_content_type)
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        body = {"error": "internal_error", "message": "the endpoint failed on this request; see its log."}
    context.set_response_status(code=int(status), phrase=HTTPStatus(status).phrase)
    return json.dumps(body).encode(), JSON_CONTENT_TYPE


def media_type(header: str | None) -> str:
    """``"Image/JPEG; q=1"`` -> ``"image/jpeg"``."""
    return (header or "").split(";")[0].strip().lower()


def input_fn(request_body: bytes | bytearray | str | None, request_content_type: str | None) -> Inputs:
    """SageMaker: decode a request within the limits of the environment (``DOGBREED_MAX_*``).

    Exactly the toolkit's two arguments: a third parameter would receive the toolkit's request context.
    """
    return decode_request(request_body, request_content_type, Limits.from_env())


def decode_request(body: bytes | bytearray | str | None, content_type: str | None, limits: Limits) -> Inputs:
    """Decode a request body into images; raise :class:`InferenceError` for anything else.

    A missing content type is read as raw image bytes; a missing body (``None``) as an empty one.
    """
    request = check_request(body, content_type, limits)
    return Inputs(list(request.decode()), batched=request.batched, top_k=request.top_k, explain=request.explain)


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


def check_request(body: bytes | bytearray | str | None, content_type: str | None, limits: Limits) -> CheckedRequest:
    """Parse a request and check it against ``limits`` without decoding a pixel (see :func:`decode_request`)."""
    data = body.encode() if isinstance(body, str) else bytes(body or b"")
    kind = media_type(content_type) or "application/octet-stream"
    if not data:
        raise InferenceError(400, "empty_body", f"the request body is empty; {_ACCEPTED_INPUT}.")
    if kind == JSON_CONTENT_TYPE:
        request = _from_json(data, limits)
    elif kind == NPY_CONTENT_TYPE:
        request = _from_npy(data, limits)
    elif kind in IMAGE_CONTENT_TYPES or kind.startswith("image/"):
        request = CheckedRequest(*_open_image(data, limits), batched=False)
    else:
        raise InferenceError(
            415, "unsupported_content_type", f"content type {content_type!r} is not supported; {_ACCEPTED_INPUT}."
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
            f"{what} is not an image Pillow can read (it starts with {data[:16]!r}); {_ACCEPTED_INPUT}.",
        ) from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... on bad headers
        raise _corrupt(what, err) from None
    if image.width < 1 or image.height < 1:
        raise InferenceError(400, "empty_image", f"{what} is {image.width}x{image.height} pixels; {_ACCEPTED_INPUT}.")

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
            400, "bad_json", f"the body is not valid JSON ({type(err).__name__}: {err}); {_ACCEPTED_INPUT}."
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
                f"{[key[:50] for key in sorted(payload)[:10]]}); {_ACCEPTED_INPUT}.",
            )
    elif isinstance(payload, list):
        encoded, batched = payload, True
    else:
        raise InferenceError(400, "bad_json_shape", f"the JSON body is a {type(payload).__name__}; {_ACCEPTED_INPUT}.")
    if not encoded:
        raise InferenceError(400, "empty_batch", f"the JSON list of images is empty; {_ACCEPTED_INPUT}.")
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
        raise InferenceError(400, "bad_npy", f"array of dtype {dtype} and shape {shape}; {_ACCEPTED_INPUT}.")
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


def predict_fn(input_data: Inputs, model: DogBreedModel) -> Prediction:
    """Preprocess the decoded images and run one forward pass over all of them; explain the top-1 if asked."""
    if input_data.explain:
        model.require_explainable()
    pixels = model.preprocess(input_data.items)
    probabilities = model.predict(pixels)
    explanations = model.explain(pixels, probabilities) if input_data.explain else None
    return Prediction(
        probabilities, model.class_names, batched=input_data.batched, top_k=input_data.top_k,
        default_top_k=model.top_k, explanations=explanations,
    )  # fmt: skip


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


def output_fn(prediction: Prediction, accept: str | None) -> tuple[bytes, str]:
    """Serialise the top-k classes as JSON; the body's ``top_k`` wins over the Accept header's."""
    top_k = accept_top_k(accept)
    return json.dumps(format_predictions(prediction, top_k), allow_nan=False).encode(), JSON_CONTENT_TYPE
