"""``ResumeState``: what a checkpoint needs, besides weights, optimiser and loops, for an exact resume."""

from __future__ import annotations

import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from dogbreed.callbacks.checkpoint_io import agree_on_checkpoint

CHECKPOINT_KEY = "dogbreed_resume_state"


def rng_states() -> dict[str, Any]:
    """The states of every generator training draws from, as types ``torch.load(weights_only=True)`` reads."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` took (CUDA states only where this process has the same GPUs)."""
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumeState(Callback):
    """Keep the random generators' states and the run's wall time in every checkpoint, and restore them.

    Lightning's checkpoint holds no RNG state, so a resumed run drew other shuffles, crops and DataLoader
    worker seeds than the run it continues, and its test metrics differed. The states are taken when a
    checkpoint is saved (after validation: nothing draws from them before the next epoch's loader starts)
    and put back as a fit loads it: after the model was built, before Lightning creates the first training
    loader iterator (while setting up the optimisers' schedule); the sanity check runs with its RNG
    isolated. Testing a checkpoint leaves them alone. Under DDP every rank gets rank 0's states (the
    checkpoint holds one copy).

    ``wall_time_s`` counts this process and, for a resumed run, the earlier processes up to the checkpoint.
    """

    def __init__(self) -> None:
        self.ckpt_path: str | None = None  # what fit starts from (train sets it): the same in every process
        self.started = time.perf_counter()
        self.earlier_s = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:  # the process group is up, nothing restored yet
            agree_on_checkpoint(trainer, self.ckpt_path)

    @property
    def wall_time_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"rng": rng_states(), "wall_time_s": self.wall_time_s}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None and trainer.state.fn == TrainerFn.FITTING:
            set_rng_states(state["rng"])
            self.earlier_s = state["wall_time_s"]
