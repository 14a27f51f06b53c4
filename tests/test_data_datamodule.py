"""``dogbreed.data.datamodule``: the fast data path's options are checked, and ``auto`` resolves per accelerator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from dogbreed._io import available_cpus
from dogbreed.data import DogBreedDataModule
from dogbreed.data.decode import (
    auto_num_workers,
)
from dogbreed.data.device_aug import UInt8Batch

from .conftest import SMALL


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
