"""The debugger's tensor files under ``<run>/debug-output/`` and ``load_trial``, the reader.

Steps count on across a resume from a checkpoint: the resumed run drops what the interrupted one wrote
past its checkpoint and goes on from there.

Format (JSON lines, one object per line, append-only so a crashed run keeps what it wrote):

``losses.jsonl``
    ``{"step": 12, "mode": "train", "value": 2.31}``: every training step; ``mode: "eval"`` lines
    are validation batches, with ``train_step``, the training step the validation ran after.
``tensors.jsonl``
    ``{"step": 100, "mode": "train", "name": "gradients/net.fc.weight", "mean": ..., "std": ...,
    "abs_mean": ..., "l2": ..., "zeros": ...}``: per-layer reductions every ``save_interval`` steps.
    Names start with their collection: ``weights/``, ``gradients/``, ``activations/`` (module
    outputs) and ``relu_input/``; ``zeros`` is the fraction of exact zeros.
``meta.json``
    Model class, save intervals, class counts: what the report needs besides the tensors.
``rule-results.json``
    The debugger rules' verdicts (see :class:`dogbreed.callbacks.rules.RuleResult`).

Example::

    trial = load_trial("outputs/train/runs/2026-01-01_12-00-00")
    steps, norms = trial.tensor("gradients/net.fc.weight", "l2")
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dogbreed.callbacks._jsonl import keep_records

DEBUG_DIR = "debug-output"
LOSSES = "losses.jsonl"
TENSORS = "tensors.jsonl"
META = "meta.json"
RULE_RESULTS = "rule-results.json"
REDUCTIONS = ("mean", "std", "abs_mean", "l2", "zeros")


def reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``[mean, std, abs_mean, l2, zeros]`` of a tensor, as one small tensor (one device sync per batch)."""
    t = tensor.detach().float()
    if t.numel() == 0:
        return torch.full((5,), float("nan"), device=t.device)
    std = t.std() if t.numel() > 1 else torch.zeros((), device=t.device)
    return torch.stack([t.mean(), std, t.abs().mean(), torch.linalg.vector_norm(t), (t == 0).float().mean()])


def stats_dict(values: Iterable[float]) -> dict[str, float]:
    return dict(zip(REDUCTIONS, (float(v) for v in values), strict=True))


def _finite_or_str(value: float) -> float | str:
    """JSON has no NaN/Inf: keep them readable as strings ("nan", "inf") instead of invalid JSON."""
    return value if math.isfinite(value) else str(value)


def _from_json(value: Any) -> float:
    return float(value)


class DebugWriter:
    """Append losses and tensor reductions to ``<run>/debug-output/`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir) / DEBUG_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        self._losses = open(self.dir / LOSSES, "a")  # noqa: SIM115 - kept open for the whole run
        self._tensors = open(self.dir / TENSORS, "a")  # noqa: SIM115

    def drop_from(self, step: int, eval_step: int) -> None:
        """Forget training records from ``step`` on and validation records from ``eval_step`` on.

        A run resumed from a checkpoint records those steps again; the killed process may have written some.
        """
        self.close()
        for name in (LOSSES, TENSORS):
            keep_records(self.dir / name, lambda r: r["step"] < (eval_step if r["mode"] == "eval" else step))
        self._open()

    def write_losses(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            rec = {**rec, "value": _finite_or_str(float(rec["value"]))}
            self._losses.write(json.dumps(rec) + "\n")
        self._losses.flush()

    def write_tensors(self, step: int, mode: str, stats: dict[str, dict[str, float]]) -> None:
        for name, values in stats.items():
            rec = {"step": step, "mode": mode, "name": name, **{k: _finite_or_str(v) for k, v in values.items()}}
            self._tensors.write(json.dumps(rec) + "\n")
        self._tensors.flush()

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.dir / name)

    def close(self) -> None:
        self._losses.close()
        self._tensors.close()


@dataclass
class Trial:
    """What one run's debugger saved: losses, per-layer reductions, metadata and rule verdicts."""

    path: Path
    losses: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rule_results: list[dict[str, Any]] = field(default_factory=list)

    def tensor_names(self, collection: str | None = None, mode: str | None = None) -> list[str]:
        """Saved tensor names in network order, optionally of one collection (``gradients``) and mode."""
        names = dict.fromkeys(
            r["name"]
            for r in self.records
            if (mode is None or r["mode"] == mode) and (collection is None or r["name"].startswith(f"{collection}/"))
        )
        return list(names)

    def steps(self, mode: str = "train") -> list[int]:
        """Steps at which tensors were saved in ``mode``."""
        return sorted({r["step"] for r in self.records if r["mode"] == mode})

    def tensor(self, name: str, reduction: str = "l2", mode: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one reduction of one tensor over the run."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} is not saved; use one of {REDUCTIONS}.")
        rows = sorted(
            (r["step"], _from_json(r[reduction])) for r in self.records if r["name"] == name and r["mode"] == mode
        )
        if not rows:
            raise KeyError(f"no tensor {name!r} in mode {mode!r}; trial.tensor_names() lists what was saved.")
        steps, values = zip(*rows, strict=True)
        return np.asarray(steps), np.asarray(values, dtype=float)

    def loss(self, mode: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of the saved losses (training steps, or validation batches for ``eval``)."""
        rows = [(r["step"], _from_json(r["value"])) for r in self.losses if r["mode"] == mode]
        if not rows:
            return np.zeros(0, dtype=int), np.zeros(0)
        steps, values = zip(*rows, strict=True)
        return np.asarray(steps), np.asarray(values, dtype=float)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
    return rows


def load_trial(run_dir: str | Path) -> Trial:
    """Read ``<run_dir>/debug-output/`` (``run_dir`` may also be the ``debug-output`` folder itself)."""
    path = Path(run_dir)
    if path.name != DEBUG_DIR:
        path = path / DEBUG_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: the run had no debugger callback (add callbacks=default, which includes it)."
        )
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    rules = json.loads((path / RULE_RESULTS).read_text()) if (path / RULE_RESULTS).is_file() else []
    return Trial(path, _read_jsonl(path / LOSSES), _read_jsonl(path / TENSORS), meta, rules)
