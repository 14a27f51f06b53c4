"""Tuning analytics: a tuning job's per-job table (CSV) and a plot of the objective against each hyperparameter."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dogbreed.sagemaker.session import LaunchError

log = logging.getLogger(__name__)


def analytics(session: Any, *, tuning_job: str | None, params: Sequence[str], output_dir: str) -> Path:
    """Save ``<output_dir>/<tuning_job>/jobs.csv`` and ``jobs.png``; return the CSV's path."""
    from sagemaker.core.analytics import HyperparameterTuningJobAnalytics

    if not tuning_job:
        raise LaunchError("set sagemaker.analytics.tuning_job=<tuning job name>.")
    frame = HyperparameterTuningJobAnalytics(tuning_job, sagemaker_session=session).dataframe()
    out = Path(output_dir) / tuning_job
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "jobs.csv", index=False)
    plot_tuning_jobs(frame, list(params), out / "jobs.png")
    log.info("%d training jobs: %s", len(frame), out / "jobs.csv")
    return out / "jobs.csv"


def plot_tuning_jobs(frame: Any, params: list[str], path: Path) -> None:
    """Objective over job start time, and against each tuned hyperparameter (log axes where positive)."""
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in params if p in frame.columns]
    done = frame.dropna(subset=["FinalObjectiveValue"])
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(4 * (1 + len(params)), 3.5), squeeze=False)
    axes = axes[0]
    axes[0].plot(range(len(done)), done["FinalObjectiveValue"].cummax(), drawstyle="steps-post", label="best so far")
    axes[0].scatter(range(len(done)), done["FinalObjectiveValue"], s=12, label="job")
    axes[0].set(xlabel="job (by start time)", ylabel="objective", title="tuning history")
    axes[0].legend()
    for ax, name in zip(axes[1:], params, strict=True):
        # a categorical value may come back JSON-encoded ('"32"'), as a v2-launched job sent it
        values = pd.to_numeric(done[name].astype(str).str.strip('"'), errors="coerce")
        ax.scatter(values, done["FinalObjectiveValue"], s=12)
        if (values > 0).all() and values.max() / max(values.min(), 1e-30) > 20:
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="objective")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
