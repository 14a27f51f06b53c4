"""Training throughput of dogbreed's Lightning path vs a plain PyTorch loop, measured in one run.

Both sides train the same network (``DogBreedClassifier``'s ResNet-18) on the same data loader, batch
size and thread count; the Lightning side uses the composed demo config (trainer, callbacks, logger,
optimiser and schedule) exactly as ``python -m dogbreed.train experiment=demo`` builds it. The timed span
of each side runs from the end of the last warm-up step to the end of the last step, data loading
included. Repeats alternate the order so that neither side always runs on a warmer machine.

    python scripts/bench_train.py [--steps 40] [--repeats 3]

Prints steps/s of each side and the ratio plain/Lightning (the goal is <= 1.05 on CPU).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from dogbreed.train import CONFIG_DIR, instantiate_group


def demo_config(out_dir: Path, batch_size: int, steps: int) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["experiment=demo"])
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
    """Wall time from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def lightning_steps_per_s(cfg: DictConfig, warmup: int, steps: int) -> float:
    L.seed_everything(0, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    clock = _StepClock(warmup)
    callbacks = [*instantiate_group(cfg.callbacks, "callback"), clock]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.logger, "logger"))
    trainer.fit(model, datamodule=datamodule)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    plain, lightning = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(Path(tmp), args.batch_size, args.warmup + args.steps)
        for repeat in range(args.repeats):
            order = [("plain", plain_steps_per_s, plain), ("lightning", lightning_steps_per_s, lightning)]
            for name, measure, results in order if repeat % 2 == 0 else order[::-1]:
                results.append(measure(cfg, args.warmup, args.steps))
                print(f"repeat {repeat} {name:>9}: {results[-1]:.2f} steps/s")
    p, lt = statistics.median(plain), statistics.median(lightning)
    setup = f"batch {args.batch_size}, {args.threads} threads, {args.steps} steps x {args.repeats}"
    print(f"\nResNet-18, demo data, {setup}")
    print(f"plain PyTorch loop : {p:.2f} steps/s (median)")
    print(f"dogbreed Lightning : {lt:.2f} steps/s (median)")
    print(f"ratio plain/Lightning: {p / lt:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
