"""Step-time overhead of the Debugger callback: the demo with and without it, same seed and data.

    flock /tmp/dogbreed-bench.lock python scripts/bench_debugger.py [--epochs 2] [--repeats 2]

Runs alternate (without, with, without, with, ...) so that load from other processes hits both alike.
The ratio is of mean training-step times (batch start to batch end, validation excluded), the median over
the pairs, measured twice: in process CPU time (what the callback adds; other processes' load barely
moves it, so it is the number to trust on a shared machine) and in wall time. torch runs on one thread
so that CPU time is not inflated by threads spinning at barriers. The goal is <= 1.05 with the default
intervals (save_interval=100, eval_save_interval=10); 3 epochs (138 steps) include two full saves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import open_dict

from dogbreed.callbacks import Debugger
from dogbreed.config import compose_config
from dogbreed.train import train


class StepTimer(L.Callback):
    """Training-step wall and process-CPU durations (batch start to batch end), the same in both runs."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.wall.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def run(with_debugger: bool, epochs: int, limit_batches: int | None, out: Path) -> tuple[float, float]:
    """One demo run; returns the mean step time in (CPU seconds, wall seconds)."""
    cfg = compose_config("train", ["experiment=demo", "callbacks=none", "logger=none"])
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
    train(cfg, extra_callbacks=callbacks)
    return statistics.fmean(timer.cpu), statistics.fmean(timer.wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="demo epochs per run (46 steps each)")
    parser.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu_ratios, wall_ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            base_cpu, base_wall = run(False, args.epochs, args.limit_batches, Path(tmp) / f"base{i}")
            dbg_cpu, dbg_wall = run(True, args.epochs, args.limit_batches, Path(tmp) / f"dbg{i}")
            cpu_ratios.append(dbg_cpu / base_cpu)
            wall_ratios.append(dbg_wall / base_wall)
            print(f"pair {i}: mean step CPU {base_cpu * 1000:.1f} ms without, {dbg_cpu * 1000:.1f} ms with the "
                  f"debugger (ratio {dbg_cpu / base_cpu:.3f}); wall {base_wall * 1000:.1f} / {dbg_wall * 1000:.1f} ms "
                  f"(ratio {dbg_wall / base_wall:.3f})", flush=True)  # fmt: skip
    print(f"step-time overhead ratio, CPU time (median of {args.repeats} pairs): {statistics.median(cpu_ratios):.3f}")
    print(f"step-time overhead ratio, wall time (median of {args.repeats} pairs): {statistics.median(wall_ratios):.3f}")


if __name__ == "__main__":
    main()
