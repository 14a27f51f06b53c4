"""The fast data path: decode_jpeg decoder, decoded-image cache, batch augmentation on the device."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from omegaconf import open_dict
from PIL import Image

from dogbreed._io import available_cpus
from dogbreed.config import CONFIG_DIR
from dogbreed.data import DogBreedDataModule
from dogbreed.data import cache as cache_module
from dogbreed.data.cache import (
    INDEX,
    META,
    CachedImageDataset,
    DecodedImageCache,
    estimate_bytes,
    load_or_build,
    shard_name,
)
from dogbreed.data.decode import (
    DecodedImageDataset,
    auto_num_workers,
    decode_jpegs_resized,
    decodes_on_device,
    read_rgb,
)
from dogbreed.data.device_aug import BatchAugment, UInt8Batch
from dogbreed.models import DogBreedClassifier
from dogbreed.train import train
from dogbreed.transforms import Preprocessing, load_rgb

DATA = shard_name(0)  # the one pixel file of a cache built without worker processes
DEMO_MIN_TEST_ACC = 0.5  # the band the plain demo is held to (tests/test_train.py)

# small settings so that every test runs in well under a second
SMALL = {"image_size": 24, "resize_size": 28, "crop_scale": (0.3, 1.0), "verify_images": False, "num_workers": 0}


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    blobs = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blobs).resize((width, height), Image.BICUBIC)


def write_varied_folder(root: Path) -> Path:
    """Three classes of JPEGs of different sizes and orientations, plus a PNG and a greyscale JPEG."""
    sizes = [(40, 32), (33, 50), (64, 48), (30, 30)]
    for split in ("train", "valid", "test"):
        for c in range(3):
            folder = root / split / f"{c + 1:03d}.Class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, (w, h) in enumerate(sizes):
                smooth_image(w, h, seed=100 * c + i).save(folder / f"img{i}.jpg", quality=90)
            smooth_image(36, 44, seed=c).save(folder / "img_png.png")
            smooth_image(44, 36, seed=c).convert("L").save(folder / "img_grey.jpg", quality=90)
    return root


@pytest.fixture
def varied(tmp_path: Path) -> Path:
    return write_varied_folder(tmp_path / "data")


def add_odd_jpegs(root: Path) -> None:
    """A CMYK and an EXIF-rotated JPEG: a batched device decode would get both wrong, so the CPU decodes them."""
    folder = root / "train" / "001.Class0"
    smooth_image(40, 30, seed=5).convert("CMYK").save(folder / "img_cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    smooth_image(40, 30, seed=6).save(folder / "img_rotated.jpg", exif=exif.tobytes(), quality=90)


def datamodule(root: Path, tmp_path: Path, **kwargs) -> DogBreedDataModule:
    dm = DogBreedDataModule(root, cache_dir=tmp_path / "cache", **{**SMALL, **kwargs})
    dm.setup()
    return dm


def cache_folder(dm: DogBreedDataModule) -> Path:
    return dm.datasets["train"].cache.folder


# --- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_jpeg_gives_the_same_rgb_pixels_as_pil(tmp_path, mode):
    path = tmp_path / "a.jpg"
    smooth_image(50, 37).convert(mode).save(path, quality=90)
    image = read_rgb(path, "torchvision")
    assert image.dtype == torch.uint8 and image.shape == (3, 37, 50)
    assert torch.equal(image, read_rgb(path, "pil"))


def test_decode_applies_exif_rotation_like_pil(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    path = tmp_path / "rotated.jpg"
    smooth_image(40, 30).save(path, exif=exif.tobytes(), quality=90)
    assert read_rgb(path).shape == (3, 40, 30)
    assert torch.equal(read_rgb(path), read_rgb(path, "pil"))
    assert estimate_bytes(tmp_path, ["rotated.jpg"], 20) == 3 * 26 * 20  # short side 30 -> 20, long 40 -> 26


def test_other_formats_fall_back_to_pil(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent: composited over white like load_rgb does
    Image.fromarray(rgba).save(tmp_path / "a.png")
    expected = torch.from_numpy(np.array(load_rgb(tmp_path / "a.png"))).permute(2, 0, 1)
    assert torch.equal(read_rgb(tmp_path / "a.png"), expected)
    assert int(expected.min()) == 255


def test_unreadable_file_is_named_in_the_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"bad\.jpg cannot be decoded"):
        DecodedImageDataset(tmp_path, [("bad.jpg", 0)], None)[0]


# --- the decoded-image cache ----------------------------------------------------------------------------


def test_cached_and_uncached_eval_tensors_are_identical_and_equal_serving(varied, tmp_path):
    cached = datamodule(varied, tmp_path, cache=True)
    uncached = datamodule(varied, tmp_path, cache=False, decoder="pil")
    assert isinstance(cached.datasets["valid"], CachedImageDataset)
    assert isinstance(uncached.datasets["valid"], DecodedImageDataset)
    serving = cached.preprocessing.eval_transform()
    for split in ("valid", "test"):
        for i, (rel, label) in enumerate(cached.index.samples[split]):
            x, y = cached.datasets[split][i]
            x2, y2 = uncached.datasets[split][i]
            assert y == y2 == label and x.shape == (3, 24, 24) and x.dtype == torch.float32
            assert torch.equal(x, x2), rel
            assert torch.equal(x, serving(load_rgb(varied / rel))), rel


def test_cache_reports_its_size_before_writing_and_matches_the_estimate(varied, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dogbreed.data.cache"):
        dm = datamodule(varied, tmp_path)
    folder = cache_folder(dm)
    meta = json.loads((folder / META).read_text())
    files = sorted({rel for s in dm.index.samples.values() for rel, _ in s})
    assert meta["shards"] == {DATA: (folder / DATA).stat().st_size}
    assert dm.datasets["train"].cache.nbytes == estimate_bytes(varied, files, 28)
    messages = [r.getMessage() for r in caplog.records]
    announce = next(i for i, m in enumerate(messages) if "need" in m and "GB" in m)
    built = next(i for i, m in enumerate(messages) if m.startswith("Cached"))
    assert announce < built


def test_a_cache_built_by_worker_processes_equals_one_built_in_process(varied, tmp_path):
    in_process = datamodule(varied, tmp_path / "a")
    by_workers = datamodule(varied, tmp_path / "b", num_workers=2)
    assert len(by_workers.datasets["train"].cache.shard_bytes) == 2
    one, two = in_process.datasets["train"].cache, by_workers.datasets["train"].cache
    assert all(torch.equal(one[i], two[i]) for i in range(len(one)))


def test_a_second_run_reuses_the_cache(varied, tmp_path, caplog):
    first = datamodule(varied, tmp_path)
    mtime = (cache_folder(first) / DATA).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="dogbreed.data.cache"):
        second = datamodule(varied, tmp_path)
    assert (cache_folder(second) / DATA).stat().st_mtime_ns == mtime
    assert any("Using the decoded-image cache" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["half_written", "truncated", "corrupted", "bad_index"])
def test_damaged_cache_is_detected_and_rebuilt(varied, tmp_path, caplog, damage):
    dm = datamodule(varied, tmp_path)
    folder = cache_folder(dm)
    expected = [dm.datasets["valid"][i][0] for i in range(len(dm.datasets["valid"]))]
    data = folder / DATA
    if damage == "half_written":  # killed mid-build: partial temp file, no completion marker
        (folder / META).unlink()
        (folder / f".{DATA}.123.tmp").write_bytes(data.read_bytes()[:100])
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "corrupted":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        np.save(folder / INDEX, np.zeros((3, 3), np.int64))
    with caplog.at_level(logging.INFO, logger="dogbreed.data.cache"):
        rebuilt = datamodule(varied, tmp_path)
    assert any(r.getMessage().startswith("Cached") for r in caplog.records), "the cache was not rebuilt"
    if damage != "half_written":
        assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert not list(folder.glob(".*.tmp"))
    assert all(torch.equal(rebuilt.datasets["valid"][i][0], x) for i, x in enumerate(expected))


def test_changing_resize_or_dataset_invalidates_the_cache(varied, tmp_path, caplog):
    dm = datamodule(varied, tmp_path)
    key = json.loads((cache_folder(dm) / META).read_text())["key"]
    with caplog.at_level(logging.WARNING, logger="dogbreed.data.cache"):
        resized = datamodule(varied, tmp_path, resize_size=32)
    key_resized = json.loads((cache_folder(resized) / META).read_text())["key"]
    assert key_resized != key and resized.datasets["train"].cache[0].shape[1:].numel() > 0
    assert min(resized.datasets["train"].cache[0].shape[1:]) == 32
    assert "changed" in caplog.text

    rel = resized.index.samples["valid"][0][0]
    smooth_image(40, 32, seed=999).save(varied / rel, quality=90)  # the same file, new content
    os.utime(varied / rel, ns=(1, 1))
    changed = datamodule(varied, tmp_path, resize_size=32)
    assert json.loads((cache_folder(changed) / META).read_text())["key"] != key_resized
    x, _ = changed.datasets["valid"][0]
    assert torch.equal(x, changed.preprocessing.eval_transform()(load_rgb(varied / rel)))


def build(root: Path, folder: Path, **kwargs) -> tuple[DecodedImageCache, list[str]]:
    """A cache of every file under ``root`` (short side 28), and the files in cache order."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    p = Preprocessing(image_size=24, resize_size=28)
    return load_or_build(folder, root, files, p, max_bytes=10**9, **kwargs), files


def test_decodes_on_device_turns_away_what_a_batched_decode_gets_wrong(varied, tmp_path):
    add_odd_jpegs(varied)
    folder = varied / "train" / "001.Class0"
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    eligible = {
        folder / "img0.jpg": True,
        folder / "img_grey.jpg": True,
        folder / "img_png.png": False,
        folder / "img_cmyk.jpg": False,
        folder / "img_rotated.jpg": False,
        tmp_path / "bad.jpg": False,
    }
    assert {path: decodes_on_device(path.read_bytes()) for path in eligible} == eligible


def test_batched_decode_on_the_cpu_equals_the_per_image_decode(varied):
    """The batched function a GPU build calls, run on the CPU: libjpeg-turbo, the same pixels as read_rgb."""
    resize = Preprocessing(image_size=16, resize_size=20).resize_transform()
    paths = sorted(p for p in varied.rglob("*.jpg") if decodes_on_device(p.read_bytes()))[:6]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    images = decode_jpegs_resized(encoded, resize, "cpu")
    assert len(images) == len(paths)
    for path, image in zip(paths, images, strict=True):
        assert image.device.type == "cpu" and torch.equal(image, resize(read_rgb(path))), path


@pytest.mark.parametrize("reject", [False, True])
def test_a_cache_built_in_device_batches_equals_the_per_image_build(varied, tmp_path, monkeypatch, caplog, reject):
    """The build path a GPU takes, on the CPU: workers read, batches are decoded here, odd files go the CPU way,
    and a batch the device decoder rejects is decoded on the CPU image by image."""
    add_odd_jpegs(varied)
    monkeypatch.setattr(cache_module, "DEVICE_BATCH", 8)
    batches: list[int] = []

    def decode(encoded, resize, device):
        batches.append(len(encoded))
        if reject and len(batches) == 2:
            raise RuntimeError("nvjpeg rejected one of these")
        return decode_jpegs_resized(encoded, resize, device)

    monkeypatch.setattr(cache_module, "decode_jpegs_resized", decode)
    per_image, files = build(varied, tmp_path / "per-image")
    with caplog.at_level(logging.INFO, logger="dogbreed.data.cache"):
        batched, _ = build(varied, tmp_path / "batched", device="cpu", num_workers=2)
    assert len(batched) == len(per_image) == len(files) == 56
    assert all(torch.equal(per_image[i], batched[i]) for i in range(len(files)))
    assert sum(batches) == 45  # 3 splits x 3 classes x 5 upright RGB or greyscale JPEGs
    assert f"Decoded {45 - batches[1] if reject else 45} of 56 images on cpu" in caplog.text


def test_cache_larger_than_the_limit_is_not_written(varied, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dogbreed.data.cache"):
        dm = datamodule(varied, tmp_path, cache_max_gb=1e-6)
    assert isinstance(dm.datasets["train"], DecodedImageDataset)
    assert "exceeds data.cache_max_gb" in caplog.text
    assert not list((tmp_path / "cache").rglob(DATA))


# --- augmentation on the device -------------------------------------------------------------------------


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


# --- options ----------------------------------------------------------------------------------------------


def test_options_are_checked_with_clear_errors(varied, tmp_path):
    with pytest.raises(ValueError, match=r"data.decoder='turbo'.*\['torchvision', 'pil'\]"):
        DogBreedDataModule(varied, decoder="turbo")
    with pytest.raises(ValueError, match=r"data\.device_augment must be true, false or auto"):
        DogBreedDataModule(varied, device_augment="gpu")
    with pytest.raises(ValueError, match=r"data\.num_workers must be an integer >= 0 or 'auto'"):
        DogBreedDataModule(varied, num_workers=-1)
    dm = DogBreedDataModule(varied, num_workers="auto", persistent_workers=True)
    assert dm.num_workers == auto_num_workers() == max(1, available_cpus() - 1)
    assert dm.persistent_workers
    with pytest.raises(ValueError, match=r"data\.cache_decode_device must be auto, cpu or cuda, got 'gpu'"):
        DogBreedDataModule(varied, cache_decode_device="gpu")
    with pytest.raises(ValueError, match=r"data\.decoder='pil': set data\.decoder=torchvision"):
        DogBreedDataModule(varied, decoder="pil", cache_decode_device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use auto or cpu"):
            DogBreedDataModule(varied, cache_decode_device="cuda")


@pytest.mark.parametrize(
    ("accelerator", "decoder", "setting", "expected"),
    [
        (None, "torchvision", "auto", None),
        (CPUAccelerator, "torchvision", "auto", None),
        (CUDAAccelerator, "torchvision", "auto", "cuda" if torch.cuda.is_available() else None),
        (CUDAAccelerator, "pil", "auto", None),
        (CUDAAccelerator, "torchvision", "cpu", None),
    ],
)
def test_cache_decode_device_auto_is_cuda_only_when_training_on_a_gpu(varied, accelerator, decoder, setting, expected):
    dm = DogBreedDataModule(varied, decoder=decoder, cache_decode_device=setting)
    if accelerator is not None:
        dm.trainer = SimpleNamespace(accelerator=accelerator())
    assert dm._resolve_cache_decode_device() == expected


@pytest.mark.parametrize(
    ("accelerator", "on_device"), [(None, False), (CPUAccelerator, False), (CUDAAccelerator, True)]
)
def test_device_augment_auto_is_on_only_with_an_accelerator(varied, tmp_path, accelerator, on_device):
    dm = DogBreedDataModule(varied, cache_dir=tmp_path / "cache", **SMALL)
    if accelerator is not None:
        dm.trainer = SimpleNamespace(accelerator=accelerator())
    dm.setup()
    assert dm.augment_on_device is on_device
    assert isinstance(next(iter(dm.train_dataloader())), UInt8Batch) is on_device


def test_compile_keeps_the_state_dict_keys():
    plain = DogBreedClassifier(num_classes=3, weights=None)
    compiled = DogBreedClassifier(num_classes=3, weights=None, compile=True)
    assert list(compiled.net.state_dict()) == list(plain.net.state_dict())


@pytest.mark.slow
def test_demo_trains_to_the_same_accuracy_band_with_the_fast_options(demo_cfg):
    torch.set_num_threads(1)  # one thread is faster than two fighting other processes on a small CI machine
    with open_dict(demo_cfg):
        demo_cfg.trainer.max_epochs = 1  # one full epoch reaches about 0.65, clear of the band
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            demo_cfg.trainer.pop(key)
        demo_cfg.data.update(decoder="torchvision", cache=True, device_augment=True)
    metrics = train(demo_cfg)
    assert metrics["test/acc"] >= DEMO_MIN_TEST_ACC, metrics
    assert list(Path(demo_cfg.paths.cache_dir).rglob(DATA)), "the demo did not use the decoded-image cache"


# --- GPU (skipped without CUDA) -------------------------------------------------------------------------


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cache_built_with_nvjpeg_is_close_to_the_cpu_built_one(varied, tmp_path, caplog):
    """Same shapes and dtype; nvjpeg's pixels within torchvision's own tolerance of libjpeg-turbo's (mean
    absolute difference < 2 levels), and identical for the files the CPU decodes either way."""
    add_odd_jpegs(varied)
    on_cpu = datamodule(varied, tmp_path / "cpu", cache_decode_device="cpu")
    with caplog.at_level(logging.INFO, logger="dogbreed.data.cache"):
        on_gpu = datamodule(varied, tmp_path / "gpu", cache_decode_device="cuda", num_workers=2)
    assert "Decoded 45 of 56 images on cuda" in caplog.text
    cpu_cache, gpu_cache = on_cpu.datasets["train"].cache, on_gpu.datasets["train"].cache
    files = sorted({rel for s in on_cpu.index.samples.values() for rel, _ in s})
    assert len(cpu_cache) == len(gpu_cache) == len(files)
    for i, rel in enumerate(files):
        a, b = cpu_cache[i], gpu_cache[i]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8, rel
        if decodes_on_device((varied / rel).read_bytes()):
            assert (a.float() - b.float()).abs().mean() < 2, rel
        else:
            assert torch.equal(a, b), rel
    keys = [json.loads((cache_folder(dm) / META).read_text())["key"] for dm in (on_cpu, on_gpu)]
    assert keys[0] != keys[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_preset_trains_the_demo_with_amp_channels_last_cache_and_device_augmentation(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["experiment=demo", "preset=gpu"])
    with open_dict(cfg):
        cfg.paths.update(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
        cfg.paths.model_dir = str(tmp_path / "run" / "model")
        cfg.trainer.update(max_epochs=1, limit_train_batches=8, limit_val_batches=2, limit_test_batches=2)
        cfg.trainer.enable_progress_bar = False
        cfg.callbacks.pop("progress_bar", None)
        cfg.data.num_workers = 1
    assert cfg.trainer.accelerator == "gpu" and cfg.data.device_augment == "auto" and cfg.data.cache
    metrics = train(cfg)
    assert cfg.data.pin_memory and cfg.data.persistent_workers
    assert cfg.trainer.precision in ("bf16-mixed", "16-mixed") and cfg.model.channels_last
    assert math.isfinite(metrics["test/loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_channels_last_model_runs_under_autocast():
    model = DogBreedClassifier(num_classes=3, weights=None, channels_last=True, compile=True).cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        assert model(x).shape == (4, 3)
