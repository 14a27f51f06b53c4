"""SageMaker PyTorch inference handlers: ``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``.

The model package ships this module (``code/inference.py`` re-exports the four functions) and the local
server calls the same building blocks, so an endpoint answers identically on SageMaker and on a laptop.
It imports only torch, torchvision, Pillow, numpy and the light ``dogbreed`` modules (never Lightning),
so the stock SageMaker PyTorch container runs it without extra installs.

Requests: ``image/jpeg``, ``image/png``, ``application/x-image``, ``application/octet-stream`` (raw image
bytes; any other ``image/*`` too), ``application/json`` (``{"image": "<base64>"}``; ``{"images": [...]}``
or a bare list for a batch; optional ``"top_k"``) and ``application/x-npy`` (uint8 pixels ``(H, W)``,
``(H, W, C)`` or ``(N, H, W, C)``, or float32 already preprocessed ``(3, S, S)`` / ``(N, 3, S, S)``).
Answers: ``application/json`` ``{"predictions": [{"label", "index", "probability"}, ...]}`` with the
top-k classes, or one such list per image for a batch; ``;top_k=N`` on the Accept header sets k.
Every refused request raises :class:`InferenceError`: a 4xx status with a JSON body saying what was
wrong and what is accepted. On SageMaker it subclasses the toolkit's ``BaseInferenceToolkitError``, so
the status code reaches the client (the toolkit appends a traceback to the JSON line of the body).

The toolkit (``sagemaker_inference.transformer.Transformer``) counts each handler's parameters and passes
the request context as one more positional argument when a handler takes one more than the toolkit's own.
So each handler takes exactly the toolkit's arguments and nothing optional: ``input_fn`` reads its limits
from the environment (:meth:`Limits.from_env`), and the local server calls :func:`decode_request` with its
own limits.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dogbreed.artifacts import read_model_dir
from dogbreed.models.backbone import create_backbone
from dogbreed.transforms import Preprocessing, load_rgb, to_rgb

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
    """Per-request limits against oversized payloads and decompression bombs."""

    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_images: int = 64

    @classmethod
    def from_env(cls) -> Limits:
        """Defaults overridden by ``DOGBREED_MAX_IMAGE_BYTES``, ``DOGBREED_MAX_PIXELS``, ``DOGBREED_MAX_IMAGES``."""
        return cls(
            max_image_bytes=_env_int("DOGBREED_MAX_IMAGE_BYTES", cls.max_image_bytes),
            max_pixels=_env_int("DOGBREED_MAX_PIXELS", cls.max_pixels),
            max_images=_env_int("DOGBREED_MAX_IMAGES", cls.max_images),
        )


@dataclass
class Inputs:
    """Decoded request: PIL images or already preprocessed ``(3, S, S)`` tensors."""

    items: list[Image.Image | torch.Tensor]
    batched: bool
    top_k: int | None = None


@dataclass
class Prediction:
    """Class probabilities ``(N, num_classes)`` and how to report them."""

    probabilities: torch.Tensor
    class_names: list[str]
    batched: bool
    top_k: int | None
    default_top_k: int = DEFAULT_TOP_K


class DogBreedModel:
    """What ``model_fn`` returns: a forward function (eager, TorchScript or ONNX Runtime) plus its metadata."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        class_names: list[str],
        preprocessing: Preprocessing,
        runtime: str = "eager",
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        self.forward = forward
        self.class_names = class_names
        self.preprocessing = preprocessing
        self.runtime = runtime
        self.top_k = top_k
        self._transform = preprocessing.eval_transform()

    def preprocess(self, items: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
        """Eval transform of each image (the same code as validation), stacked to ``(N, 3, S, S)``."""
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
        return torch.stack(tensors)

    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(N, num_classes)`` for preprocessed pixels."""
        logits = self.forward(pixels)
        return torch.softmax(logits.float(), dim=1)


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """``package.json`` of a model package, or ``{}`` for a bare ``model/`` dir of a run."""
    path = Path(model_dir) / PACKAGE_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model(model_dir: str | Path, *, runtime: str | None = None, num_threads: int | None = None) -> DogBreedModel:
    """Load a model package or a run's ``model/`` dir with the runtime the package recorded (or ``runtime``).

    Weights are read with ``weights_only=True``; nothing is unpickled.
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
    md = read_model_dir(model_dir)
    # A GPU endpoint instance (ml.g4dn ...) runs eager and TorchScript on its GPU; DOGBREED_DEVICE overrides.
    device = torch.device(os.environ.get("DOGBREED_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if runtime == "eager":
        net, _ = create_backbone(md.backbone, num_classes=len(md.class_names), weights=None)
        net.load_state_dict(md.state_dict)
        # oneDNN's convolutions run faster on NHWC tensors, by about 20% at batch 16 on CPU.
        forward = _eager_forward(net.eval().to(device, memory_format=torch.channels_last), device, channels_last=True)
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
    data = body.encode() if isinstance(body, str) else bytes(body or b"")
    kind = media_type(content_type) or "application/octet-stream"
    if not data:
        raise InferenceError(400, "empty_body", f"the request body is empty; {_ACCEPTED_INPUT}.")
    if kind == JSON_CONTENT_TYPE:
        return _from_json(data, limits)
    if kind == NPY_CONTENT_TYPE:
        return _from_npy(data, limits)
    if kind in IMAGE_CONTENT_TYPES or kind.startswith("image/"):
        return Inputs([decode_image(data, limits)], batched=False)
    raise InferenceError(
        415, "unsupported_content_type", f"content type {content_type!r} is not supported; {_ACCEPTED_INPUT}."
    )


def decode_image(data: bytes, limits: Limits, what: str = "the body") -> Image.Image:
    """Decode image bytes to upright RGB within the limits (greyscale, CMYK, alpha, EXIF rotation handled)."""
    if len(data) > limits.max_image_bytes:
        raise InferenceError(
            413,
            "image_too_large",
            f"{what} is {len(data)} bytes, more than the limit of {limits.max_image_bytes} "
            "bytes per image; send a smaller (e.g. resized to 1024 px) JPEG.",
            accepted=f"<= {limits.max_image_bytes} bytes",
        )
    try:
        return load_rgb(data, max_pixels=limits.max_pixels)
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
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad data)
        raise InferenceError(
            400,
            "corrupt_image",
            f"{what} could not be decoded ({type(err).__name__}: {err}): the image is truncated or "
            "corrupt; send the complete file.",
        ) from None


def _from_json(body: bytes, limits: Limits) -> Inputs:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InferenceError(400, "bad_json", f"the body is not valid JSON ({err}); {_ACCEPTED_INPUT}.") from None
    top_k = None
    if isinstance(payload, dict):
        top_k = payload.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise InferenceError(
                400, "bad_top_k", f'"top_k" must be a positive integer, got {top_k!r}.', ["top_k >= 1"]
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
                f"{sorted(payload)[:10]}); {_ACCEPTED_INPUT}.",
            )
    elif isinstance(payload, list):
        encoded, batched = payload, True
    else:
        raise InferenceError(400, "bad_json_shape", f"the JSON body is a {type(payload).__name__}; {_ACCEPTED_INPUT}.")
    if not encoded:
        raise InferenceError(400, "empty_batch", f"the JSON list of images is empty; {_ACCEPTED_INPUT}.")
    if len(encoded) > limits.max_images:
        raise InferenceError(
            413,
            "too_many_images",
            f"{len(encoded)} images in one request; the limit is {limits.max_images}: split it.",
            accepted=f"<= {limits.max_images} images per request",
        )
    images = []
    for i, item in enumerate(encoded):
        what = f"image {i}" if batched else "the image"
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            item = item["image"]
        if not isinstance(item, str):
            raise InferenceError(400, "bad_json_shape", f"{what} is a {type(item).__name__}, not a base64 string.")
        images.append(decode_image(_b64decode(item, what, limits), limits, what))
    return Inputs(images, batched=batched, top_k=top_k)


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


def _from_npy(body: bytes, limits: Limits) -> Inputs:
    shape, dtype = _npy_header(body)
    if int(np.prod(shape)) * dtype.itemsize > len(body):
        raise InferenceError(
            400, "bad_npy", f"the .npy header declares shape {shape} {dtype}, more data than was sent."
        )
    array = np.load(io.BytesIO(body), allow_pickle=False)
    if array.dtype == np.uint8:
        if array.ndim == 3 and array.shape[2] > 4:
            raise InferenceError(400, "bad_npy", f"uint8 array of shape {shape}: channels last, 1, 3 or 4 of them.")
        if array.ndim not in (2, 3, 4):
            raise InferenceError(400, "bad_npy", f"uint8 array of shape {shape}; {_ACCEPTED_INPUT}.")
        batched = array.ndim == 4
        frames = list(array) if batched else [array]
        _check_count(len(frames), limits)
        return Inputs([_pixels_to_image(frame, i, limits) for i, frame in enumerate(frames)], batched=batched)
    if array.dtype.kind == "f" and array.ndim in (3, 4) and array.shape[-3] == 3:
        array = np.ascontiguousarray(array, dtype=np.float32)
        batched = array.ndim == 4
        tensors = list(torch.from_numpy(array)) if batched else [torch.from_numpy(array)]
        _check_count(len(tensors), limits)
        return Inputs(tensors, batched=batched)
    raise InferenceError(400, "bad_npy", f"array of dtype {array.dtype} and shape {shape}; {_ACCEPTED_INPUT}.")


def _npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """Read the .npy header first, so that a header promising terabytes is refused before any allocation."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except (ValueError, OSError, EOFError) as err:
        raise InferenceError(
            400,
            "bad_npy",
            f"the body is not a .npy array ({err}); write it with numpy.save(), not pickle or .npz.",
        ) from None
    if dtype.hasobject:
        raise InferenceError(400, "bad_npy", "object arrays are refused (they would need unpickling).")
    return shape, dtype


def _check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise InferenceError(400, "empty_batch", "the array holds no images.")
    if n > limits.max_images:
        raise InferenceError(
            413,
            "too_many_images",
            f"{n} images in one request; the limit is {limits.max_images}: split it.",
            accepted=f"<= {limits.max_images} images per request",
        )


def _pixels_to_image(frame: np.ndarray, i: int, limits: Limits) -> Image.Image:
    height, width = frame.shape[:2]
    if height * width > limits.max_pixels:
        raise InferenceError(
            413,
            "too_many_pixels",
            f"image {i} is {width}x{height} pixels, more than the limit of {limits.max_pixels}.",
            accepted=f"<= {limits.max_pixels} pixels",
        )
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[..., 0]
    if frame.ndim == 3 and frame.shape[2] == 2:
        raise InferenceError(400, "bad_npy", f"image {i} has 2 channels; send 1 (grey), 3 (RGB) or 4 (RGBA).")
    return to_rgb(Image.fromarray(np.ascontiguousarray(frame)))


def predict_fn(input_data: Inputs, model: DogBreedModel) -> Prediction:
    """Preprocess the decoded images and run one forward pass over all of them."""
    probabilities = model.predict(model.preprocess(input_data.items))
    return Prediction(
        probabilities, model.class_names, batched=input_data.batched, top_k=input_data.top_k, default_top_k=model.top_k
    )


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
                if not value.strip().isdigit() or int(value) < 1:
                    raise InferenceError(400, "bad_top_k", f"top_k={value!r} in Accept must be a positive integer.")
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
    return {"predictions": rows if prediction.batched else rows[0]}


def output_fn(prediction: Prediction, accept: str | None) -> tuple[bytes, str]:
    """Serialise the top-k classes as JSON; the body's ``top_k`` wins over the Accept header's."""
    top_k = accept_top_k(accept)
    return json.dumps(format_predictions(prediction, top_k)).encode(), JSON_CONTENT_TYPE
