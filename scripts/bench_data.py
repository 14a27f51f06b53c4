"""Images/s of the training data path alone (no model): the classic pipeline vs each fast-path option.

    flock /tmp/dogbreed-bench.lock python scripts/bench_data.py [--images 2000] [--workers 2]

Generates JPEGs with dogImages-like sizes (about 500x375, quality 90) in a temporary folder, then times
one training epoch through each pipeline, best of ``--repeats``, all in the same run so that the ratios
compare like with like:

- baseline: ``torchvision.datasets.ImageFolder`` + PIL + the classic transforms (RandomResizedCrop,
  RandomHorizontalFlip, ToTensor, Normalize);
- DogBreedDataModule with the PIL decoder, with ``decode_jpeg``, from the decoded-image cache (epochs after
  the first), and with batch augmentation on the device: applied here on the CPU in the main process,
  and without it (the uint8 batches a GPU would receive, its augmentation left to the GPU).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as classic

from dogbreed._io import available_cpus
from dogbreed.data import DogBreedDataModule
from dogbreed.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (450, 338), (500, 400), (400, 500), (600, 450)]


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like image: smooth colour regions, mid-frequency texture and sensor noise."""
    blobs = rng.integers(0, 256, (height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(blobs).resize((width, height), Image.BICUBIC)).astype(np.int16)
    texture = rng.integers(0, 256, (height // 3, width // 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR)).astype(np.int16)
    image += ((texture - 128) // 3)[..., None] + rng.integers(-8, 8, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def generate(root: Path, n_train: int, classes: int = 10, quality: int = 90, seed: int = 0) -> int:
    """Write ``n_train`` training JPEGs (and two per class for valid/test) in the dogImages layout.

    ``bench_train.py --device`` trains on the same images.
    """
    rng = np.random.default_rng(seed)
    total = 0
    for split, per_class in (("train", n_train // classes), ("valid", 2), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"{c + 1:03d}.Breed_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = SIZES[rng.integers(len(SIZES))]
                photo(rng, *size).save(folder / f"img_{i:05d}.jpg", quality=quality)
                total += 1
    return total


def epoch_rate(batches: Iterable, after: Callable = lambda b: b) -> float:
    """Images/s over one pass; ``after`` is what runs on each batch in the training process."""
    start, count = time.perf_counter(), 0
    for batch in batches:
        images, _ = after(batch)
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="training images to generate")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per pipeline; the best one counts")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the workers own the cores; more threads here only fight them

    with tempfile.TemporaryDirectory(prefix="dogbreed-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        n = generate(tmp / "data", args.images)
        mb = sum(p.stat().st_size for p in (tmp / "data").rglob("*.jpg")) / 1e6
        print(
            f"{n} JPEGs ({mb / n * 1000:.0f} kB each) generated in {time.perf_counter() - start:.0f} s; "
            f"{args.workers} workers, batch {args.batch_size}, {available_cpus()} cores, torch {torch.__version__}"
        )

        baseline = datasets.ImageFolder(
            tmp / "data" / "train",
            classic.Compose(
                [
                    classic.RandomResizedCrop(224),
                    classic.RandomHorizontalFlip(),
                    classic.ToTensor(),
                    classic.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                ]
            ),
        )
        loader_args = {"batch_size": args.batch_size, "num_workers": args.workers, "shuffle": True}

        def module(**kwargs) -> DogBreedDataModule:
            dm = DogBreedDataModule(
                tmp / "data", cache_dir=tmp / "cache", verify_images=False,
                batch_size=args.batch_size, num_workers=args.workers, **kwargs,
            )  # fmt: skip
            dm.setup()
            return dm

        start = time.perf_counter()
        cached = module(cache=True, device_augment=False)
        build_s = time.perf_counter() - start
        cached_device = module(cache=True, device_augment=True)
        pipelines: dict[str, tuple[Callable[[], Iterable], Callable]] = {
            "baseline: ImageFolder + PIL + classic transforms": (
                lambda: torch.utils.data.DataLoader(baseline, **loader_args),
                lambda b: b,
            ),
        }
        for name, dm in {
            "PIL decoder, v2 transforms": module(decoder="pil", cache=False, device_augment=False),
            "decode_jpeg, v2 transforms": module(decoder="torchvision", cache=False, device_augment=False),
            "decode_jpeg + device augmentation (applied on this CPU)": module(cache=False, device_augment=True),
            "cache (epochs after the first)": cached,
            "cache + device augmentation (applied on this CPU)": cached_device,
        }.items():
            pipelines[name] = (dm.train_dataloader, lambda b, dm=dm: dm.on_after_batch_transfer(b, 0))
        uint8_only = "cache + device augmentation: uint8 batches the GPU receives"
        pipelines[uint8_only] = (
            cached_device.train_dataloader,
            lambda b: (b.images, b.labels),
        )

        for p in (tmp / "data").rglob("*.jpg"):  # every pipeline reads from the page cache
            p.read_bytes()
        rates = dict.fromkeys(pipelines, 0.0)
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            for name, (loader, after) in pipelines.items():
                rates[name] = max(rates[name], epoch_rate(loader(), after))

        base = rates["baseline: ImageFolder + PIL + classic transforms"]
        cache_gb = cached.datasets["train"].cache.nbytes / 1e9
        width = max(map(len, rates))
        if args.markdown:
            print("\n| pipeline | images/s | vs baseline |\n| --- | ---: | ---: |")
            for name, rate in rates.items():
                print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
        else:
            print(f"\n{'pipeline':<{width}}  {'images/s':>9}  {'x baseline':>10}")
            for name, rate in rates.items():
                print(f"{name:<{width}}  {rate:>9,.0f}  {rate / base:>10.2f}")
        print(
            f"\ncache build (first epoch, decode + resize + write): {build_s:.1f} s "
            f"= {n / build_s:,.0f} images/s, {cache_gb:.2f} GB"
        )
        print(
            f"ratios: decode_jpeg {rates['decode_jpeg, v2 transforms'] / base:.2f}x (goal 1.4x), "
            f"cached epochs {rates['cache (epochs after the first)'] / base:.2f}x (goal 5x), "
            f"uint8 batches for the GPU {rates[uint8_only] / base:.2f}x"
        )


if __name__ == "__main__":
    main()
