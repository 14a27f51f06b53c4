"""The report's figures: matplotlib (Agg) rendered to base64 PNG so the HTML is one self-contained file."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from dogbreed.rundir import ProfileData, Trial

# text in points: 10 pt at the report's 90 dpi is 12.5 px, next to the page's 14 px table text
FONT = 10


def to_base64(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _timed(data: ProfileData, key: str, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """Seconds since ``t0`` and values of the samples that have ``key`` (older runs lack the ``proc_*`` fields)."""
    rows = [(s["t"] - t0, s[key]) for s in data.system if key in s]
    return (np.asarray([r[0] for r in rows], dtype=float), np.asarray([r[1] for r in rows], dtype=float))


def _legend_outside(ax: plt.Axes) -> None:
    """Legend right of the panel, so it never hides the lines (CPU often sits at 100 %, under an inner legend)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=FONT, frameon=False)


def system_timeline(data: ProfileData) -> str | None:
    """CPU and memory of the machine beside those of the training processes (main + DataLoader workers), GPUs."""
    if not data.system:
        return None
    t0 = data.system[0]["t"]
    panels = 2 + int(data.has_gpu)
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2.6 * panels), sharex=True)
    cores = np.asarray([s["cpu"] for s in data.system], dtype=float)
    t, total = _timed(data, "cpu_total", t0)
    if cores.ndim == 2 and cores.shape[1] <= 16:
        for i in range(cores.shape[1]):
            axes[0].plot(t, cores[:, i], lw=0.6, alpha=0.35, color="C0", label="machine, per core" if i == 0 else None)
    axes[0].plot(t, total, color="C0", label="machine, all processes")
    own_t, own = _timed(data, "proc_cpu", t0)
    if own.size:
        axes[0].plot(own_t, own, color="C1", lw=1.6, label="training processes")
    axes[0].plot(*_timed(data, "iowait", t0), color="C3", lw=0.8, label="I/O wait")
    axes[0].set_ylabel("CPU % of all cores")
    axes[0].set_ylim(0, 105)
    _legend_outside(axes[0])
    axes[1].plot(*_timed(data, "mem_percent", t0), color="C2", label="machine, used")
    own_t, own = _timed(data, "proc_mem_percent", t0)
    if own.size:
        axes[1].plot(own_t, own, color="C1", lw=1.6, label="training processes")
    axes[1].set_ylabel("memory %")
    axes[1].set_ylim(bottom=0)
    _legend_outside(axes[1])
    if data.has_gpu:
        util, mem = data.gpu_series("util"), data.gpu_series("mem_percent")
        for g in range(util.shape[1]):
            axes[2].plot(t[: len(util)], util[:, g], label=f"GPU{g} util")
            axes[2].plot(t[: len(mem)], mem[:, g], ls="--", label=f"GPU{g} memory")
        axes[2].set_ylabel("GPU %")
        _legend_outside(axes[2])
    axes[-1].set_xlabel("seconds since the monitor started")
    return to_base64(fig)


def step_plots(data: ProfileData, stddev: float = 3.0) -> str | None:
    if len(data.steps) < 2:
        return None
    steps = np.asarray([s["step"] for s in data.steps])
    dur = data.step_values("duration") * 1000
    wait = np.nan_to_num(data.step_values("dataloader")) * 1000
    steady = dur[1:]
    limit = steady.mean() + stddev * steady.std()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    ax1.plot(steps, dur, lw=0.8, label="step")
    ax1.plot(steps, wait, lw=0.8, label="waiting for data")
    out = np.flatnonzero(dur > limit)
    out = out[out > 0]
    ax1.scatter(steps[out], dur[out], color="red", zorder=3, s=14, label=f"outlier (> mean + {stddev:g} std)")
    ax1.axhline(limit, color="red", lw=0.6, ls="--")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("ms")
    ax1.set_yscale("log")
    ax1.legend(fontsize=FONT, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    ax2.hist(steady, bins=min(50, max(5, len(steady) // 3)), color="C0")
    ax2.axvline(limit, color="red", lw=0.8, ls="--")
    ax2.set_xlabel("step duration (ms, first step excluded)")
    ax2.set_ylabel("steps")
    return to_base64(fig)


def loss_curves(trial: Trial | None, metrics_csv: list[dict[str, str]]) -> str | None:
    """Per-step training loss and per-validation losses (debugger), accuracies per epoch (CSV logger)."""
    has_loss = trial is not None and trial.loss("train")[0].size > 0
    epochs = _epoch_metrics(metrics_csv)
    if not has_loss and not epochs:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    if has_loss:
        steps, values = trial.loss("train")
        ax1.plot(steps, values, lw=0.5, alpha=0.5, color="C0", label="train (step)")
        if len(values) >= 10:
            k = max(5, len(values) // 30)
            ax1.plot(
                steps[k - 1 :], np.convolve(values, np.ones(k) / k, "valid"), color="C0", label=f"train ({k}-step mean)"
            )
        val = [r for r in trial.losses if r["mode"] == "eval"]
        by_round: dict[int, list[float]] = {}
        for r in val:
            by_round.setdefault(r.get("train_step", 0), []).append(float(r["value"]))
        if by_round:
            xs = sorted(by_round)
            ax1.plot(xs, [np.mean(by_round[x]) for x in xs], "o-", color="C1", label="validation")
        ax1.set_xlabel("training step")
    elif epochs:
        for key in ("train/loss_epoch", "val/loss"):
            xs = [e for e in sorted(epochs) if key in epochs[e]]
            ax1.plot(xs, [epochs[e][key] for e in xs], "o-", label=key)
        ax1.set_xlabel("epoch")
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=FONT, loc="best")
    for key in ("train/acc", "val/acc", "val/acc_top5"):
        xs = [e for e in sorted(epochs) if key in epochs[e]]
        if xs:
            ax2.plot(xs, [epochs[e][key] for e in xs], "o-", label=key)
    ax2.set_xlabel("epoch")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 0.25"
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.05)  # a curve at 1.0 stays off the frame
    if epochs:
        ax2.legend(fontsize=FONT, loc="best")
    return to_base64(fig)


def _epoch_metrics(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        if not row.get("epoch"):
            continue
        epoch = int(float(row["epoch"]))
        for key, value in row.items():
            if key not in ("epoch", "step") and value not in ("", None):
                try:
                    out.setdefault(epoch, {})[key] = float(value)
                except ValueError:
                    continue
    return out


def gradient_grid(trial: Trial, max_layers: int = 40) -> tuple[list[str], list[int], np.ndarray]:
    """Layer names, the steps that saved gradients, and ``log10`` L2 norms (layers x steps, NaN where unsaved).

    Only steps that saved gradients get a column: the debugger also saves steps with ReLU inputs alone (for
    ``dead_relu``), which would be blank columns here.
    """
    names = [n for n in trial.tensor_names("gradients", mode="train") if n.endswith("weight")]
    if len(names) > max_layers:
        names = [names[i] for i in np.linspace(0, len(names) - 1, max_layers).astype(int)]
    series = {name: trial.tensor(name, "l2") for name in names}
    steps = sorted({int(s) for saved, _ in series.values() for s in saved})
    grid = np.full((len(names), len(steps)), np.nan)
    col = {s: i for i, s in enumerate(steps)}
    for row, name in enumerate(names):
        for s, v in zip(*series[name], strict=True):
            grid[row, col[int(s)]] = math.log10(v) if v > 0 and math.isfinite(v) else np.nan
    return names, steps, grid


def gradient_figure(trial: Trial, max_layers: int = 40, max_labels: int = 40) -> plt.Figure | None:
    """Heatmap of log10 L2 gradient norm per layer (rows) and gradient-saving step (columns, each labelled
    up to ``max_labels`` columns, every k-th beyond)."""
    names, steps, grid = gradient_grid(trial, max_layers)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(11, 0.24 * len(names) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 ‖gradient‖₂")
    ax.set_yticks(range(len(names)), [n.removeprefix("gradients/") for n in names], fontsize=FONT)
    ticks = range(0, len(steps), math.ceil(len(steps) / max_labels))
    ax.set_xticks(ticks, [steps[i] for i in ticks], fontsize=FONT, rotation=90 if len(ticks) > 16 else 0)
    ax.set_xlabel("training step (steps that saved gradients)")
    return fig


def gradient_norms(trial: Trial | None) -> str | None:
    fig = gradient_figure(trial) if trial is not None else None
    return to_base64(fig) if fig is not None else None


def confusion_figure(matrix: list[list[int]], names: list[str]) -> plt.Figure:
    """Row-normalised confusion matrix; class names at a readable size, every k-th one when they cannot all fit.

    The figure is at most as wide as the report (1,100 px at 90 dpi) so the browser never shrinks its text.
    """
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(names)
    size = min(12.2, 3.5 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.88))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    # room left for the matrix once names and colour bar are drawn, and the pitch a FONT-pt name needs
    every = math.ceil(n * (FONT * 1.4 / 72) / max(size - 4.0, 1.0))
    ticks = range(0, n, every)
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=FONT)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=FONT)
    ax.set_xlabel("predicted" if every == 1 else f"predicted (1 class in {every} named, {n} in all)")
    ax.set_ylabel("true")
    return fig


def confusion_png(matrix: list[list[int]], names: list[str]) -> str:
    return to_base64(confusion_figure(matrix, names))


def summary_bar(phases: dict[str, Any]) -> str | None:
    values = {k: v for k, v in phases.items() if v is not None and v >= 0}
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(10, 1.3))
    left = 0.0
    for i, (name, seconds) in enumerate(values.items()):
        ax.barh(0, seconds, left=left, color=f"C{i}", label=f"{name} {seconds:.1f} s")
        left += seconds
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.legend(fontsize=FONT, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return to_base64(fig)
