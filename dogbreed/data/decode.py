"""Decode image files to uint8 RGB tensors: libjpeg-turbo for JPEGs, PIL for everything else.

``torchvision.io.decode_jpeg`` skips PIL's image object and its copy into a tensor; it gives the same
pixels as :func:`dogbreed.transforms.load_rgb` (greyscale and CMYK JPEGs become RGB, EXIF orientation is
applied), so either decoder feeds the same transforms with the same result.

:func:`decode_jpegs_resized` decodes many JPEGs in one call on a device (nvjpeg on CUDA), for building the
decoded-image cache on a GPU; :func:`decodes_on_device` says which files it may be given.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from dogbreed._io import DataError, available_cpus
from dogbreed.transforms import load_rgb

log = logging.getLogger(__name__)

DECODERS = ("torchvision", "pil")
_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
# torchvision 0.29 deprecates its decoders in favour of TorchCodec; this message, and no other, is silenced
_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def check_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"data.decoder={decoder!r} is not supported; choose one of {list(DECODERS)}.")
    return decoder


def auto_num_workers() -> int:
    """DataLoader workers for ``num_workers: auto``: every available core but one, kept for the training loop."""
    return max(1, available_cpus() - 1)


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


def decodes_on_device(data: bytes) -> bool:
    """Whether a batched device decode of ``data`` gives the pixels :func:`read_rgb` gives.

    True for upright JPEGs with one or three components. Not for other formats, CMYK JPEGs, or JPEGs with
    an EXIF rotation (nvjpeg does not apply it); those take :func:`read_rgb`. Reads the header only.
    """
    if not data.startswith(_JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            return image.format in ("JPEG", "MPO") and image.mode in ("RGB", "L") and orientation in (0, 1)
    except Exception:  # a header PIL cannot parse: read_rgb decides, and names the file if it fails
        return False


def decode_jpegs_resized(
    encoded: Sequence[torch.Tensor],
    resize: Callable[[torch.Tensor], torch.Tensor],
    device: str | torch.device,
) -> list[torch.Tensor]:
    """Decode JPEG bytes in one call on ``device``, resize each image there, return uint8 ``(3, h, w)`` CPU tensors.

    One call for the whole list is what makes nvjpeg fast on CUDA; one device-to-host copy for the whole
    batch avoids a synchronisation per image. On the CPU the same code decodes with libjpeg-turbo.

    Args:
        encoded: 1-D uint8 CPU tensors of JPEG files for which :func:`decodes_on_device` is true.
        resize: Applied to each decoded image on ``device``.
        device: ``cuda`` (nvjpeg) or ``cpu``.

    Raises:
        RuntimeError: The decoder rejected one of the images (it returns no partial results), or the
            device ran out of memory.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        images = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    resized = [resize(image) for image in images]
    flat = torch.cat([image.reshape(-1) for image in resized]).cpu()
    chunks = flat.split([image.numel() for image in resized])
    return [chunk.view(image.shape) for chunk, image in zip(chunks, resized, strict=True)]
