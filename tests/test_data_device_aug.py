"""``dogbreed.data.device_aug``: batch augmentation on the device matches the CPU transforms and is seeded."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from dogbreed.data.device_aug import BatchAugment, UInt8Batch
from dogbreed.transforms import Preprocessing

from .conftest import datamodule, smooth_image


def test_box_sampling_follows_random_resized_crop():
    torch.manual_seed(0)
    aug = BatchAugment(Preprocessing(image_size=24, resize_size=28, crop_scale=(0.2, 0.9)))
    sizes = torch.tensor([[28, 40], [50, 28], [28, 28]]).repeat(200, 1)
    boxes = aug.sample_boxes(sizes)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    assert (w == w.round()).all() and (h == h.round()).all()
    area = w * h / (sizes[:, 0] * sizes[:, 1])
    assert area.min() > 0.15 and area.max() < 0.95  # crop_scale, give or take the rounding to whole pixels
    assert (w / h).min() > 0.7 and (w / h).max() < 1.43
    # nothing fits: the whole-image fallback, clamped to the ratio range and centred
    tall = BatchAugment(Preprocessing(crop_scale=(1.0, 1.0))).sample_boxes(torch.tensor([[100, 10]]))
    assert tall.tolist() == [[0.0, 43.0, 10.0, 56.0]]


def test_device_augmentation_matches_cpu_augmentation_shapes_dtype_and_ranges(varied, tmp_path):
    torch.manual_seed(0)
    p = Preprocessing(image_size=24, resize_size=28, color_jitter=0.4)
    dm = datamodule(varied, tmp_path, device_augment=True, color_jitter=0.4, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, UInt8Batch) and batch.images.dtype == torch.uint8
    x, y = dm.on_after_batch_transfer(batch, 0)
    cpu = torch.stack([p.train_transform()(dm.datasets["train"][i][0]) for i in range(8)])
    assert x.shape == cpu.shape == (8, 3, 24, 24) and x.dtype == cpu.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (8,)
    lo = (0 - torch.tensor(p.mean)) / torch.tensor(p.std)
    hi = (1 - torch.tensor(p.mean)) / torch.tensor(p.std)
    for out in (x, cpu):
        per_channel = out.transpose(0, 1).reshape(3, -1)
        assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
    assert abs(float(x.mean()) - float(cpu.mean())) < 0.5 and torch.isfinite(x).all()


def test_device_crop_of_the_whole_image_equals_the_cpu_resize():
    """Geometry check: a full-image crop through roi_align is the same bilinear resize (no half-pixel shift)."""
    p = Preprocessing(image_size=32, resize_size=32, crop_scale=(1.0, 1.0), hflip=False)
    image = torch.from_numpy(np.array(smooth_image(48, 48))).permute(2, 0, 1).contiguous()
    x, _ = BatchAugment(p).apply(BatchAugment(p).collate([(image, 0)]))
    reference = p.eval_transform()(image)  # resize 48 -> 32 (antialiased), center crop of the whole
    assert (x[0] - reference).abs().max() < 0.1
    upsample = Preprocessing(image_size=64, resize_size=64, crop_scale=(1.0, 1.0), hflip=False)
    x, _ = BatchAugment(upsample).apply(BatchAugment(upsample).collate([(image, 0)]))
    assert (x[0] - upsample.eval_transform()(image)).abs().max() < 0.05


def test_flip_mirrors_the_image():
    p = Preprocessing(image_size=16, resize_size=16, crop_scale=(1.0, 1.0))
    image = torch.arange(16, dtype=torch.uint8).repeat(3, 16, 1) * 10
    aug = BatchAugment(p)
    batch = aug.collate([(image, 0), (image, 1)])
    batch = batch._replace(flip=torch.tensor([False, True]))
    x, _ = aug.apply(batch)
    assert torch.allclose(x[1], x[0].flip(-1), atol=1e-5)


@pytest.mark.parametrize("device_augment", [False, True])
def test_a_fixed_seed_gives_the_same_batches_twice(varied, tmp_path, device_augment):
    def two_batches() -> list[torch.Tensor]:
        L.seed_everything(7, workers=True)
        dm = datamodule(varied, tmp_path, device_augment=device_augment, batch_size=4, num_workers=1)
        return [dm.on_after_batch_transfer(b, 0)[0] for _, b in zip(range(2), dm.train_dataloader(), strict=False)]

    first, second = two_batches(), two_batches()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    L.seed_everything(8, workers=True)
    dm = datamodule(varied, tmp_path, device_augment=device_augment, batch_size=4, num_workers=1)
    assert not torch.equal(dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)[0], first[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_device_augmentation_matches_the_cpu_result(varied, tmp_path):
    torch.manual_seed(0)
    dm = datamodule(varied, tmp_path, device_augment=True, batch_size=8, color_jitter=0.3)
    batch = next(iter(dm.train_dataloader()))
    on_cpu, _ = dm.on_after_batch_transfer(batch, 0)
    cuda_batch = UInt8Batch(*(t.cuda(non_blocking=True) for t in batch))
    on_gpu, labels = dm.on_after_batch_transfer(cuda_batch, 0)
    assert on_gpu.is_cuda and labels.is_cuda and on_gpu.dtype == torch.float32
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-3)


def test_random_erasing_rectangles_follow_random_erasing_on_cpu_and_device():
    torch.manual_seed(0)
    p = Preprocessing(image_size=28, resize_size=28, crop_scale=(1.0, 1.0), hflip=False, random_erasing=0.5)
    aug = BatchAugment(p)
    rects = aug.sample_erase(4000)
    erased = rects[:, 2] > 0
    assert 0.45 < erased.float().mean() < 0.55
    top, left, h, w = rects[erased].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).float() / 28**2
    assert area.min() >= 0.015 and area.max() <= 0.35  # scale (0.02, 0.33), give or take whole pixels
    image = torch.full((3, 28, 28), 200, dtype=torch.uint8)
    grey = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    always = BatchAugment(
        Preprocessing(image_size=28, resize_size=28, crop_scale=(1.0, 1.0), random_erasing=1.0, **grey)
    )
    x, _ = always.apply(always.collate([(image, 0)] * 16))
    cpu = torch.stack([always.preprocessing.train_transform()(image) for _ in range(16)])
    for out in (x, cpu):  # every image has one erased rectangle at the mean colour, the rest untouched
        zero = (out == 0).all(dim=1)
        assert zero.any(dim=(1, 2)).all()
        assert torch.allclose(out[~zero[:, None].expand_as(out)], torch.tensor((200 / 255 - 0.5) / 0.5), atol=1e-4)
    with pytest.raises(ValueError, match=r"random_erasing=1.5 is a probability"):
        Preprocessing(random_erasing=1.5)
