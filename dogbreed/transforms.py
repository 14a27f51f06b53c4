"""The one definition of image preprocessing, shared by training and serving.

Training builds its transforms from a :class:`Preprocessing`; the exported model directory stores the
same object as JSON, and the serving runtime rebuilds the eval transform from it. There is no second
copy that could drift.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# random erasing's rectangle: area fraction and aspect ratio ranges (torchvision's defaults)
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an upright RGB image whatever the source mode (L, LA, P, CMYK, RGBA, I;16 ...).

    Transparent pixels are composited over white rather than dropped to their (often black) colour.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16/32-bit greyscale: scale to 8 bits before the RGB conversion, which would clip.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def open_image(source: str | Path | bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image lazily: only its header is read, so that its size is known before any pixel is decoded.

    Exceeding ``max_pixels`` raises ``PIL.Image.DecompressionBombError`` (a decompression bomb costs nothing).
    """
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if max_pixels is not None and image.width * image.height > max_pixels:
        image.close()
        raise Image.DecompressionBombError(
            f"image is {image.width}x{image.height} = {image.width * image.height} pixels, more than the "
            f"limit of {max_pixels}."
        )
    return image


def load_rgb(source: str | Path | bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file or byte string as RGB (raises on corrupt or truncated data).

    ``max_pixels`` is checked from the header, before decoding (see :func:`open_image`).
    """
    with open_image(source, max_pixels=max_pixels) as image:
        image.load()
        return to_rgb(image)


@dataclass(frozen=True)
class Preprocessing:
    """Settings of the train and eval transforms; stored next to the exported model."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    color_jitter: float = 0.0
    # probability of erasing a random rectangle (2-33 % of the image) of each training image to the mean colour
    random_erasing: float = 0.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size={self.resize_size} is smaller than image_size={self.image_size}: the eval "
                "center crop needs resize_size >= image_size (torchvision's default is 256 for 224)."
            )
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={self.crop_scale} must satisfy 0 < min <= max <= 1.")
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"random_erasing={self.random_erasing} is a probability: it must be within [0, 1].")
        for name in ("mean", "std", "crop_scale"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def _interpolation(self) -> v2.InterpolationMode:
        return v2.InterpolationMode(self.interpolation)

    def train_transform(self) -> v2.Compose:
        """Random resized crop, optional flip and colour jitter, normalisation, then optional random erasing."""
        ops: list[torch.nn.Module] = [
            v2.PILToTensor(),
            v2.RandomResizedCrop(
                self.image_size, scale=self.crop_scale, interpolation=self._interpolation, antialias=True
            ),
        ]
        if self.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if self.color_jitter > 0:
            jitter = self.color_jitter
            ops.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        erase = [v2.RandomErasing(p=self.random_erasing, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0)]
        return v2.Compose([*ops, *self._normalize(), *(erase if self.random_erasing > 0 else [])])

    def eval_transform(self) -> v2.Compose:
        """Resize the short side, center crop, normalise: the deterministic path of validation and serving."""
        return v2.Compose(
            [
                v2.PILToTensor(),
                self.resize_transform(),
                v2.CenterCrop(self.image_size),
                *self._normalize(),
            ]
        )

    def resize_transform(self) -> v2.Resize:
        """Short side to ``resize_size``: the first step of :meth:`eval_transform`, and what the image cache stores.

        Resizing an image that already has this size returns it unchanged, so the eval transform gives the
        same tensor for a cached image as for the original file.
        """
        return v2.Resize(self.resize_size, interpolation=self._interpolation, antialias=True)

    def _normalize(self) -> list[torch.nn.Module]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(self.mean), std=list(self.std))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (what the model package stores)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_dict` output, rejecting unknown keys with a clear message."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
