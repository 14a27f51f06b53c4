"""``EMAWeights``: an exponential moving average of the weights, tested and exported as well as validated."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


def ema_with_warmup(
    average: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor, *, decay: float
) -> torch.Tensor:
    """One EMA step whose decay ramps up as ``(1 + n) / (10 + n)`` towards ``decay``.

    A fixed 0.999 from the first step would keep the random initialisation in the average for thousands of
    steps, so a short run would validate and export weights close to its starting point.
    """
    d = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay).to(average.dtype)
    return average * d + current * (1 - d)


class EMAWeights(WeightAveraging):
    """Exponential moving average of the weights (and BatchNorm statistics), updated after every optimiser step.

    Lightning's ``WeightAveraging`` swaps the average in for validation, writes it as the checkpoints'
    ``state_dict`` (the current weights go under ``current_model_state``) and copies it into the model when
    training ends. Lightning also loads a checkpoint's current weights back into the model whenever it loads a
    checkpoint, so testing the best checkpoint would test (and export) other weights than the validation that
    chose it; here only a resumed fit restores them.

    Args:
        decay: Weight of the old average at each step once warmed up (0.999: about the last 1,000 steps).
        device: Where the average is kept: None beside the model; ``cpu`` spares accelerator memory for a copy
            of the weights, at the price of a transfer every step.
    """

    def __init__(self, decay: float = 0.999, device: torch.device | str | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be between 0 and 1, got {decay}.")
        super().__init__(device=device, use_buffers=True, avg_fn=partial(ema_with_warmup, decay=decay))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
