"""Decode image files to uint8 RGB tensors: libjpeg-turbo for JPEGs, PIL for everything else.

``torchvision.io.decode_jpeg`` skips PIL's image object and its copy into a tensor; it gives the same
pixels as :func:`dogbreed.transforms.load_rgb` (greyscale and CMYK JPEGs become RGB, EXIF orientation is
applied), so either decoder feeds the same transforms with the same result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from dogbreed.data.layout import DataError
from dogbreed.transforms import load_rgb

log = logging.getLogger(__name__)

DECODERS = ("torchvision", "pil")
_JPEG_MAGIC = b"\xff\xd8\xff"


def check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder={decoder!r} is not supported; choose one of {list(DECODERS)}.")
    return decoder


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_num_workers() -> int:
    """DataLoader workers for ``num_workers: auto``: every available core but one, kept for the training loop."""
    return max(1, available_cores() - 1)


def read_rgb(path: str | Path, decoder: str = "torchvision") -> torch.Tensor:
    """Decode ``path`` to a ``uint8`` tensor of shape ``(3, H, W)``.

    Args:
        path: An image file.
        decoder: ``torchvision`` decodes JPEGs with libjpeg-turbo and falls back to PIL for other formats
            and for JPEG variants it rejects; ``pil`` always uses PIL.
    """
    if decoder == "torchvision":
        data = Path(path).read_bytes()
        if data.startswith(_JPEG_MAGIC):
            try:
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            except RuntimeError as err:  # unusual JPEG flavours (12-bit, arithmetic coding): PIL handles them
                log.debug("decode_jpeg failed on %s (%s); using PIL", path, err)
        return pil_to_tensor(load_rgb(data))
    return pil_to_tensor(load_rgb(Path(path)))


class DecodedImageDataset(Dataset):
    """(relative path, label) pairs under ``root`` decoded to uint8 tensors, then ``transform`` (if any)."""

    def __init__(
        self,
        root: Path,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        decoder: str = "torchvision",
    ) -> None:
        self.root = root
        self.samples = list(samples)
        self.transform = transform
        self.decoder = check_decoder(decoder)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        try:
            image = read_rgb(self.root / rel, self.decoder)
        except Exception as err:  # name the file: a bare decoder error inside a worker says nothing useful
            raise DataError(
                f"{self.root / rel} cannot be decoded ({type(err).__name__}: {err}); set data.verify_images=true "
                "to exclude unreadable files before training."
            ) from err
        return (self.transform(image) if self.transform else image), label
