"""``dogbreed.data.cache``: the decoded-image cache is exact, reused, rebuilt when damaged or stale, and bounded."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dogbreed.data import cache as cache_module
from dogbreed.data.cache import (
    INDEX,
    META,
    CachedImageDataset,
    DecodedImageCache,
    estimate_bytes,
    load_or_build,
)
from dogbreed.data.decode import (
    DecodedImageDataset,
    decode_jpegs_resized,
    decodes_on_device,
)
from dogbreed.transforms import Preprocessing, load_rgb

from .conftest import DATA, add_odd_jpegs, cache_folder, datamodule, smooth_image


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
