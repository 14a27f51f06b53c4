"""Fashion-MNIST test accuracy of ``experiment=fashion_mnist`` beside the dataset's published table, and transfer.

Each run is ``python -m dogbreed.train experiment=fashion_mnist ...`` in a subprocess; its ``metrics.json``
gives the test accuracy on the official 10,000 test images and the run's wall time.

    python scripts/bench_accuracy.py                    # the full recipe (README "Accuracy")
    python scripts/bench_accuracy.py --quick            # 500 images per class, 3 epochs: minutes on a CPU
    python scripts/bench_accuracy.py --transfer --seeds 1 2 3   # ImageNet MobileNetV2 vs random init, 100/class
    python scripts/bench_accuracy.py --ablate --quick   # the recipe, then each of its additions switched off
    python scripts/bench_accuracy.py --checkpoint RUN/checkpoints/epoch_014.ckpt   # test-time additions only
    python scripts/bench_accuracy.py --runtimes --quick  # each serving runtime's accuracy (--run RUN_DIR: a run's)

Every accuracy run also tests its best checkpoint again with each test-time addition (flip, EMA weights)
switched off: their effect on the same weights, without retraining.

``--runtimes`` packages a run's model with every export (``torch.export``, ONNX, OpenVINO FP32 and INT8, INT8
calibrated on the run's own training images) and scores each runtime on the whole official test set through the
serving path (the package's preprocessing, ``predict`` with its test-time flip), beside eager on the same images:
its accuracy, the points it loses and its top-1 agreement with eager. The goal for INT8 is at most 0.5 points lost.

``--transfer`` fine-tunes torchvision's MobileNetV2 from the ImageNet weights in ``../shared/weights/`` (or
``--weights``) and from random initialisation, with the same recipe and epochs, on 100 training images per
class, where pretrained features should matter most. Extra Hydra overrides go after the options
(``trainer.max_epochs=20``); with a GPU add ``preset=gpu``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from dogbreed._io import available_cpus
from dogbreed.data.layout import IMAGE_EXTENSIONS, display_name
from dogbreed.serve.calibration import CALIBRATION_SIZE, run_data
from dogbreed.serve.package import build_package, extract_package
from dogbreed.serve.runtime import load_model
from dogbreed.transforms import load_rgb

# zalandoresearch/fashion-mnist README, "Benchmark": test accuracy of the best-known results
PUBLISHED = (
    ("WRN40-4 8.9M params", 0.967),
    ("WRN-28-10 + random erasing", 0.963),
    ("WRN-28-10", 0.959),
    ("MobileNet", 0.950),
    ("ResNet18", 0.949),
    ("Human performance", 0.835),
)
BASELINE = "ResNet18"
# the recipe's additions to a plain ResNet-18 run, each switched off by one override (--ablate)
ABLATIONS = (
    ("ImageNet stem (model.stem=imagenet)", "model.stem=imagenet"),
    ("no random erasing (data.random_erasing=0)", "data.random_erasing=0"),
    ("no label smoothing (model.label_smoothing=0)", "model.label_smoothing=0"),
)
TRAIN_PER_CLASS = 5500  # Fashion-MNIST's training images per class once the validation split is carved out
REPO = Path(__file__).resolve().parents[1]
SHARED_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_backbone.pth"
# MobileNetV2 as the shared weights were trained: BatchNorm eps 1e-3, RGB in [0, 1], inputs upscaled to 96 px
MOBILENET = [
    "model.backbone=mobilenet_v2",
    "model.stem=imagenet",
    "+model.backbone_kwargs.norm_layer._target_=torch.nn.BatchNorm2d",
    "+model.backbone_kwargs.norm_layer._partial_=true",
    "+model.backbone_kwargs.norm_layer.eps=0.001",
    "data.image_size=96",
    "data.resize_size=96",
    "data.mean=[0,0,0]",
    "data.std=[1,1,1]",
    "data.random_erasing=0",
    "data.batch_size=32",
    "model/optimizer=adamw",
    "model.lr=1e-3",
    "model.weight_decay=1e-4",
    "trainer.check_val_every_n_epoch=3",
]


def train(name: str, overrides: list[str], out_root: Path) -> dict[str, Any]:
    """Run one training; return its test accuracy, epochs and wall time (the log stays in the run dir)."""
    out = out_root / name.replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dogbreed.train", "experiment=fashion_mnist", *overrides, f"hydra.run.dir={out}"]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    with open(out / "stdout.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        sys.exit(f"[{name}] failed (exit {code}); its output: {out / 'stdout.log'}")
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"acc": metrics["test/acc"], "epochs": metrics["epochs"], "wall_s": metrics["wall_time_s"],
              "ckpt": metrics.get("best_checkpoint")}  # fmt: skip
    print(f"[{name}] test/acc {result['acc']:.4f} in {result['wall_s']:.0f} s", flush=True)
    return result


def test_checkpoint(name: str, ckpt: Path, overrides: list[str], out_root: Path) -> float:
    """Test an existing checkpoint (``train=false``) and return its test accuracy."""
    return train(name, ["train=false", f"ckpt_path={ckpt}", "report=false", *overrides], out_root)["acc"]


def current_weights_checkpoint(ckpt: Path, out_root: Path) -> Path | None:
    """A copy of an EMA-trained checkpoint holding its current weights instead of their average; None without EMA."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if "current_model_state" not in state:
        return None
    state["state_dict"] = state.pop("current_model_state")
    path = out_root / f"{ckpt.stem}-current.ckpt"
    torch.save(state, path)
    return path


def test_time_ablations(ckpt: Path, acc: float, overrides: list[str], out_root: Path) -> None:
    """The checkpoint tested again with each test-time addition switched off: the flip, then the EMA weights."""
    print(f"\nTest-time additions, each switched off on the same checkpoint ({ckpt.name}):")
    print(f"\n| test | test acc | vs all |\n|---|---|---|\n| all | {acc:.4f} | |")
    no_flip = test_checkpoint("test-time-flip", ckpt, ["model.test_time_flip=false", *overrides], out_root)
    print(f"| no test-time flip (model.test_time_flip=false) | {no_flip:.4f} | {100 * (no_flip - acc):+.2f} points |")
    name = "current weights, not their EMA (callbacks.ema)"
    current = current_weights_checkpoint(ckpt, out_root)
    if current is None:
        print(f"| {name} | | not trained with EMA |")
        return
    other = test_checkpoint("test-time-ema", current, overrides, out_root)
    print(f"| {name} | {other:.4f} | {100 * (other - acc):+.2f} points |")


def recipe_overrides(args: argparse.Namespace) -> tuple[list[str], int | None]:
    """Overrides of the subset, epochs, seed and cache the options ask for; and the images per class."""
    per_class = args.train_per_class or (500 if args.quick else None)
    epochs = args.epochs or (3 if args.quick else None)
    overrides = [f"seed={args.seeds[0]}"]
    if args.cache_dir:
        overrides.append(f"paths.cache_dir={args.cache_dir}")
    if per_class:
        overrides.append(f"data.train_per_class={per_class}")
    if epochs:
        overrides.append(f"trainer.max_epochs={epochs}")
    return overrides, per_class


def accuracy(args: argparse.Namespace, out_root: Path) -> None:
    overrides, per_class = recipe_overrides(args)
    result = train("resnet18", [*overrides, *args.overrides], out_root)
    images = min(per_class or TRAIN_PER_CLASS, TRAIN_PER_CLASS) * 10 * result["epochs"]
    baseline = dict(PUBLISHED)[BASELINE]
    subset = f"{per_class}/class" if per_class else "full 55,000"
    print("\n| model | test acc | train images | epochs | wall time | train images/s |\n|---|---|---|---|---|---|")
    print(
        f"| dogbreed ResNet-18 (`experiment=fashion_mnist`, seed {args.seeds[0]}) | **{result['acc']:.4f}** | "
        f"{subset} | {result['epochs']} | {result['wall_s'] / 60:.1f} min | {images / result['wall_s']:.0f} |"
    )
    for name, acc in PUBLISHED:
        print(f"| {name} (published) | {acc:.3f} | 60,000 | | | |")
    gain = 100 * (result["acc"] - baseline)
    print(f"\ndogbreed - published {BASELINE}: {gain:+.2f} points ({subset}, {result['epochs']} epochs)")
    test_time_ablations(Path(result["ckpt"]), result["acc"], [*overrides, *args.overrides], out_root)


def checkpoint(args: argparse.Namespace, out_root: Path) -> None:
    """Test a checkpoint of an earlier run as it is, then with each test-time addition switched off."""
    overrides = [f"paths.cache_dir={args.cache_dir}"] if args.cache_dir else []
    acc = test_checkpoint("checkpoint", args.checkpoint, [*overrides, *args.overrides], out_root)
    test_time_ablations(args.checkpoint, acc, [*overrides, *args.overrides], out_root)


def ablate(args: argparse.Namespace, out_root: Path) -> None:
    """The recipe, then each addition switched off alone, on the same subset, epochs and seed."""
    overrides, per_class = recipe_overrides(args)
    recipe = train("recipe", [*overrides, *args.overrides], out_root)
    rows = [(name, train(f"ablate-{i}", [*overrides, change, *args.overrides], out_root)) for i, (name, change)
            in enumerate(ABLATIONS)]  # fmt: skip
    subset = f"{per_class} images per class" if per_class else "the full training set"
    print(f"\nexperiment=fashion_mnist on {subset}, {recipe['epochs']} epochs, seed {args.seeds[0]}:")
    print(f"\n| run | test acc | vs recipe |\n|---|---|---|\n| recipe | {recipe['acc']:.4f} | |")
    for name, result in rows:
        print(f"| {name} | {result['acc']:.4f} | {100 * (result['acc'] - recipe['acc']):+.2f} points |")


def runtimes(args: argparse.Namespace, out_root: Path) -> None:
    """Each runtime's test accuracy on the full test set, from one run's package, beside eager's."""
    run_dir = args.run
    if run_dir is None:
        overrides, _ = recipe_overrides(args)
        train("runtimes", [*overrides, "report=false", *args.overrides], out_root)
        run_dir = out_root / "runtimes"
    data = run_data(run_dir)
    if data is None or not (data / "test").is_dir():
        sys.exit(f"{run_dir}: its data-report.json names no staged dataset with a test/ split; give --run a run of "
                 "experiment=fashion_mnist whose staged data is still on this machine.")  # fmt: skip
    exports = ["export", "onnx", "openvino", "openvino-int8"]
    package = build_package(
        run_dir, out_root / "model.tar.gz", exports=exports, runtime="eager", calibration_size=args.calibration_size
    )
    unpacked = extract_package(package, out_root / "package")
    held_out = json.loads((unpacked / "package.json").read_text())["exports"]
    eager = load_model(unpacked, runtime="eager", num_threads=available_cpus())
    index = {name: i for i, name in enumerate(eager.class_names)}
    images = sorted(p for p in (data / "test").glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if args.test_images:  # evenly spaced over the sorted folders: every class, for a smoke test
        images = images[:: max(1, len(images) // args.test_images)][: args.test_images]
    labels = torch.tensor([index[display_name(path.parent.name)] for path in images])
    pixels = eager.preprocess(load_rgb(path) for path in images)
    print(f"\n{run_dir}: {len(images)} test images of {data / 'test'}, through the serving path")
    predictions = {}
    for runtime in ["eager", *exports]:
        model = eager if runtime == "eager" else load_model(unpacked, runtime=runtime, num_threads=available_cpus())
        predictions[runtime] = torch.cat([model.predict(batch).argmax(1) for batch in pixels.split(256)])
    base = (predictions["eager"] == labels).float().mean().item()
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    print(f"\nLightning's test loop on the best checkpoint: test/acc {metrics['test/acc']:.4f}")
    print("\n| runtime | test acc | vs eager | top-1 agreement with eager | held-out check at package time |")
    print("|---|---|---|---|---|")
    for runtime, predicted in predictions.items():
        acc = (predicted == labels).float().mean().item()
        agreement = (predicted == predictions["eager"]).float().mean().item()
        check = held_out.get(runtime, {}).get("held_out", {})
        recorded = f"agreement {check['top1_agreement']:.3f} on {check['images']} images" if check else ""
        print(f"| `{runtime}` | {acc:.4f} | {100 * (acc - base):+.2f} points | {agreement:.4f} | {recorded} |")
    lost = 100 * (base - (predictions["openvino-int8"] == labels).float().mean().item())
    print(f"\nINT8 loses {lost:.2f} points of test accuracy against eager (goal <= 0.5): "
          f"{'meets' if lost <= 0.5 else 'misses'} it")  # fmt: skip


def transfer(args: argparse.Namespace, out_root: Path) -> None:
    weights = Path(args.weights).resolve()
    if not weights.is_file():
        sys.exit(f"--weights {weights} does not exist; see ../shared/weights/README.md.")
    per_class = args.train_per_class or 100
    common = [*MOBILENET, f"data.train_per_class={per_class}", f"trainer.max_epochs={args.epochs or 15}"]
    if args.cache_dir:
        common.append(f"paths.cache_dir={args.cache_dir}")
    rows = []
    for seed in args.seeds:
        pretrained = train(f"mobilenet_v2-imagenet-seed{seed}", [*common, f"seed={seed}", f"model.weights={weights}",
                                                                  *args.overrides], out_root)  # fmt: skip
        scratch = train(f"mobilenet_v2-random-seed{seed}", [*common, f"seed={seed}", "model.weights=null",
                                                            *args.overrides], out_root)  # fmt: skip
        rows.append((seed, pretrained["acc"], scratch["acc"]))
    print(f"\nMobileNetV2 on {per_class} training images per class, {args.epochs or 15} epochs, official test set:")
    print("\n| seed | ImageNet weights | random init | difference |\n|---|---|---|---|")
    for seed, pre, rnd in rows:
        print(f"| {seed} | {pre:.4f} | {rnd:.4f} | {100 * (pre - rnd):+.1f} points |")
    pre_mean = statistics.mean(r[1] for r in rows)
    rnd_mean = statistics.mean(r[2] for r in rows)
    print(f"| mean | {pre_mean:.4f} | {rnd_mean:.4f} | {100 * (pre_mean - rnd_mean):+.1f} points |")
    print(f"\npretrained / random init accuracy: {pre_mean / rnd_mean:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 images per class and 3 epochs")
    parser.add_argument("--transfer", action="store_true", help="ImageNet MobileNetV2 vs random init, 100/class")
    parser.add_argument("--runtimes", action="store_true", help="each serving runtime's test accuracy beside eager's")
    parser.add_argument("--run", type=Path, help="--runtimes: an experiment=fashion_mnist run dir (default: train one)")
    parser.add_argument("--calibration-size", type=int, default=CALIBRATION_SIZE, help="--runtimes: INT8 images")
    parser.add_argument("--test-images", type=int, help="--runtimes: score this many test images (default: all)")
    parser.add_argument("--ablate", action="store_true", help="the recipe, then each addition switched off")
    parser.add_argument("--checkpoint", type=Path, help="test this checkpoint, then without each test-time addition")
    parser.add_argument("--train-per-class", type=int, help="training images per class (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs (default: the experiment's; 15 for --transfer)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds (--transfer runs each)")
    parser.add_argument("--weights", default=str(SHARED_WEIGHTS), help="MobileNetV2 backbone state dict")
    parser.add_argument("--cache-dir", help="paths.cache_dir of the runs (default: the config's)")
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    modes = (
        (args.transfer, transfer), (args.runtimes, runtimes), (args.ablate, ablate), (args.checkpoint, checkpoint)
    )  # fmt: skip
    run = next((mode for wanted, mode in modes if wanted), accuracy)
    if args.out:
        run(args, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="dogbreed-bench-accuracy-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
