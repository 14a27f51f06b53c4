"""The model runtime: load a model package or a run's ``model/`` dir; run it eager, exported (``torch.export``),
with OpenVINO (FP32 or INT8), ONNX Runtime or TorchScript (deprecated; packages made earlier).

One home for what a loaded model is and does (preprocess, predict, explain), shared by the SageMaker handlers
(:mod:`dogbreed.serve.handlers`), the local server and batch prediction. It reads requests only as decoded
images and refuses with :class:`~dogbreed.serve.codec.InferenceError`; it never imports Lightning.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import threading
from collections.abc import Callable, Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dogbreed.artifacts import MODEL_WEIGHTS, read_model_dir
from dogbreed.models.backbone import flip_averaged
from dogbreed.serve.codec import InferenceError
from dogbreed.serve.explain import grad_cam, heatmap_png, input_jpeg
from dogbreed.transforms import Preprocessing

__all__ = [
    "DEFAULT_TOP_K",
    "EXPORT_FILES",
    "PACKAGE_MANIFEST",
    "RUNTIMES",
    "RUNTIME_CHOICES",
    "RUNTIME_MODULES",
    "DogBreedModel",
    "exported_forward",
    "load_model",
    "read_manifest",
]

log = logging.getLogger(__name__)

PACKAGE_MANIFEST = "package.json"
RUNTIMES = ("eager", "export", "openvino", "openvino-int8", "torchscript", "onnx")
# export: torch.export's ExportedProgram (.pt2), TorchScript's successor; TorchScript is deprecated since torch 2.11.
# openvino(-int8): OpenVINO IR (.xml + .bin), FP32 or post-training quantised to INT8
EXPORT_FILES = {
    "export": "model.pt2", "openvino": "model.xml", "openvino-int8": "model-int8.xml", "torchscript": "model.ts",
    "onnx": "model.onnx",
}  # fmt: skip
# `auto` serves the first runtime of this order that the package carries and this Python can import: fastest first
# on a CPU (scripts/bench_serve.py's runtime table); eager before export, as fast and able to explain. On a GPU only
# the torch runtimes run there, so those come first.
_ON_DEVICE = ("eager", "export", "torchscript")  # the torch runtimes: on the GPU when there is one, else the CPU
_CPU_ORDER = ("openvino-int8", "openvino", "onnx", "eager", "export", "torchscript")
AUTO_ORDER = {"cpu": _CPU_ORDER, "cuda": (*_ON_DEVICE, *(r for r in _CPU_ORDER if r not in _ON_DEVICE))}
RUNTIME_CHOICES = (*RUNTIMES, "auto")
# the module each runtime imports beyond the stock SageMaker PyTorch container (also its distribution's name: a
# package's code/requirements.txt pins it as dogbreed's extras do)
RUNTIME_MODULES = {"onnx": "onnxruntime", "openvino": "openvino", "openvino-int8": "openvino"}
DEFAULT_TOP_K = 5


class DogBreedModel:
    """What ``model_fn`` returns: a forward function (any of :data:`RUNTIMES`) plus its metadata.

    ``net`` is the eager network behind ``forward`` (``None`` for the other runtimes): Grad-CAM needs it.
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
        about: dict[str, Any] | None = None,
    ) -> None:
        self.forward = forward
        self.about = about or {}  # where the model came from, for people: backbone, source run, package date
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

        Given an iterator (:meth:`~dogbreed.serve.codec.CheckedRequest.decode`), only one decoded image is alive
        at a time.
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

        ``None`` when the probabilities are not finite: :func:`~dogbreed.serve.codec.format_predictions` refuses
        that answer anyway.
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
    """Load a model package or a run's ``model/`` dir with the runtime the package recorded (or ``runtime``;
    ``auto``: :func:`auto_runtime`).

    Weights are read with ``weights_only=True``; nothing is unpickled. ``device`` (batch prediction's
    ``--device``) wins over ``DOGBREED_DEVICE``, which wins over CUDA when there is one.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    runtime = runtime or os.environ.get("DOGBREED_RUNTIME") or manifest.get("runtime", "eager")
    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime={runtime!r} is not one of {RUNTIME_CHOICES}.")
    exported = manifest.get("exports", {})
    # A GPU endpoint instance (ml.g4dn ...) runs eager, export and TorchScript on its GPU; DOGBREED_DEVICE overrides.
    device = torch.device(
        device or os.environ.get("DOGBREED_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if runtime == "auto":
        runtime = auto_runtime(exported, device)
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
    net = None  # only the eager runtime has a network to explain with
    if runtime == "eager":
        # oneDNN's convolutions run faster on NHWC tensors, by about 20% at batch 16 on CPU.
        net = md.network().to(device, memory_format=torch.channels_last)
        forward = _eager_forward(net, device, channels_last=True)
    else:
        forward = exported_forward(runtime, model_dir / EXPORT_FILES[runtime], device=device, num_threads=num_threads)
    where = device if runtime in _ON_DEVICE else "cpu"
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
        about={
            "backbone": md.backbone,
            "source": manifest.get("source") or str(model_dir.resolve().parent),  # a package's run, or this run
            "packaged": manifest.get("created"),
        },
    )


def auto_runtime(exports: Iterable[str], device: torch.device) -> str:
    """The fastest runtime (:data:`AUTO_ORDER`) among ``exports`` and eager whose library this Python imports."""
    carried = [r for r in AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"] if r in {"eager", *exports}]
    runnable = [r for r in carried if r not in RUNTIME_MODULES or find_spec(RUNTIME_MODULES[r]) is not None]
    missing = carried[: carried.index(runnable[0])]  # eager is always runnable
    log.info(
        "runtime auto: %s (carried: %s%s)", runnable[0], ", ".join(carried),
        f"; not installed here: {', '.join(missing)}" if missing else "",
    )  # fmt: skip
    return runnable[0]


def _eager_forward(
    net: torch.nn.Module, device: torch.device, *, channels_last: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device)
        with torch.inference_mode():
            return net(pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels).cpu()

    return forward


def exported_forward(
    runtime: str, path: Path, *, device: torch.device | None = None, num_threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward function of an exported model file: what :func:`load_model` serves and the packager checks."""
    device = device or torch.device("cpu")
    if runtime == "export":  # NHWC like eager: about 10% faster at 224 px on one thread (scripts/bench_serve.py)
        module = torch.export.load(str(path)).module().to(device, memory_format=torch.channels_last)
        return _eager_forward(module, device, channels_last=True)
    if runtime == "torchscript":
        log.warning(
            "%s: TorchScript is deprecated since torch 2.11 and may stop loading; rebuild the package with "
            "`dogbreed-package RUN_DIR --export export` (torch.export), --export onnx or --export openvino.",
            path,
        )
        return _eager_forward(torch.jit.load(str(path), map_location=device), device)
    if runtime == "onnx":
        return _onnx_forward(path, num_threads)
    return _openvino_forward(path, num_threads)


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


def _openvino_forward(path: Path, num_threads: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An OpenVINO IR compiled for the CPU, computing in FP32 wherever it is not quantised (no silent bf16)."""
    try:
        import openvino as ov
    except ImportError:
        raise ImportError(
            f"{path.name} needs OpenVINO, which is not installed: `pip install openvino` (the package's "
            "code/requirements.txt lists it for SageMaker), or set DOGBREED_RUNTIME=eager."
        ) from None
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = num_threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: the server's inference thread, or a prediction loop

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with lock:
            return torch.from_numpy(request.infer([pixels.numpy()])[0].copy())

    return forward
