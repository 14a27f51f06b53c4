"""Grad-CAM: where a convolutional classifier looked for a class, computed on request (``explain=true``).

Torch only, like the serving runtime that calls it and ships it in the model package: it runs the same eager
network on the same preprocessed pixels as the prediction it explains. It needs gradients, so it runs outside
``torch.inference_mode`` (even when called inside it); the forward hooks it registers are removed before it
returns, they ignore forward passes of other threads, and no parameter's ``.grad`` is touched
(``torch.autograd.grad`` hands the gradients back instead of accumulating them).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# Global pooling, a direct child of the network, ends the spatial part of torchvision's classifiers (ResNet,
# EfficientNet, ConvNeXt, VGG ...); deeper ones (squeeze-and-excitation blocks) do not.
_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class GradCam:
    """Heat maps ``(N, S, S)`` in [0, 1] on the CPU, one per image, for ``classes``, taken at ``layer``."""

    heatmaps: torch.Tensor
    classes: list[int]
    layer: str


def _this_thread_only(hook: Callable[[nn.Module, tuple, object], None]) -> Callable[[nn.Module, tuple, object], None]:
    """A forward hook that ignores forward passes of other threads (a server's batches on the same network)."""
    owner = threading.get_ident()

    def guarded(module: nn.Module, args: tuple, output: object) -> None:
        if threading.get_ident() == owner:
            hook(module, args, output)

    return guarded


def find_target_layer(net: nn.Module, pixels: torch.Tensor) -> str:
    """Name of the last module that outputs a 4-D feature map before global pooling (ResNet: ``layer4``).

    Watches one forward pass of the first image: modules finish innermost first, so the last 4-D output
    before the network's own adaptive pooling layer is the outermost block of the last stage (``layer4``, not
    its last ReLU; ``features`` for MobileNet, EfficientNet, DenseNet, VGG and ConvNeXt).

    Raises:
        ValueError: the network has no such module (not a convolutional classifier).
    """
    candidates: list[str] = []
    pooled = False

    def watch(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            nonlocal pooled
            if pooled:
                return
            if isinstance(module, _POOLING) and "." not in name:
                pooled = True
            elif isinstance(output, torch.Tensor) and output.ndim == 4 and output.is_floating_point():
                candidates.append(name)

        return hook

    handles = [module.register_forward_hook(_this_thread_only(watch(name))) for name, module in net.named_modules()]
    try:
        with torch.no_grad():
            net(pixels[:1].to(_device(net)))
    finally:
        for handle in handles:
            handle.remove()
    candidates = [name for name in candidates if name]  # the network itself is no layer of its own
    if not candidates:
        raise ValueError(
            f"{type(net).__name__} has no module giving a 4-D feature map before global pooling: Grad-CAM needs a "
            "convolutional backbone (ResNet, MobileNet, EfficientNet, ...)."
        )
    return candidates[-1]


def grad_cam(
    net: nn.Module, pixels: torch.Tensor, classes: Sequence[int], *, layer: str | None = None, mirrored: bool = False
) -> GradCam:
    """Grad-CAM of each preprocessed image ``(N, 3, S, S)`` for its class, upsampled to ``S x S``.

    The channels of ``layer``'s output are weighted by the mean gradient of the class's logit, summed, kept
    where positive, upsampled bilinearly and scaled to [0, 1] (all zero when the map is uniform, e.g. a 1x1
    feature map of a tiny input). One image at a time, so memory stays that of one backward pass.

    Args:
        net: The eager network in eval mode (the one the prediction ran).
        pixels: Preprocessed images, as the prediction got them.
        classes: One class index per image (the top-1 of the prediction).
        layer: A module name of ``net``; by default :func:`find_target_layer`'s answer.
        mirrored: Explain a test-time-flip answer (the mean logits of the image and its mirror image): the mean
            of both passes' maps, the mirror's flipped back, before scaling. Its map of a mirrored image is
            then the mirrored map, as its answer is the same answer.
    """
    if len(classes) != len(pixels):
        raise ValueError(f"{len(classes)} classes for {len(pixels)} images: give one class per image.")
    layer = layer or find_target_layer(net, pixels)
    module = net.get_submodule(layer)
    heatmaps = []
    for image, index in zip(pixels, classes, strict=True):
        cam = _one(net, module, image[None], int(index))
        if mirrored:
            cam = (cam + _one(net, module, image.flip(-1)[None], int(index)).flip(-1)) / 2
        heatmaps.append(_scaled(cam))
    return GradCam(torch.stack(heatmaps), [int(c) for c in classes], layer)


def _scaled(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.min()
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def _one(net: nn.Module, module: nn.Module, image: torch.Tensor, index: int) -> torch.Tensor:
    """The unscaled ``(S, S)`` map of one image ``(1, 3, S, S)``, on the CPU."""
    saved: list[torch.Tensor] = []
    handle = module.register_forward_hook(_this_thread_only(lambda _m, _a, output: saved.append(output)))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # a copy that requires grad: the graph exists even if every parameter is frozen
            logits = net(image.to(_device(net)).clone().requires_grad_(True))
            activation = saved[-1]  # a module run twice (a shared ReLU) explains its last output
            (gradient,) = torch.autograd.grad(logits[0, index], activation)
    finally:
        handle.remove()
    with torch.no_grad():
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
        return F.interpolate(cam.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0].cpu()


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def heatmap_png(heatmap: torch.Tensor) -> bytes:
    """8-bit greyscale PNG of a ``(S, S)`` heat map: pixel value / 255 is the weight in [0, 1]."""
    grey = (heatmap.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return _encode(Image.fromarray(grey), "PNG")


def input_jpeg(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> bytes:
    """JPEG of the crop the model saw: one preprocessed ``(3, S, S)`` image with its normalisation undone."""
    rgb = pixels.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return _encode(Image.fromarray(np.ascontiguousarray(array)), "JPEG", quality=90)


def _encode(image: Image.Image, fmt: str, **options: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
