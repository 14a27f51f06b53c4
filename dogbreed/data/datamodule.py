"""``DogBreedDataModule``: stage, check and load a dataset in the dogImages layout."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dogbreed.data.layout import DataError, DatasetIndex, build_index
from dogbreed.data.staging import default_cache_dir, stage, state_dir
from dogbreed.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, load_rgb

log = logging.getLogger(__name__)


class ImageListDataset(Dataset):
    """(relative path, label) pairs under ``root``, decoded to RGB and transformed."""

    def __init__(self, root: Path, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.root = root
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        return self.transform(load_rgb(self.root / rel)), label


class DogBreedDataModule(L.LightningDataModule):
    """Train/valid/test loaders for ``<source>/{train,valid,test}/<class folder>/<image>``.

    Args:
        source: Local folder, ``s3://bucket/prefix`` or ``https://...zip``.
        cache_dir: Where remote sources are staged and checks are cached (default ``~/.cache/dogbreed``).
        endpoint_url: S3 endpoint for S3-compatible servers (``AWS_ENDPOINT_URL`` also works).
        num_classes: Expected class count; ``None`` accepts whatever the data has.
        batch_size: Images per batch (per device under DDP).
        num_workers: DataLoader worker processes.
        pin_memory: Page-locked batches for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs.
        verify_images: Decode every image once to exclude corrupt files before training.
        image_size, resize_size, mean, std, crop_scale, hflip, color_jitter: see :class:`Preprocessing`.
    """

    def __init__(
        self,
        source: str | Path,
        *,
        cache_dir: str | Path | None = None,
        endpoint_url: str | None = None,
        num_classes: int | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        verify_images: bool = True,
        image_size: int = 224,
        resize_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        color_jitter: float = 0.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}.")
        self.source = str(source)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.endpoint_url = endpoint_url
        self.expected_num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.verify_images = verify_images
        self.preprocessing = Preprocessing(
            image_size=image_size, resize_size=resize_size, mean=tuple(mean), std=tuple(std),
            crop_scale=tuple(crop_scale), hflip=hflip, color_jitter=color_jitter,
        )  # fmt: skip
        self._index: DatasetIndex | None = None
        self.datasets: dict[str, ImageListDataset] = {}

    def prepare_data(self) -> None:
        """Stage and check the data (safe to call from several processes: staging is file-locked)."""
        self._load_index()

    def _load_index(self) -> DatasetIndex:
        if self._index is None:
            root = stage(self.source, self.cache_dir, endpoint_url=self.endpoint_url)
            index = build_index(root, verify=self.verify_images, index_dir=state_dir(self.source, self.cache_dir))
            if self.expected_num_classes is not None and len(index.classes) != self.expected_num_classes:
                raise DataError(
                    f"data.num_classes={self.expected_num_classes} but {self.source} has {len(index.classes)} class "
                    f"folders: set data.num_classes={len(index.classes)} (or null to take it from the data)."
                )
            self._index = index
        return self._index

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
        train_tf, eval_tf = self.preprocessing.train_transform(), self.preprocessing.eval_transform()
        self.datasets = {
            split: ImageListDataset(index.root, index.samples[split], train_tf if split == "train" else eval_tf)
            for split in index.samples
        }
        counts = {split: len(ds) for split, ds in self.datasets.items()}
        log.info("Data %s: %d classes, %s images", index.root, len(index.classes), counts)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=shuffle and len(self.datasets[split]) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
