"""A decoded-image cache: every image decoded once, resized, stored as uint8 in one memory-mapped file.

Later epochs and later runs read raw pixels instead of decoding JPEGs. The cache stores the output of
:meth:`Preprocessing.resize_transform` (short side to ``resize_size``), the first step of the eval
transform; resizing an image that already has that size is a no-op, so eval tensors from the cache are
identical to those computed from the files, and to what serving computes.

On a GPU the build can decode JPEGs with nvjpeg instead (``device="cuda"``): workers read the files, the
training process decodes and resizes them in batches on the GPU. nvjpeg's pixels differ from
libjpeg-turbo's by a level or two, so the device is part of the cache key, and eval tensors from such a
cache are close to, not identical with, serving's.

Files in ``<folder>``: ``images-<shard>.u8`` (pixels back to back; each CPU build worker appends to its
own shard, so pixels never cross processes; a device build writes one), ``index.npy`` (shard, offset,
height, width and CRC-32 of each image) and ``meta.json``, written last: the completion marker, holding
the key (dataset file list with sizes and mtimes, resize settings, decoder, decoding device), the shard
sizes and the index's checksum. Everything is written under temporary names and renamed, so an
interrupted build leaves no ``meta.json`` and is rebuilt; a truncated or corrupted file fails its size
or checksum test when opened and is rebuilt too. A build the disk fills up under removes what it wrote
and training goes on without the cache, decoding the files every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dogbreed._io import DiskFullError, file_lock, is_disk_full, read_json, write_json
from dogbreed.data.decode import DecodedImageDataset, decode_jpegs_resized, decodes_on_device
from dogbreed.transforms import Preprocessing

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX, META = "index.npy", "meta.json"
_CHUNK = 64 << 20
_EXIF_ORIENTATION, _TRANSPOSED = 0x0112, {5, 6, 7, 8}
DEVICE_BATCH = 64  # JPEGs per batched device decode: large enough for nvjpeg, small for any GPU's memory


def cache_key(
    root: Path, rel_paths: Sequence[str], preprocessing: Preprocessing, decoder: str, device: str | None = None
) -> str:
    """What the cached pixels depend on: every file (path, size, mtime), the resize settings, the decoder and
    the kind of device JPEGs are decoded on (``None``: the CPU)."""
    digest = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "resize_size": preprocessing.resize_size,
                "interpolation": preprocessing.interpolation,
                "decoder": decoder,
                "decode_device": torch.device(device or "cpu").type,
            }
        ).encode()
    )
    for rel in rel_paths:
        stat = (root / rel).stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resized_hw(height: int, width: int, size: int) -> tuple[int, int]:
    """Height and width after resizing the short side to ``size`` (torchvision's rounding)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def estimate_bytes(root: Path, rel_paths: Sequence[str], resize_size: int) -> int:
    """Cache size from the image headers alone (no decoding), EXIF rotation included."""
    total = 0
    for rel in rel_paths:
        try:
            with Image.open(root / rel) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                    width, height = height, width
        except OSError:  # unreadable: the build names the file
            continue
        h, w = resized_hw(height, width, resize_size)
        total += 3 * h * w
    return total


class DecodedImageCache:
    """Read access to a complete cache; open it with :func:`load_or_build`."""

    def __init__(self, folder: Path, index: np.ndarray, shard_bytes: dict[str, int]) -> None:
        self.folder = folder
        self.index = index  # per image: shard, offset, height, width, crc32
        self.shard_bytes = shard_bytes
        self._shards: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _pixels(self, i: int) -> np.ndarray:
        shard, offset, height, width, _ = (int(v) for v in self.index[i])
        if shard not in self._shards:  # mapped lazily so that each DataLoader worker maps the files itself
            self._shards[shard] = np.memmap(self.folder / shard_name(shard), dtype=np.uint8, mode="r")
        return self._shards[shard][offset : offset + 3 * height * width]

    def __getitem__(self, i: int) -> torch.Tensor:
        _, _, height, width, _ = (int(v) for v in self.index[i])
        return torch.from_numpy(np.array(self._pixels(i))).view(3, height, width)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}

    @property
    def nbytes(self) -> int:
        return sum(self.shard_bytes.values())

    def corrupted(self) -> int | None:
        """The first image whose pixels fail their CRC-32, or None."""
        return next((i for i in range(len(self)) if zlib.crc32(self._pixels(i)) != int(self.index[i, 4])), None)


class CachedImageDataset(Dataset):
    """Images of one split read from a :class:`DecodedImageCache`, then ``transform`` (if any)."""

    def __init__(
        self,
        cache: DecodedImageCache,
        positions: Sequence[int],
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.cache = cache
        self.positions = list(positions)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.cache[self.positions[i]]
        return (self.transform(image) if self.transform else image), self.labels[i]


def shard_name(shard: int) -> str:
    return f"images-{shard}.u8"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def open_cache(folder: Path, key: str) -> DecodedImageCache | None:
    """The cache in ``folder`` if it is complete, intact and built for ``key``; else None (with the reason logged)."""
    meta = read_json(folder / META)
    if meta is None:
        return None
    reason = None
    shards: dict[str, int] = meta.get("shards", {})
    if meta.get("key") != key or meta.get("version") != CACHE_VERSION:
        reason = "the dataset or the resize settings changed"
    elif any(not (folder / name).is_file() or (folder / name).stat().st_size != size for name, size in shards.items()):
        reason = "a pixel file has the wrong size (interrupted or truncated)"
    elif not (folder / INDEX).is_file() or _crc32(folder / INDEX) != meta.get("index_crc32"):
        reason = f"{INDEX} fails its checksum"
    else:
        cache = DecodedImageCache(folder, np.load(folder / INDEX), shards)
        bad = cache.corrupted()
        if bad is None:
            return cache
        reason = f"the pixels of image {bad} fail their checksum (corrupted)"
    log.warning("Decoded-image cache %s is stale: %s; rebuilding it.", folder, reason)
    return None


class _Shard:
    """One pixel file (under its temporary name) that one process appends images to."""

    def __init__(self, folder: Path, shard: int) -> None:
        self.shard = shard
        self._fd = os.open(folder / f".{shard_name(shard)}.tmp", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, image: torch.Tensor) -> tuple[int, int, int, int, int]:
        """Write ``image`` (uint8, (3, h, w)); return its index entry: shard, offset, height, width, CRC-32."""
        data = memoryview(image.contiguous().numpy()).cast("B")
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        written = 0
        while written < data.nbytes:  # unbuffered: workers exit without flushing Python buffers
            written += os.write(self._fd, data[written:])
        return self.shard, offset, image.shape[1], image.shape[2], zlib.crc32(data)

    def close(self) -> None:
        os.close(self._fd)


class _ShardWriter(Dataset):
    """Decodes and resizes image ``i``, appends it to this process's shard file, returns where it went.

    Each DataLoader worker writes its own shard, so pixels never travel between processes.
    """

    def __init__(self, images: DecodedImageDataset, folder: Path) -> None:
        self.images, self.folder = images, folder
        self._shard: _Shard | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, int, int, int, int, int]:
        if self._shard is None:
            worker = get_worker_info()
            self._shard = _Shard(self.folder, worker.id if worker else 0)
        image, _ = self.images[i]
        return i, *self._shard.append(image)

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None


class _EncodedImages(Dataset):
    """Image ``i`` as its JPEG bytes, for a batched device decode, or decoded and resized on this CPU.

    The CPU decodes what the device decode would get wrong or cannot read (see ``decodes_on_device``).
    Returns ``(i, tensor, encoded)``: ``encoded`` says which of the two the tensor is.
    """

    def __init__(self, images: DecodedImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool]:
        data = (self.images.root / self.images.samples[i][0]).read_bytes()
        if decodes_on_device(data):
            return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), True
        return i, self.images[i][0], False


def _write_on_cpu(images: DecodedImageDataset, folder: Path, num_workers: int) -> np.ndarray:
    """Each worker decodes, resizes and appends images to its own shard; returns the index."""
    writer = _ShardWriter(images, folder)
    # its own generator: building the cache must not shift the seeded random stream training draws from
    loader = DataLoader(writer, batch_size=None, num_workers=num_workers, generator=torch.Generator())
    index = np.zeros((len(images), 5), dtype=np.int64)
    try:
        for i, *entry in loader:
            index[i] = entry
    finally:
        writer.close()
    return index


def _write_on_device(images: DecodedImageDataset, folder: Path, device: str, num_workers: int) -> np.ndarray:
    """Workers read the files; this process decodes JPEGs in batches on ``device``, resizes them there and
    appends every image to shard 0; returns the index.

    A batch the device decoder rejects (an unusual JPEG, or no memory left) is decoded image by image on
    the CPU instead, as are the files ``decodes_on_device`` turns away.
    """
    loader = DataLoader(
        _EncodedImages(images), batch_size=DEVICE_BATCH, num_workers=num_workers, collate_fn=list,
        generator=torch.Generator(),
    )  # fmt: skip
    index = np.zeros((len(images), 5), dtype=np.int64)
    on_device = 0
    shard = _Shard(folder, 0)
    try:
        for items in loader:
            decoded = {i: image for i, image, encoded in items if not encoded}
            batch = [(i, data) for i, data, encoded in items if encoded]
            if batch:
                try:
                    pixels = decode_jpegs_resized([data for _, data in batch], images.transform, device)
                    decoded.update(zip([i for i, _ in batch], pixels, strict=True))
                    on_device += len(batch)
                except RuntimeError as err:
                    log.debug("Batched decode on %s failed (%s); its %d images go to the CPU", device, err, len(batch))
                    decoded.update((i, images[i][0]) for i, _ in batch)
            for i in sorted(decoded):
                index[i] = shard.append(decoded[i])
    finally:
        shard.close()
    log.info("Decoded %d of %d images on %s, the others on the CPU", on_device, len(images), device)
    return index


def build_cache(
    folder: Path,
    key: str,
    root: Path,
    rel_paths: Sequence[str],
    preprocessing: Preprocessing,
    decoder: str,
    num_workers: int = 0,
    device: str | None = None,
) -> DecodedImageCache:
    """Decode and resize every image into ``folder`` (temporary names, renamed when complete).

    ``device``: decode JPEGs in batches there (``cuda``: nvjpeg); ``None``: each worker decodes its images
    on the CPU.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)  # from here on the old files no longer count as a cache
    _remove_pixels(folder)
    start = time.perf_counter()
    try:
        cache = _build(folder, key, root, rel_paths, preprocessing, decoder, num_workers, device)
    except BaseException:
        _remove_pixels(folder)  # on a full disk they hold the space training needs
        raise
    log.info(
        "Cached %d decoded images (%.2f GB) in %.1f s", len(rel_paths), cache.nbytes / 1e9, time.perf_counter() - start
    )
    return cache


def _remove_pixels(folder: Path) -> None:
    """Delete the pixel files and temporary files of a build (builds hold the lock: none is in progress)."""
    for leftover in [*folder.glob(".*.tmp"), *folder.glob(shard_name("*")), folder / INDEX]:
        leftover.unlink(missing_ok=True)


def _build(
    folder: Path,
    key: str,
    root: Path,
    rel_paths: Sequence[str],
    preprocessing: Preprocessing,
    decoder: str,
    num_workers: int,
    device: str | None,
) -> DecodedImageCache:
    """The writing half of :func:`build_cache`, into a folder that holds no cache files."""
    images = DecodedImageDataset(root, [(rel, 0) for rel in rel_paths], preprocessing.resize_transform(), decoder)
    if device is None:
        index = _write_on_cpu(images, folder, num_workers)
    else:
        index = _write_on_device(images, folder, device, num_workers)
    shards = {}
    for shard in sorted(set(index[:, 0].tolist())):
        tmp = folder / f".{shard_name(shard)}.tmp"
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        shards[shard_name(shard)] = tmp.stat().st_size
        os.replace(tmp, folder / shard_name(shard))
    with open(folder / f".{INDEX}.tmp", "wb") as f:
        np.save(f, index)
    os.replace(folder / f".{INDEX}.tmp", folder / INDEX)
    meta = {
        "version": CACHE_VERSION,
        "key": key,
        "count": len(rel_paths),
        "shards": shards,
        "index_crc32": _crc32(folder / INDEX),
        "resize_size": preprocessing.resize_size,
    }
    write_json(folder / META, meta, indent=1)  # last: it marks the cache complete
    return DecodedImageCache(folder, index, shards)


def load_or_build(
    folder: Path,
    root: Path,
    rel_paths: Sequence[str],
    preprocessing: Preprocessing,
    *,
    decoder: str = "torchvision",
    max_bytes: int,
    num_workers: int = 0,
    device: str | None = None,
) -> DecodedImageCache | None:
    """Open the cache for these files and settings, building it first if needed.

    ``device``: where a build decodes JPEGs in batches (``cuda``: nvjpeg); ``None``: on the CPU, image by
    image in the workers. Returns None, after saying why, when the cache would exceed ``max_bytes`` or the
    free disk space: training then decodes the files every epoch.
    """
    key = cache_key(root, rel_paths, preprocessing, decoder, device)
    with file_lock(folder.with_suffix(".lock")):  # DDP ranks and parallel trials share one build
        cache = open_cache(folder, key)
        if cache is not None:
            log.info("Using the decoded-image cache %s (%.2f GB)", folder, cache.nbytes / 1e9)
            return cache
        size = estimate_bytes(root, rel_paths, preprocessing.resize_size)
        log.info(
            "Decoded-image cache: %d images at short side %d need %.2f GB in %s (limit data.cache_max_gb=%.1f)",
            len(rel_paths), preprocessing.resize_size, size / 1e9, folder, max_bytes / 1e9,
        )  # fmt: skip
        if size > max_bytes:
            log.warning(
                "Not caching: %.2f GB exceeds data.cache_max_gb=%.1f. Raise data.cache_max_gb, lower "
                "data.resize_size, or set data.cache=false to silence this; images are decoded every epoch.",
                size / 1e9, max_bytes / 1e9,
            )  # fmt: skip
            return None
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if size > free:
            log.warning(
                "Not caching: %.2f GB needed but %s has %.2f GB free; images are decoded every epoch.",
                size / 1e9, folder, free / 1e9,
            )  # fmt: skip
            return None
        try:
            return build_cache(folder, key, root, rel_paths, preprocessing, decoder, num_workers, device)
        except OSError as err:  # the disk filled up after the check above (other writers, a low estimate)
            if not is_disk_full(err):
                raise
            log.warning("Not caching: %s; images are decoded every epoch.", DiskFullError(folder, size))
            return None
