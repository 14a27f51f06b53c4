"""Training throughput of dogbreed's Lightning path, measured in one run. Two modes.

**Lightning overhead** (the default): a plain PyTorch loop against dogbreed's Lightning path on the CPU.
Both sides train the same network (``DogBreedClassifier``'s ResNet-18) on the same data loader, batch
size and thread count; the Lightning side uses the composed demo config (trainer, callbacks, logger,
optimiser and schedule) exactly as ``python -m dogbreed.train experiment=demo`` builds it. The timed span
of each side runs from the end of the last warm-up step to the end of the last step, data loading
included. Repeats alternate the order so that neither side always runs on a warmer machine.

    python scripts/bench_train.py [--steps 40] [--repeats 3]

Prints steps/s of each side and the ratio plain/Lightning (the goal is <= 1.05 on CPU).

**Fast-path options** (``--device cuda`` or ``--device cpu``): end-to-end training images/s of the
Lightning path composed from the real configs (``conf/train.yaml``: data=dogimages, model=resnet18,
callbacks=default, random initial weights) on generated dogImages-like JPEGs (``bench_data.py``'s
generator: about 500x375, quality 90, 10 classes), once per row, each row adding one option to the row
before it:

    baseline                  data.decoder=pil data.cache=false data.device_augment=false, fp32
    + decode_jpeg             data.decoder=torchvision
    + decoded-image cache     data.cache=true
    + device augmentation     data.device_augment=true
    + AMP + channels_last     preset=gpu (bf16-mixed where the GPU supports it; on a CPU, bf16-mixed there)
    + torch.compile           model.compile=true (only with --compile)

Every row uses preset=gpu's loader settings (``data.num_workers``: every core but one, persistent
workers, pinned memory on CUDA), no validation and no checkpoints. The cache is built (on the GPU with
nvjpeg under ``--device cuda``) into ``<out-dir>/cache`` before any row is timed, so the cache rows measure
cached epochs; with ``--out-dir`` the generated images and the cache are kept and reused by the next run.
A row is timed from the end of its warm-up steps to the end of its last step (CUDA synchronised at both
ends), data loading included. GPU utilisation is the mean, over that window, of the NVML samples that the
profiler callback writes to ``<run>/profiler-output/system.jsonl``; they need ``nvidia-ml-py`` (``pip
install -e ".[gpu]"``), otherwise the column says n/a. "data wait" is the share of step time spent waiting
for the next batch (the profiler's ``steps.jsonl``).

The issue's goal, at least 12,000 images/s on one H100 with AMP + channels_last + cache + device
augmentation (224 px, batch 256, 6,680 images like dogImages' training split, 200 steps after 20 warm-up):

    pip install -e ".[gpu]"
    python scripts/bench_train.py --device cuda --out-dir bench-train [--compile] [--markdown]

The same code on a CPU, small enough for a 2-core machine:

    python scripts/bench_train.py --device cpu --image-size 64 --steps 5 --images 200
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from bench_data import generate  # this folder's data generator (a script's own folder is on sys.path)
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from dogbreed.config import compose_config
from dogbreed.data import DogBreedDataModule
from dogbreed.rundir import load_profile
from dogbreed.train import instantiate_group

GOAL_IMAGES_PER_S = 12_000  # issue #6, one H100, AMP + channels_last + cache + device augmentation
GOAL_ROW = "preset=gpu"  # the row the goal is about
# (label, overrides): each row adds its overrides to those of the rows above it
ROWS = [
    (
        "baseline: PIL decode, CPU augmentation, fp32",
        ["data.decoder=pil", "data.cache=false", "data.device_augment=false"],
    ),
    ("+ decode_jpeg", ["data.decoder=torchvision"]),
    ("+ decoded-image cache", ["data.cache=true"]),
    ("+ device augmentation", ["data.device_augment=true"]),
    ("+ {precision} + channels_last (preset=gpu)", [GOAL_ROW]),
]
COMPILE_ROW = ("+ torch.compile", ["model.compile=true"])


def demo_config(out_dir: Path, batch_size: int, steps: int) -> DictConfig:
    cfg = compose_config("train", ["experiment=demo"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.cache_dir = str(out_dir / "cache")
        cfg.data.batch_size = batch_size
        cfg.trainer.max_steps = steps
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_progress_bar = False
        # no validation in the timed steps: nothing to monitor or stop on
        cfg.callbacks.pop("progress_bar")
        cfg.callbacks.pop("early_stopping")
        cfg.callbacks.model_checkpoint.monitor = None
    return cfg


class _StepClock(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step, the device's queued work included."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.wall_start = self.wall_end = 0.0  # time.time(), to find the system samples of the timed span

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        edge = trainer.global_step in (self.warmup, trainer.max_steps)
        if edge and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        if trainer.global_step == self.warmup:
            self.start, self.wall_start = time.perf_counter(), time.time()
        self.end, self.wall_end = time.perf_counter(), time.time()


def fit_timed(cfg: DictConfig, warmup: int) -> _StepClock:
    """Fit ``cfg`` (its ``trainer.max_steps`` steps) with a clock on the steps after ``warmup``."""
    L.seed_everything(0, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    clock = _StepClock(warmup)
    callbacks = [*instantiate_group(cfg.callbacks, "callback"), clock]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.logger, "logger"))
    trainer.fit(model, datamodule=datamodule)
    return clock


def lightning_steps_per_s(cfg: DictConfig, warmup: int, steps: int) -> float:
    clock = fit_timed(cfg, warmup)
    return steps / (clock.end - clock.start)


def plain_steps_per_s(cfg: DictConfig, warmup: int, steps: int) -> float:
    L.seed_everything(0, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    net = instantiate(cfg.model).net
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.model.lr, weight_decay=cfg.model.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    batches = itertools.chain.from_iterable(iter(datamodule.train_dataloader()) for _ in itertools.count())
    start = 0.0
    for step, (x, y) in enumerate(batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(net(x), y)
        loss.backward()
        optimizer.step()
        if step == warmup:
            start = time.perf_counter()
        if step == warmup + steps:
            return steps / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def overhead(args: argparse.Namespace) -> None:
    """The plain-loop vs Lightning comparison on the CPU."""
    steps, warmup, batch_size = args.steps or 40, args.warmup or 5, args.batch_size or 32
    torch.set_num_threads(args.threads)
    plain, lightning = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(Path(tmp), batch_size, warmup + steps)
        for repeat in range(args.repeats):
            order = [("plain", plain_steps_per_s, plain), ("lightning", lightning_steps_per_s, lightning)]
            for name, measure, results in order if repeat % 2 == 0 else order[::-1]:
                results.append(measure(cfg, warmup, steps))
                print(f"repeat {repeat} {name:>9}: {results[-1]:.2f} steps/s")
    p, lt = statistics.median(plain), statistics.median(lightning)
    setup = f"batch {batch_size}, {args.threads} threads, {steps} steps x {args.repeats}"
    print(f"\nResNet-18, demo data, {setup}")
    print(f"plain PyTorch loop : {p:.2f} steps/s (median)")
    print(f"dogbreed Lightning : {lt:.2f} steps/s (median)")
    print(f"ratio plain/Lightning: {p / lt:.3f} (goal <= 1.05)")


def options_config(
    overrides: list[str], data_dir: Path, out_dir: Path, args: argparse.Namespace, steps: int
) -> DictConfig:
    """``conf/train.yaml`` with one row's ``overrides``, pointed at the generated data and shrunk to ``steps``."""
    cfg = compose_config("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.cache_dir = str(data_dir.parent / "cache")  # shared by the rows: built once, before timing
        cfg.data.update(
            source=str(data_dir), num_classes=len(list((data_dir / "train").iterdir())), verify_images=False,
            batch_size=args.batch_size, image_size=args.image_size, resize_size=args.image_size * 256 // 224,
            num_workers=args.workers, persistent_workers=True, pin_memory=args.device == "cuda",
        )  # fmt: skip
        cfg.model.weights = None  # random initial weights: the same speed as ImageNet's, without a download
        cfg.trainer.update(
            accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=-1, max_steps=steps,
            limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False,
        )  # fmt: skip
        if args.device == "cpu" and cfg.trainer.precision != "32-true":
            cfg.trainer.precision = "bf16-mixed"  # what a CPU autocasts to (16-mixed is GPU-only)
        for name in (
            "progress_bar",
            "early_stopping",
            "model_checkpoint",
            "last_checkpoint",
        ):  # no validation, no checkpoints
            cfg.callbacks.pop(name, None)
    return cfg


def profile_of(run_dir: Path, clock: _StepClock, warmup: int) -> tuple[float, float]:
    """Mean GPU utilisation (%, the busiest GPU; NaN without NVML samples) and the data-wait share of step
    time, over the timed steps."""
    profile = load_profile(run_dir)
    samples = [s for s in profile.system if clock.wall_start <= s["t"] <= clock.wall_end]
    per_gpu = np.asarray([[g["util"] for g in s["gpus"]] for s in samples if s.get("gpus")], dtype=float)
    gpu = float(np.nanmax(np.nanmean(per_gpu, axis=0))) if per_gpu.size else math.nan
    timed = [s for s in profile.steps if s["step"] >= warmup and s.get("dataloader") is not None]
    wait = sum(s["dataloader"] for s in timed) / max(sum(s["duration"] for s in timed), 1e-9)
    return gpu, wait


def prepare_images(out: Path, images: int) -> Path:
    """The generated dataset for ``images`` training images under ``out`` (kept, and reused if there)."""
    data = out / f"jpegs-{images}"
    if not data.is_dir():
        tmp = out / f".jpegs-{images}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        count = generate(tmp, images)
        tmp.rename(data)
        print(f"generated {count} JPEGs in {time.perf_counter() - start:.0f} s")
    for path in data.rglob("*.jpg"):  # every row reads from the page cache
        path.read_bytes()
    return data


def prebuild_cache(cfg: DictConfig, device: str) -> None:
    """Build (or find) the decoded-image cache the cache rows read, before any row is timed."""
    start = time.perf_counter()
    dm: DogBreedDataModule = instantiate(cfg.data, cache_decode_device=device)
    dm.setup("fit")
    cache = getattr(dm.datasets["train"], "cache", None)
    if cache is None:
        raise SystemExit("the decoded-image cache was not written (see the log); the cache rows would not use it")
    print(
        f"decoded-image cache ready before timing: {len(cache)} images, {cache.nbytes / 1e9:.2f} GB, "
        f"{time.perf_counter() - start:.1f} s (JPEGs decoded on {device}; a cache already there is reused)"
    )


def options(args: argparse.Namespace) -> None:
    """One training run per row of ROWS, cumulative; prints images/s against the baseline row."""
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    args.batch_size = args.batch_size or (256 if cuda else 32)
    warmup, steps = args.warmup or (20 if cuda else 2), args.steps or 200
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # debugger rules judging a few steps from random weights say nothing here; each run's debug-output/ keeps them
    logging.getLogger("dogbreed.rules.debugger").setLevel(logging.ERROR)
    rows = [*ROWS, COMPILE_ROW] if args.compile else ROWS
    with tempfile.TemporaryDirectory(prefix="dogbreed-bench-train-") as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = prepare_images(out, args.images)
        where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
        print(
            f"{where}, torch {torch.__version__}; ResNet-18 at {args.image_size} px, batch {args.batch_size}, "
            f"{args.images} training images, workers {args.workers}, {steps} timed steps after {warmup} warm-up"
        )
        settings: dict[str, str] = {}
        results: list[tuple[str, float, float, float]] = []
        cache_ready = False
        for i, (label, changes) in enumerate(rows):
            settings.update(change.split("=", 1) for change in changes)
            run_dir = out / "runs" / str(i)
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = options_config([f"{k}={v}" for k, v in settings.items()], data, run_dir, args, warmup + steps)
            if cfg.data.cache and not cache_ready:
                prebuild_cache(cfg, args.device)
                cache_ready = True
            label = label.format(precision=cfg.trainer.precision)
            clock = fit_timed(cfg, warmup)
            gc.collect()  # the finished trainer's loader workers and GPU memory go before the next row starts
            rate = steps * args.batch_size / (clock.end - clock.start)
            results.append((label, rate, *profile_of(run_dir, clock, warmup)))
            print(f"  {label}: {rate:,.0f} images/s")
    print_table(results, args.markdown)
    if cuda:
        rate = next(r[1] for r, (_, changes) in zip(results, rows, strict=True) if GOAL_ROW in changes)
        verdict = "met" if rate >= GOAL_IMAGES_PER_S else "not met"
        print(
            f"goal: >= {GOAL_IMAGES_PER_S:,} images/s on one H100 with AMP + channels_last + cache + device "
            f"augmentation: {rate:,.0f} images/s, {verdict} on this {where}"
        )


def print_table(results: list[tuple[str, float, float, float]], markdown: bool) -> None:
    base = results[0][1]

    def pct(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.0f} %"

    if markdown:
        print("\n| options (cumulative) | images/s | vs baseline | GPU util | data wait |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, rate, gpu, wait in results:
            print(f"| {label} | {rate:,.0f} | {rate / base:.2f} | {pct(gpu)} | {pct(100 * wait)} |")
    else:
        width = max(len(r[0]) for r in results)
        header = f"{'images/s':>9}  {'x baseline':>10}  {'GPU util':>8}  {'data wait':>9}"
        print(f"\n{'options (cumulative)':<{width}}  {header}")
        for label, rate, gpu, wait in results:
            print(f"{label:<{width}}  {rate:>9,.0f}  {rate / base:>10.2f}  {pct(gpu):>8}  {pct(100 * wait):>9}")
    if all(math.isnan(r[2]) for r in results):
        print('GPU util: n/a (no NVML samples: no GPU, or nvidia-ml-py missing: pip install -e ".[gpu]")')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="measure the fast-path options on this device")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (overhead: 40; options: 200)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (overhead: 5; options: 20 on cuda, 2 on cpu)")
    parser.add_argument("--batch-size", type=int, help="overhead: 32; options: 256 on cuda, 32 on cpu")
    parser.add_argument("--repeats", type=int, default=3, help="overhead: measurements per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="overhead: torch threads")
    parser.add_argument("--images", type=int, default=6680, help="options: training images to generate")
    parser.add_argument("--image-size", type=int, default=224, help="options: training crop size")
    parser.add_argument("--workers", default="auto", help="options: data.num_workers (an integer or auto)")
    parser.add_argument("--compile", action="store_true", help="options: add a torch.compile row")
    parser.add_argument("--out-dir", help="options: keep images, cache and run dirs here (default: a temporary dir)")
    parser.add_argument("--markdown", action="store_true", help="options: print the table as Markdown")
    args = parser.parse_args()
    if args.workers != "auto":
        args.workers = int(args.workers)
    if args.device:
        options(args)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
