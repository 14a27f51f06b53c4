"""The images a package's exports are made and checked with: the run's own data, preprocessed as serving does.

INT8 quantisation is calibrated on a seeded sample of the training split, and every export is checked against
eager on a seeded sample of images it was not calibrated on (the validation split, or the rest of a plain
folder). The data is the run's (``data-report.json`` names the staged folder) or any folder given with
``dogbreed-package --calibration DIR``: the dogImages layout (``train/``, ``valid/``, ``test/`` of class
folders), or images anywhere under it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dogbreed._io import read_json
from dogbreed.data.layout import IMAGE_EXTENSIONS, display_name
from dogbreed.rundir import DATA_REPORT
from dogbreed.transforms import Preprocessing, load_rgb

CALIBRATION_SIZE = 300
HELD_OUT_SIZE = 100


@dataclass
class CheckImages:
    """Preprocessed ``(N, 3, S, S)`` calibration and held-out images; the held-out ones' class indices when the
    folders are the model's classes."""

    source: Path
    calibration: torch.Tensor
    held_out: torch.Tensor
    labels: torch.Tensor | None


def run_data(run_dir: str | Path) -> Path | None:
    """The local dataset folder the run trained on (``data-report.json``'s ``root``), if it is still there."""
    for folder in (Path(run_dir), Path(run_dir).parent):  # a run dir, or its model/ dir
        root = (read_json(folder / DATA_REPORT) or {}).get("root")
        if root and Path(root).is_dir():
            return Path(root)
    return None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def check_images(
    source: str | Path,
    preprocessing: Preprocessing,
    class_names: list[str],
    *,
    calibration_size: int = CALIBRATION_SIZE,
    held_out_size: int = HELD_OUT_SIZE,
    seed: int = 0,
) -> CheckImages:
    """Sample and preprocess the calibration and held-out images of ``source`` (the same picks for a seed)."""
    source = Path(source)
    if (source / "train").is_dir() and any((source / split).is_dir() for split in ("valid", "test")):
        pool = _images(source / "train")
        held_split = source / ("valid" if (source / "valid").is_dir() else "test")
        held = _images(held_split)
    else:
        pool, held_split = _images(source), None
        random.Random(seed).shuffle(pool)
        split = len(pool) - min(held_out_size, len(pool) // 4)  # a quarter at most is held out
        pool, held = pool[:split], pool[split:]
    if not pool or not held:
        raise ValueError(
            f"{source} holds too few images to calibrate and check an export ({len(pool)} + {len(held)}): give "
            "--calibration DIR, a folder of the run's training images (the dogImages layout or images anywhere in it)."
        )
    calibration = random.Random(seed).sample(pool, min(calibration_size, len(pool)))
    held = random.Random(seed + 1).sample(held, min(held_out_size, len(held)))
    transform = preprocessing.eval_transform()

    def tensors(paths: list[Path]) -> torch.Tensor:
        size = preprocessing.image_size
        return torch.stack([transform(load_rgb(path)) for path in paths]) if paths else torch.empty(0, 3, size, size)

    labels = None
    if held_split is not None:
        index = {name: i for i, name in enumerate(class_names)}
        folders = [display_name(path.relative_to(held_split).parts[0]) for path in held]
        if all(name in index for name in folders):
            labels = torch.tensor([index[name] for name in folders])
    return CheckImages(source, tensors(calibration), tensors(held), labels)
