"""``DogBreedDataModule``: stage, check and load a dataset in the dogImages layout."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from torch.utils.data import DataLoader, Dataset

from dogbreed._io import default_cache_dir
from dogbreed.data.cache import CachedImageDataset, DecodedImageCache, load_or_build
from dogbreed.data.decode import DecodedImageDataset, auto_num_workers, check_decoder
from dogbreed.data.device_aug import BatchAugment, UInt8Batch
from dogbreed.data.layout import DataError, DatasetIndex, build_index, write_report
from dogbreed.data.staging import S3Retry, stage, state_dir
from dogbreed.rundir import DATA_REPORT
from dogbreed.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

log = logging.getLogger(__name__)


class DogBreedDataModule(L.LightningDataModule):
    """Train/valid/test loaders for ``<source>/{train,valid,test}/<class folder>/<image>``.

    Args:
        source: Local folder, ``s3://bucket/prefix`` or ``https://...zip``.
        cache_dir: Where remote sources are staged and checks are cached (default ``~/.cache/dogbreed``).
        endpoint_url: S3 endpoint for S3-compatible servers (``AWS_ENDPOINT_URL`` also works).
        s3_retry: Keyword arguments of :class:`~dogbreed.data.staging.S3Retry`: how long staging rides out a
            flaky S3 before it gives up on an object.
        num_classes: Expected class count; ``None`` accepts whatever the data has.
        batch_size: Images per batch (per device under DDP).
        num_workers: DataLoader worker processes; ``auto`` uses every available core but one.
        pin_memory: Page-locked batches for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs.
        verify_images: Decode every image once to exclude corrupt files before training.
        train_per_class: Train on at most this many images of each class (the same seeded pick in every run):
            small-data experiments such as the transfer benchmark; ``None`` trains on every image.
        follow_symlinks: Train on files that symlinks lead to outside the dataset folder (otherwise they are
            excluded and listed in the data report, like dangling links).
        image_size, resize_size, mean, std, crop_scale, hflip, color_jitter, random_erasing: see
            :class:`Preprocessing`.
        decoder: ``torchvision`` (libjpeg-turbo for JPEGs, PIL for other formats) or ``pil``; same pixels.
        cache: Decode each image once into a memory-mapped uint8 cache (short side ``resize_size``) in the
            source's state folder under ``cache_dir``; later epochs and runs skip decoding.
        cache_max_gb: Largest cache to write; above it (or the free disk space) images are decoded every epoch.
        cache_decode_device: Where building the cache decodes JPEGs: ``cuda`` (batched nvjpeg, resized on the
            GPU: much faster than the CPU workers, pixels within a level or two of theirs), ``cpu``, or
            ``auto``: ``cuda`` when the trainer trains on a CUDA GPU and ``decoder`` is ``torchvision``.
        device_augment: Random-resized-crop, flip, jitter and normalisation of training batches after they
            reach the device, so workers only move uint8; ``auto``: on when the trainer uses an accelerator.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        cache_dir: str | Path | None = None,
        endpoint_url: str | None = None,
        s3_retry: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        batch_size: int = 32,
        num_workers: int | Literal["auto"] = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        verify_images: bool = True,
        follow_symlinks: bool = False,
        train_per_class: int | None = None,
        image_size: int = 224,
        resize_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
        random_erasing: float = 0.0,
        decoder: str = "torchvision",
        cache: bool = True,
        cache_max_gb: float = 20.0,
        cache_decode_device: Literal["auto", "cpu", "cuda"] = "auto",
        device_augment: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}.")
        if num_workers == "auto":
            num_workers = auto_num_workers()
        elif not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0 or 'auto', got {num_workers!r}.")
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(f"data.train_per_class must be >= 1 or null (every image), got {train_per_class}.")
        if device_augment not in (True, False, "auto"):
            raise ValueError(f"data.device_augment must be true, false or auto, got {device_augment!r}.")
        if cache_decode_device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"data.cache_decode_device must be auto, cpu or cuda, got {cache_decode_device!r}.")
        if cache_decode_device == "cuda" and decoder != "torchvision":
            raise ValueError(
                f"data.cache_decode_device=cuda decodes with torchvision (nvjpeg), but data.decoder={decoder!r}: "
                "set data.decoder=torchvision, or data.cache_decode_device=auto."
            )
        if cache_decode_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("data.cache_decode_device=cuda but CUDA is not available here; use auto or cpu.")
        self.source = str(source)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.endpoint_url = endpoint_url
        self.s3_retry = S3Retry(**(s3_retry or {}))
        self.expected_num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.verify_images = verify_images
        self.follow_symlinks = follow_symlinks
        self.train_per_class = train_per_class
        self.preprocessing = Preprocessing(
            image_size=image_size, resize_size=resize_size, mean=tuple(mean), std=tuple(std),
            crop_scale=tuple(crop_scale), hflip=hflip, color_jitter=color_jitter, random_erasing=random_erasing,
        )  # fmt: skip
        self.decoder = check_decoder(decoder)
        self.cache = cache
        self.cache_max_gb = cache_max_gb
        self.cache_decode_device = cache_decode_device
        self.device_augment = device_augment
        self.batch_augment = BatchAugment(self.preprocessing)
        self.augment_on_device = False
        self._index: DatasetIndex | None = None
        self.datasets: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        """Stage and check the data (safe to call from several processes: staging is file-locked)."""
        self._load_index()

    def _load_index(self) -> DatasetIndex:
        if self._index is None:
            root = stage(self.source, self.cache_dir, endpoint_url=self.endpoint_url, s3_retry=self.s3_retry)
            index = build_index(
                root,
                verify=self.verify_images,
                index_dir=state_dir(self.source, self.cache_dir),
                follow_symlinks=self.follow_symlinks,
            )
            if self.expected_num_classes is not None and len(index.classes) != self.expected_num_classes:
                raise DataError(
                    f"data.num_classes={self.expected_num_classes} but {self.source} has {len(index.classes)} class "
                    f"folders: set data.num_classes={len(index.classes)} (or null to take it from the data)."
                )
            self._index = index
        return self._index

    def write_report(self, directory: str | Path) -> Path:
        """Write the data report (counts, excluded files and why) into ``directory``, e.g. the run dir."""
        path = Path(directory) / DATA_REPORT
        write_report(self.index, path)
        return path

    @property
    def index(self) -> DatasetIndex:
        return self._load_index()

    @property
    def num_classes(self) -> int:
        return len(self.index.classes)

    @property
    def class_names(self) -> list[str]:
        """Display names in label order (``001.Affenpinscher`` -> ``Affenpinscher``)."""
        return self.index.class_names

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        index = self.index
        self.augment_on_device = self._resolve_device_augment()
        self.datasets = self._make_datasets(index, self._open_cache(index) if self.cache else None)
        counts = {split: len(ds) for split, ds in self.datasets.items()}
        log.info("Data %s: %d classes, %s images", index.root, len(index.classes), counts)

    def _resolve_device_augment(self) -> bool:
        if self.device_augment == "auto":
            return self.trainer is not None and not isinstance(self.trainer.accelerator, CPUAccelerator)
        return bool(self.device_augment)

    def _resolve_cache_decode_device(self) -> str | None:
        """``cuda`` to decode the cache's JPEGs in batches on the GPU, None to decode them in the CPU workers."""
        if self.cache_decode_device == "auto":
            on_cuda = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
            use_cuda = on_cuda and self.decoder == "torchvision" and torch.cuda.is_available()
            return "cuda" if use_cuda else None
        return "cuda" if self.cache_decode_device == "cuda" else None

    def _open_cache(self, index: DatasetIndex) -> DecodedImageCache | None:
        folder = state_dir(self.source, self.cache_dir) / "decoded-images"
        return load_or_build(
            folder, index.root, _all_files(index), self.preprocessing,
            decoder=self.decoder, max_bytes=int(self.cache_max_gb * 1e9), num_workers=self.num_workers,
            device=self._resolve_cache_decode_device(),
        )  # fmt: skip

    def _make_datasets(self, index: DatasetIndex, cache: DecodedImageCache | None) -> dict[str, Dataset]:
        """Per split: cached or decoded images, then the CPU transform (none for device-augmented training).

        Training on the device, or from the cache, crops from the image resized to ``resize_size`` rather
        than from the original: workers then move small uint8 images.
        """
        p = self.preprocessing
        eval_tf = p.eval_transform()
        train_tf = p.train_transform()
        if self.augment_on_device:  # workers hand over uint8 images at short side resize_size
            train_tf = None if cache else p.resize_transform()
        datasets: dict[str, Dataset] = {}
        position = {rel: i for i, rel in enumerate(_all_files(index))}
        for split, samples in index.samples.items():
            if split == "train" and self.train_per_class is not None:
                samples = _per_class(samples, self.train_per_class)
            transform = train_tf if split == "train" else eval_tf
            if cache is not None:
                positions = [position[rel] for rel, _ in samples]
                datasets[split] = CachedImageDataset(cache, positions, [label for _, label in samples], transform)
            else:
                datasets[split] = DecodedImageDataset(index.root, samples, transform, self.decoder)
        return datasets

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        on_device = split == "train" and self.augment_on_device
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=shuffle and len(self.datasets[split]) > self.batch_size,
            collate_fn=self.batch_augment.collate if on_device else None,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment uint8 training batches where they now are (the accelerator, or the CPU)."""
        if isinstance(batch, UInt8Batch):
            return self.batch_augment.apply(batch)
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def _per_class(samples: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """At most ``limit`` samples of each label: a seeded shuffle of the (sorted) files, so every run picks the same."""
    shuffled = sorted(samples)
    random.Random(0).shuffle(shuffled)
    taken: dict[int, int] = {}
    picked = []
    for rel, label in shuffled:
        if taken.get(label, 0) < limit:
            taken[label] = taken.get(label, 0) + 1
            picked.append((rel, label))
    return sorted(picked)


def _all_files(index: DatasetIndex) -> list[str]:
    """Every usable file of every split, in the order the decoded-image cache stores them."""
    return sorted({rel for samples in index.samples.values() for rel, _ in samples})
