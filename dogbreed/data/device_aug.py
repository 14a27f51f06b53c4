"""Training augmentation applied batch-wise on the accelerator, so CPU workers only move uint8 pixels.

Workers return images resized to the short side ``resize_size`` (from the decoded-image cache or decoded on
the fly). :meth:`BatchAugment.collate` pads them into one uint8 batch and draws each image's random
parameters (crop box, flip, colour jitter, erased rectangle) on the CPU, cheaply and reproducibly under a fixed seed;
:meth:`BatchAugment.apply` runs after the batch reaches the device (``on_after_batch_transfer``): one
``roi_align`` call crops and resizes every image (bilinear, averaging several samples per output pixel
when it shrinks, like an antialiased resize), then flip, jitter, normalisation and random erasing. The crop box
follows ``RandomResizedCrop``'s sampling rule, the erased rectangle ``RandomErasing``'s. The same code runs on the CPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torchvision.ops import roi_align

from dogbreed.transforms import ERASE_RATIO, ERASE_SCALE, Preprocessing

_ATTEMPTS = 10
_GREY = (0.299, 0.587, 0.114)


class UInt8Batch(NamedTuple):
    """A training batch as it crosses to the device: padded uint8 images and their augmentation parameters."""

    images: torch.Tensor  # uint8 (B, 3, H, W), each image top-left, edge-replicated by one pixel
    boxes: torch.Tensor  # float32 (B, 5): batch index, x1, y1, x2, y2 of each crop in pixels
    flip: torch.Tensor  # bool (B,)
    jitter: torch.Tensor  # float32 (B, 3): brightness, contrast, saturation factors
    erase: torch.Tensor  # int64 (B, 4): top, left, height, width of the rectangle to erase (height 0: none)
    labels: torch.Tensor  # int64 (B,)


class BatchAugment:
    """Random resized crop, horizontal flip, colour jitter, normalisation and random erasing for whole batches.

    Args:
        preprocessing: The settings the CPU train transform uses (image_size, crop_scale, hflip,
            color_jitter, mean, std, random_erasing); this class reproduces that transform batch-wise.
    """

    ratio = (3 / 4, 4 / 3)

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def sample_boxes(self, sizes: torch.Tensor) -> torch.Tensor:
        """Crop boxes ``(x1, y1, x2, y2)`` for images of ``sizes`` (B, 2) = (height, width).

        Vectorised ``RandomResizedCrop.get_params``: ten tries at a random area fraction and aspect ratio,
        the first that fits wins; if none fits, the largest center crop within the ratio range.
        """
        p = self.preprocessing
        batch = sizes.shape[0]
        height, width = sizes[:, :1].double(), sizes[:, 1:].double()
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        target = area * torch.empty(batch, _ATTEMPTS, dtype=torch.float64).uniform_(*p.crop_scale)
        aspect = torch.exp(torch.empty(batch, _ATTEMPTS, dtype=torch.float64).uniform_(log_lo, log_hi))
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.double().argmax(dim=1, keepdim=True)
        w, h = w.gather(1, first), h.gather(1, first)
        top = torch.floor(torch.rand(batch, 1, dtype=torch.float64) * (height - h + 1))
        left = torch.floor(torch.rand(batch, 1, dtype=torch.float64) * (width - w + 1))
        # fallback: center crop of the whole image, clamped to the ratio range
        in_ratio = width / height
        fw = torch.where(in_ratio > self.ratio[1], (height * self.ratio[1]).round(), width)
        fh = torch.where(in_ratio < self.ratio[0], (width / self.ratio[0]).round(), height)
        none = ~fits.any(dim=1, keepdim=True)
        w, h = torch.where(none, fw, w), torch.where(none, fh, h)
        top = torch.where(none, torch.div(height - h, 2, rounding_mode="floor"), top)
        left = torch.where(none, torch.div(width - w, 2, rounding_mode="floor"), left)
        return torch.cat([left, top, left + w, top + h], dim=1).float()

    def sample_erase(self, batch: int) -> torch.Tensor:
        """Rectangles ``(top, left, height, width)`` in the output image; height 0 where nothing is erased.

        Vectorised ``RandomErasing.get_params``: with probability ``random_erasing``, ten tries at a random
        area fraction and log-uniform aspect ratio, the first that fits wins; if none fits, nothing is erased.
        """
        size = self.preprocessing.image_size
        area = size * size
        log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        target = area * torch.empty(batch, _ATTEMPTS, dtype=torch.float64).uniform_(*ERASE_SCALE)
        aspect = torch.exp(torch.empty(batch, _ATTEMPTS, dtype=torch.float64).uniform_(log_lo, log_hi))
        h = torch.sqrt(target * aspect).round()
        w = torch.sqrt(target / aspect).round()
        fits = (h < size) & (w < size)
        first = fits.double().argmax(dim=1, keepdim=True)
        h, w = h.gather(1, first), w.gather(1, first)
        top = torch.floor(torch.rand(batch, 1, dtype=torch.float64) * (size - h + 1))
        left = torch.floor(torch.rand(batch, 1, dtype=torch.float64) * (size - w + 1))
        chosen = fits.any(dim=1, keepdim=True) & (torch.rand(batch, 1) < self.preprocessing.random_erasing)
        h = torch.where(chosen, h, torch.zeros_like(h))
        return torch.cat([top, left, h, w], dim=1).long()

    def collate(self, samples: list[tuple[torch.Tensor, int]]) -> UInt8Batch:
        """Pad uint8 images (3, h, w) of different sizes into one batch and draw their random parameters."""
        p = self.preprocessing
        sizes = torch.tensor([image.shape[1:] for image, _ in samples], dtype=torch.int64)
        batch = len(samples)
        # one spare row and column: bilinear sampling at the right/bottom edge reads one pixel beyond it
        images = torch.zeros(batch, 3, int(sizes[:, 0].max()) + 1, int(sizes[:, 1].max()) + 1, dtype=torch.uint8)
        for b, (image, _) in enumerate(samples):
            h, w = image.shape[1:]
            images[b, :, :h, :w] = image
            images[b, :, :h, w] = image[:, :, -1]
            images[b, :, h, : w + 1] = images[b, :, h - 1, : w + 1]
        boxes = torch.cat([torch.arange(batch, dtype=torch.float32)[:, None], self.sample_boxes(sizes)], dim=1)
        flip = torch.rand(batch) < 0.5 if p.hflip else torch.zeros(batch, dtype=torch.bool)
        j = p.color_jitter
        jitter = torch.empty(batch, 3).uniform_(max(0.0, 1 - j), 1 + j) if j > 0 else torch.ones(batch, 3)
        erase = self.sample_erase(batch) if p.random_erasing > 0 else torch.zeros(batch, 4, dtype=torch.int64)
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        return UInt8Batch(images, boxes, flip, jitter, erase, labels)

    def apply(self, batch: UInt8Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop, resize, flip, jitter, normalise and erase on the batch's device; float32 (B, 3, S, S) and labels."""
        p = self.preprocessing
        size = p.image_size
        x = roi_align(
            batch.images.float(),
            batch.boxes.to(torch.float32),
            output_size=(size, size),
            sampling_ratio=-1,
            aligned=True,
        )
        x = torch.where(batch.flip[:, None, None, None], x.flip(-1), x)
        if p.color_jitter > 0:
            x = _jitter(x / 255.0, batch.jitter) * 255.0
        mean = torch.tensor(p.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(p.std, device=x.device).view(1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
        if p.random_erasing > 0:
            x = _erase(x, batch.erase.to(x.device))
        return x, batch.labels


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-image brightness, contrast and saturation (in that order) on images in [0, 1]."""
    grey_weights = torch.tensor(_GREY, device=x.device).view(1, 3, 1, 1)
    brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * brightness).clamp(0, 1)
    mean = (x * grey_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
    grey = (x * grey_weights).sum(1, keepdim=True)
    return (saturation * x + (1 - saturation) * grey).clamp(0, 1)


def _erase(x: torch.Tensor, rects: torch.Tensor) -> torch.Tensor:
    """Zero (the mean colour, after normalisation) each image's rectangle ``(top, left, height, width)``."""
    rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    top, left, height, width = (rects[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return x.masked_fill(inside[:, None], 0.0)
