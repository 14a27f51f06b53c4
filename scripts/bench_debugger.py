"""Step-time overhead of the Debugger callback: the demo with and without it, same seed and data.

    flock /tmp/dogbreed-bench.lock python scripts/bench_debugger.py [--epochs 2] [--repeats 2]

Runs alternate (without, with, without, with, ...) so that load from other processes hits both alike;
the ratio is of mean training-step times (batch start to batch end, validation excluded), the median over
the pairs. The goal is <= 1.05 with the default intervals (save_interval=100, eval_save_interval=10).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from dogbreed.callbacks import Debugger
from dogbreed.train import CONFIG_DIR, train


class StepTimer(L.Callback):
    """Training-step durations (batch start to batch end), the same in both runs."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.durations.append(time.perf_counter() - self._t0)


def run(with_debugger: bool, epochs: int, limit_batches: int | None, out: Path) -> tuple[float, float]:
    """One demo run; returns (mean step seconds, wall seconds of fit)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["experiment=demo", "callbacks=none", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.model_dir = str(out / "model")
        cfg.trainer.update(max_epochs=epochs, enable_progress_bar=False, enable_checkpointing=False,
                           enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
        if limit_batches:
            cfg.trainer.limit_train_batches = limit_batches
        cfg.update(test=False, report=False)
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer] + ([Debugger(run_dir=out)] if with_debugger else [])
    start = time.perf_counter()
    train(cfg, extra_callbacks=callbacks)
    return statistics.fmean(timer.durations), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="demo epochs per run (46 steps each)")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ratios, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            base, base_wall = run(False, args.epochs, args.limit_batches, Path(tmp) / f"base{i}")
            dbg, dbg_wall = run(True, args.epochs, args.limit_batches, Path(tmp) / f"dbg{i}")
            ratios.append(dbg / base)
            walls.append(dbg_wall / base_wall)
            print(f"pair {i}: mean step {base * 1000:.1f} ms without, {dbg * 1000:.1f} ms with the debugger: "
                  f"ratio {dbg / base:.3f} (fit wall time ratio {dbg_wall / base_wall:.3f})", flush=True)  # fmt: skip
    print(f"step-time overhead ratio (median of {args.repeats} pairs): {statistics.median(ratios):.3f}")
    print(f"fit wall-time ratio (incl. validation):          {statistics.median(walls):.3f}")


if __name__ == "__main__":
    main()
