"""Print each epoch's metrics as one ``key=value`` line: readable in a terminal, parseable by log scrapers.

SageMaker's ``metric_definitions`` regexes are generated from this exact format (``val/acc=0.8123``),
so the metrics a job reports are the ones the training logs.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def format_metrics(metrics: dict[str, float]) -> str:
    """``{"val/acc": 0.81}`` -> ``val/acc=0.81`` (sorted).

    Each value is the float's ``repr``, the shortest text that reads back as the same float, so a scraper
    records exactly what ``metrics.csv`` holds: ``0.10000000149011612``, ``1e-05``, ``3.0``, ``nan``.
    """
    return " ".join(f"{k}={float(v)!r}" for k, v in sorted(metrics.items()))


class LogMetrics(Callback):
    """Log ``epoch=N train/... val/...`` once per training epoch and ``test test/...`` after testing.

    Validation metrics are printed only in epochs where validation ran, never stale.
    """

    def __init__(self) -> None:
        self._validated = False

    @staticmethod
    def _emit(trainer: L.Trainer, prefix: tuple[str, ...], header: str) -> None:
        metrics = {
            k: v for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and not k.endswith("_step")
        }
        metrics = {k.removesuffix("_epoch"): v for k, v in metrics.items()}
        if metrics:
            log.info("%s %s", header, format_metrics(metrics))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prefixes = ("train/", "val/") if self._validated else ("train/",)
        self._emit(trainer, prefixes, f"epoch={trainer.current_epoch}")
        self._validated = False

    @rank_zero_only
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(trainer, ("test/",), "test")
