"""Read and check a dataset in the dogImages layout: ``<root>/{train,valid,test}/<class>/<image>``.

Every problem is found here, before training, and reported with the file or folder and the fix. Fatal
problems (a missing split, class folders that differ between splits, an empty class, no images) raise
:class:`DataError`; unreadable files are excluded and listed in a report so that training goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dogbreed._io import DataError, read_json, write_json
from dogbreed.rundir import DATA_REPORT
from dogbreed.transforms import load_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"valid": ("valid", "val", "validation")}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# dogImages' class folders: a numeric prefix, then the class name (``001.Affenpinscher``)
NUMBERED_CLASS_FOLDER = re.compile(r"^\d+[._-]")
_INDEX_VERSION = 1


def display_name(folder: str) -> str:
    """``001.Affenpinscher`` -> ``Affenpinscher``; a folder without a numeric prefix keeps its name."""
    return NUMBERED_CLASS_FOLDER.sub("", folder)


@dataclass
class DatasetIndex:
    """The usable images of each split, the class folders (index order) and what was excluded."""

    root: Path
    classes: list[str]
    samples: dict[str, list[tuple[str, int]]]
    excluded: list[dict[str, str]] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return [display_name(c) for c in self.classes]

    def counts(self) -> dict[str, list[int]]:
        """Images per class for each split."""
        out = {}
        for split, samples in self.samples.items():
            per_class = [0] * len(self.classes)
            for _, label in samples:
                per_class[label] += 1
            out[split] = per_class
        return out

    def imbalance_ratio(self, split: str = "train") -> float:
        """Largest over smallest class count (1.0 is perfectly balanced)."""
        per_class = self.counts()[split]
        return max(per_class) / max(min(per_class), 1)

    def digest(self) -> str:
        """sha256 of which files each split holds, under which class: names what a run trained and tested on."""
        digest = hashlib.sha256()
        for split in sorted(self.samples):
            for path, label in self.samples[split]:
                digest.update(f"{split}\0{path}\0{self.classes[label]}\n".encode())
        return digest.hexdigest()

    def to_json(self) -> dict:
        return {"version": _INDEX_VERSION, "classes": self.classes, "samples": self.samples, "excluded": self.excluded}


def find_split_dirs(root: Path) -> dict[str, Path]:
    """Map each split to its folder, accepting ``val``/``validation`` for ``valid``; raise if one is missing."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist: check data.source.")
    found: dict[str, Path] = {}
    for split in SPLITS:
        for alias in SPLIT_ALIASES.get(split, (split,)):
            if (root / alias).is_dir():
                found[split] = root / alias
                break
    missing = [s for s in SPLITS if s not in found]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"{root} is missing the split folder(s) {missing} (found {present or 'no folders'}). Expected the "
            f"dogImages layout {root}/{{train,valid,test}}/<class folder>/<image>; 'val' is accepted for 'valid'."
        )
    return found


def _list_files(folder: Path) -> list[Path]:
    """Files and links to files under ``folder``, dangling links included (so that they can be reported)."""
    found = (p for p in folder.rglob("*") if p.is_file() or (p.is_symlink() and not p.exists()))
    return sorted(p for p in found if not p.name.startswith("."))


def scan(root: str | Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Check the folder structure and list candidate files per split and class (no decoding yet)."""
    root = Path(root)
    split_dirs = find_split_dirs(root)
    per_split = {
        s: sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        for s, d in split_dirs.items()
    }
    classes = per_split["train"]
    if not classes:
        raise DataError(f"{split_dirs['train']} has no class folders: put each class's images in their own folder.")
    differing = {}
    for split in SPLITS[1:]:
        only_here = sorted(set(per_split[split]) - set(classes))
        not_here = sorted(set(classes) - set(per_split[split]))
        if only_here or not_here:
            differing[split] = (not_here, only_here)
    if differing:
        lines = [
            f"  {split}: missing {not_here or '[]'}; not in train {only_here or '[]'}"
            for split, (not_here, only_here) in differing.items()
        ]
        raise DataError(
            f"class folders differ between splits of {root}:\n"
            + "\n".join(lines)
            + "\nEvery split must have the same class folders (an empty folder still counts as missing images)."
        )
    files = {s: {c: _list_files(split_dirs[s] / c) for c in classes} for s in SPLITS}
    if not any(f for split in files.values() for f in split.values()):
        raise DataError(f"no files at all under {root}: expected images in {root}/train/<class folder>/.")
    return classes, files


def _check_location(path: Path, real_root: Path | None) -> str | None:
    """Why a file is unusable by where it is: a dangling link, or a link leading outside ``real_root`` (the
    dataset folder with its links resolved; None when links may lead anywhere)."""
    if not path.exists():
        return f"dangling symlink (to {os.readlink(path)}): the file it points to does not exist"
    if real_root is not None and not (target := path.resolve()).is_relative_to(real_root):
        return (
            f"symlink leading outside the dataset folder (to {target}); copy the file into the dataset, or set "
            "data.follow_symlinks=true to train on it"
        )
    return None


def _check_image(path: Path) -> str | None:
    """Return why ``path`` is unusable, or None when it decodes."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension {path.suffix or 'none'}; accepted: {sorted(IMAGE_EXTENSIONS)})"
    try:
        load_rgb(path)
    except Exception as err:  # any decoder failure means the file cannot be trained on
        return f"cannot be decoded: {type(err).__name__}: {err}"
    return None


def _check_extension(path: Path) -> str | None:
    return None if path.suffix.lower() in IMAGE_EXTENSIONS else "not an image file"


def _fingerprint(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        target = path.resolve() if path.exists() else "-"  # a link keeps its name when retargeted
        stat = path.stat() if path.exists() else path.lstat()
        digest.update(f"{path}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def build_index(
    root: str | Path,
    *,
    verify: bool = True,
    index_dir: str | Path | None = None,
    workers: int | None = None,
    follow_symlinks: bool = False,
) -> DatasetIndex:
    """Scan ``root``, decode every image once (cached by file size and mtime), and return the usable set.

    Args:
        root: The dataset folder.
        verify: Decode each image to find corrupt ones; without it only extensions are checked.
        index_dir: Where the cached index and the report go (default: ``root`` itself).
        workers: Decoder threads (PIL releases the GIL while decoding).
        follow_symlinks: Train on files that links lead to outside ``root`` (excluded and reported otherwise:
            a dataset should hold what it trains on). Dangling links are always excluded and reported.
    """
    classes, files = scan(root)
    root = Path(root)
    all_files = [p for split in SPLITS for c in classes for p in files[split][c]]
    index_dir = Path(index_dir) if index_dir is not None else root
    real_root = root.resolve()
    cache_file = index_dir / f".dogbreed-index-{hashlib.sha256(str(real_root).encode()).hexdigest()[:12]}.json"
    fingerprint = _fingerprint(all_files) + f":verify={verify}:follow_symlinks={follow_symlinks}"
    cached = read_json(cache_file)
    if cached and cached.get("fingerprint") == fingerprint and cached.get("version") == _INDEX_VERSION:
        index = DatasetIndex(
            root,
            cached["classes"],
            {s: [tuple(x) for x in v] for s, v in cached["samples"].items()},
            cached["excluded"],
        )
        return _check_classes(index)

    log.info("Checking %d files under %s (once; the result is cached)", len(all_files), root)
    check_content = _check_image if verify else _check_extension

    def check(path: Path) -> str | None:
        return _check_location(path, None if follow_symlinks else real_root) or check_content(path)

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        problems = dict(zip(all_files, pool.map(check, all_files), strict=True))
    samples: dict[str, list[tuple[str, int]]] = {}
    excluded = []
    for split in SPLITS:
        samples[split] = []
        for label, cls in enumerate(classes):
            for path in files[split][cls]:
                rel = path.relative_to(root).as_posix()
                if problems[path] is None:
                    samples[split].append((rel, label))
                else:
                    excluded.append({"file": rel, "reason": problems[path]})
    index = DatasetIndex(root, classes, samples, excluded)
    if excluded:
        first = "; ".join(f"{e['file']}: {e['reason']}" for e in excluded[:3])
        more = f"; and {len(excluded) - 3} more" if len(excluded) > 3 else ""
        log.warning(
            "Excluded %d unusable file(s): %s%s (all in %s)", len(excluded), first, more, index_dir / DATA_REPORT
        )
    write_report(index, index_dir / DATA_REPORT)
    write_json(cache_file, {**index.to_json(), "fingerprint": fingerprint}, indent=1)
    return _check_classes(index)


def _check_classes(index: DatasetIndex) -> DatasetIndex:
    if not any(index.samples.values()):
        raise DataError(f"no readable images under {index.root}; see {DATA_REPORT} for why each file was excluded.")
    counts = index.counts()
    empty = [f"{split}/{index.classes[i]}" for split in SPLITS for i, n in enumerate(counts[split]) if n == 0]
    if empty:
        raise DataError(
            f"empty class folder(s) under {index.root} (no readable images): {empty}. Add images to them or "
            "remove the class from every split."
        )
    return index


def write_report(index: DatasetIndex, path: Path) -> None:
    """Write counts, imbalance and excluded files as JSON (the 'report file' users are pointed to)."""
    report = {
        "root": str(index.root),
        "classes": index.classes,
        "counts": index.counts(),
        "imbalance_ratio_train": round(index.imbalance_ratio("train"), 3) if index.samples.get("train") else None,
        "excluded": index.excluded,
    }
    write_json(path, report, indent=1)
