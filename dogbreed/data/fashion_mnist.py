"""Fashion-MNIST from its original IDX files, staged into the dogImages layout.

``data.source=fashion-mnist`` reads the four IDX files from Debian's ``dataset-fashion-mnist`` package
(:data:`DEBIAN_DIR`) when it is installed, and downloads them from the dataset's mirror otherwise;
``fashion-mnist:/some/folder`` reads them from that folder only. Every file's decompressed content is checked
against its SHA-256 (Debian recompresses the archives, so the published MD5s of the ``.gz`` files do not hold),
so a benchmark figure is always on the official images.

Splits: ``test`` is the official 10,000-image test set; ``valid`` is :data:`VALID_PER_CLASS` images per class
carved from the 60,000 training images by a seeded permutation (the same on every machine); ``train`` is the
rest. Images are written as 28x28 greyscale PNGs under ``<split>/<NNN.Class>/``, with a ``manifest.json``
written last, so an interrupted staging is redone rather than mistaken for a complete one.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import struct
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dogbreed._io import DataError, atomic_path, read_json, write_json

log = logging.getLogger(__name__)

SCHEME = "fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# file name -> SHA-256 of its decompressed content
FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
VALID_PER_CLASS = 500
SPLIT_SEED = 0
MANIFEST = "manifest.json"
_LAYOUT_VERSION = 1


def is_source(source: str) -> bool:
    """``fashion-mnist`` or ``fashion-mnist:/folder``."""
    return source == SCHEME or source.startswith(SCHEME + ":")


def read_idx(path: str | Path, sha256: str | None = None) -> np.ndarray:
    """Read a (gzipped) IDX file, the MNIST container format, into a uint8 array; check its content's ``sha256``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} cannot be read as an IDX file ({err}).") from err
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise DataError(
            f"{path} holds content with SHA-256 {actual}, not Fashion-MNIST's {sha256}: the file is damaged or "
            "another dataset. Replace it with the original (or delete it to download again)."
        )
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data)} bytes, its header promises {expected}: the file is truncated.")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_folder(source: str, downloads: Path) -> Path:
    """The folder holding the four IDX files: the one named, Debian's, or ``downloads`` after fetching them."""
    named = source[len(SCHEME) + 1 :] if source != SCHEME else ""
    if named:
        folder = Path(named).expanduser()
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"data.source={source!r}: {folder} lacks {missing}. Point it at the folder with the four "
                f"Fashion-MNIST IDX files, or use data.source={SCHEME} (Debian's package, else a download)."
            )
        return folder
    if all((DEBIAN_DIR / name).is_file() for name in FILES):
        return DEBIAN_DIR
    for name in FILES:
        if (downloads / name).is_file():
            continue
        url = DOWNLOAD_URL + name
        log.info("Downloading %s", url)
        try:
            with (
                atomic_path(downloads / name) as tmp,
                urllib.request.urlopen(url, timeout=60) as response,
                open(tmp, "wb") as out,
            ):
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise DataError(
                f"could not download {url} ({err}). Without network access: `apt-get install dataset-fashion-mnist` "
                f"(files in {DEBIAN_DIR}), or copy the four IDX files into a folder and set "
                f"data.source={SCHEME}:/that/folder."
            ) from err
    return downloads


def _split(train_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training images that go to ``train`` and to ``valid`` (stratified, seeded)."""
    rng = np.random.default_rng(SPLIT_SEED)
    valid = np.concatenate(
        [rng.permutation(np.flatnonzero(train_labels == c))[:VALID_PER_CLASS] for c in range(len(CLASSES))]
    )
    is_valid = np.zeros(len(train_labels), dtype=bool)
    is_valid[valid] = True
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)


def _write_split(out: Path, split: str, origin: str, images: np.ndarray, labels: np.ndarray, picks: np.ndarray) -> None:
    folders = [out / split / f"{c + 1:03d}.{name}" for c, name in enumerate(CLASSES)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in picks:
        label = int(labels[i])
        Image.fromarray(images[i], mode="L").save(folders[label] / f"{CLASSES[label]}_{origin}{i:05d}.png")


def stage(source: str, target: Path) -> Path:
    """Stage ``source`` into ``target/files`` unless a complete staging with the same files is there; return it."""
    files_dir = target / "files"
    wanted = {
        "source": source, "layout": _LAYOUT_VERSION, "idx_sha256": FILES,
        "valid_per_class": VALID_PER_CLASS, "split_seed": SPLIT_SEED,
    }  # fmt: skip
    manifest: dict[str, Any] = read_json(target / MANIFEST) or {}
    if files_dir.is_dir() and {k: manifest.get(k) for k in wanted} == wanted:
        return files_dir
    idx_dir = _idx_folder(source, target / "idx")
    log.info("Staging Fashion-MNIST from %s into %s", idx_dir, files_dir)
    train_x, train_y, test_x, test_y = (read_idx(idx_dir / name, sha) for name, sha in FILES.items())
    train_picks, valid_picks = _split(train_y)
    tmp = target / ".files.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_split(tmp, "train", "train", train_x, train_y, train_picks)
    _write_split(tmp, "valid", "train", train_x, train_y, valid_picks)
    _write_split(tmp, "test", "test", test_x, test_y, np.arange(len(test_y)))
    (target / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(files_dir, ignore_errors=True)
    os.replace(tmp, files_dir)
    counts = {"train": len(train_picks), "valid": len(valid_picks), "test": len(test_y)}
    write_json(target / MANIFEST, {**wanted, "counts": counts}, indent=1)
    log.info("Staged Fashion-MNIST: %s images", counts)
    return files_dir
