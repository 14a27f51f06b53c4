"""Learning-rate schedules stepped every optimiser step, built from ``_partial_`` configs.

Each factory takes the optimiser and the run's total step count (known only once the trainer has seen
the data), so configs state shapes (warm-up fraction, milestones) rather than step numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(
    optimizer: Optimizer, *, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio`` x lr."""
    warmup = max(1, round(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step_decay(
    optimizer: Optimizer, *, total_steps: int, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1
) -> LambdaLR:
    """Multiply the lr by ``gamma`` at each milestone, given as a fraction of the run."""
    marks = sorted(round(m * total_steps) for m in milestones)
    return LambdaLR(optimizer, lambda step: gamma ** sum(step >= m for m in marks))
