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

from dogbreed.callbacks.debug_output import Trial
from dogbreed.callbacks.profiler_rules import ProfileData


def to_base64(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def system_timeline(data: ProfileData) -> str | None:
    if not data.system:
        return None
    t = data.series("t")
    t = t - t[0]
    panels = 2 + int(data.has_gpu)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 2.4 * panels), sharex=True)
    cores = np.asarray([s["cpu"] for s in data.system], dtype=float)
    axes[0].plot(t, data.series("cpu_total"), label="CPU total", color="C0")
    if cores.ndim == 2 and cores.shape[1] <= 16:
        for i in range(cores.shape[1]):
            axes[0].plot(t, cores[:, i], lw=0.6, alpha=0.4, color="C0")
    axes[0].plot(t, data.series("iowait"), label="I/O wait", color="C3")
    axes[0].set_ylabel("CPU %")
    axes[0].set_ylim(0, 105)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(t, data.series("mem_percent"), color="C2")
    axes[1].set_ylabel("memory %")
    if data.has_gpu:
        util, mem = data.gpu_series("util"), data.gpu_series("mem_percent")
        for g in range(util.shape[1]):
            axes[2].plot(t[: len(util)], util[:, g], label=f"GPU{g} util")
            axes[2].plot(t[: len(mem)], mem[:, g], ls="--", label=f"GPU{g} memory")
        axes[2].set_ylabel("GPU %")
        axes[2].legend(loc="upper right", fontsize=8)
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
    ax1.legend(fontsize=8)
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
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=8)
    for key in ("train/acc", "val/acc", "val/acc_top5"):
        xs = [e for e in sorted(epochs) if key in epochs[e]]
        if xs:
            ax2.plot(xs, [epochs[e][key] for e in xs], "o-", label=key)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    if epochs:
        ax2.legend(fontsize=8)
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


def gradient_norms(trial: Trial | None, max_layers: int = 40) -> str | None:
    """Heatmap of log10 L2 gradient norm per layer (rows) and saved step (columns)."""
    if trial is None:
        return None
    names = [n for n in trial.tensor_names("gradients", mode="train") if n.endswith("weight")]
    if not names:
        return None
    if len(names) > max_layers:
        names = [names[i] for i in np.linspace(0, len(names) - 1, max_layers).astype(int)]
    steps = trial.steps("train")
    grid = np.full((len(names), len(steps)), np.nan)
    col = {s: i for i, s in enumerate(steps)}
    for row, name in enumerate(names):
        for s, v in zip(*trial.tensor(name, "l2"), strict=True):
            grid[row, col[int(s)]] = math.log10(v) if v > 0 and math.isfinite(v) else np.nan
    fig, ax = plt.subplots(figsize=(11, 0.22 * len(names) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="log10 ‖gradient‖₂")
    ax.set_yticks(range(len(names)), [n.removeprefix("gradients/") for n in names], fontsize=7)
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 12)).astype(int)
    ax.set_xticks(ticks, [steps[i] for i in ticks], fontsize=7)
    ax.set_xlabel("training step (saved steps)")
    return to_base64(fig)


def confusion_png(matrix: list[list[int]], names: list[str]) -> str:
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(12.0, 3 + 0.3 * len(names))
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return to_base64(fig)


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
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return to_base64(fig)
