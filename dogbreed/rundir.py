"""The run directory: every file name a run writes, with its writer and its reader.

One home for the layout, so the callbacks that write a run, the reports that read it and the tuner agree
without importing each other (the report rebuilds from a run dir in a process without Lightning)::

    <run>/
      metrics.json, confusion_matrix.csv/.png   test results (:mod:`dogbreed.artifacts` writes them)
      model/                                    weights and what inference needs (:mod:`dogbreed.artifacts`)
      csv/**/metrics.csv                        the CSV logger's per-epoch metrics
      debug-output/     losses.jsonl, tensors.jsonl, meta.json, rule-results.json
                        (:class:`DebugWriter`, :func:`load_trial`)
      profiler-output/  system.jsonl, steps.jsonl, meta.json, rule-results.json, trace.json, top_ops.txt/.json
                        (:func:`load_profile`; the profiler callback writes them)
      report/         profiler-report.html, rules.json (training) or tuning-report.html (tuning)
      mlflow-run.json   the MLflow run this run dir logs to (logger=mlflow; :mod:`dogbreed.tracking`)
    <tune dir>/ trials.csv, study.json, best_overrides.txt, plots/<name>.png, trials/<NNN>/ (one run dir each)

Steps count on across a resume from a checkpoint: the resumed run drops what the interrupted one wrote past
its checkpoint (:func:`keep_records`) and goes on from there.

Debugger format (JSON lines, one object per line, append-only so a crashed run keeps what it wrote):

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
    The rules' verdicts (see :class:`dogbreed.rules.RuleResult`), in both output folders.

Profiler format: ``system.jsonl`` (see :mod:`dogbreed.callbacks.system_monitor`), ``steps.jsonl``
(``{"step", "start", "duration", "dataloader", "forward", "backward", "optimizer"}``, in seconds) and
``meta.json`` (job timeline: ``created``, ``first_step``, ``train_end``, ``end``).

Example::

    trial = load_trial("outputs/train/runs/2026-01-01_12-00-00")
    steps, norms = trial.tensor("gradients/net.fc.weight", "l2")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dogbreed._io import read_jsonl, write_json, write_text

# training run
METRICS = "metrics.json"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
LOGGED_METRICS = "csv/**/metrics.csv"  # csv/metrics.csv, or csv/version_N/metrics.csv
DATA_REPORT = "data-report.json"
MODEL_DIR = "model"
# inside model/
MODEL_WEIGHTS = "model.pt"
MODEL_CONFIG = "model_config.json"
CLASSES = "classes.json"
PREPROCESSING = "preprocessing.json"
# debugger and profiler output
RULE_RESULTS = "rule-results.json"
DEBUG_DIR = "debug-output"
LOSSES = "losses.jsonl"
TENSORS = "tensors.jsonl"
DEBUG_META = "meta.json"
REDUCTIONS = ("mean", "std", "abs_mean", "l2", "zeros")
PROFILER_DIR = "profiler-output"
SYSTEM = "system.jsonl"
STEPS = "steps.jsonl"
PROFILER_META = "meta.json"
TRACE = "trace.json"
TOP_OPS = "top_ops.json"
TOP_OPS_TXT = "top_ops.txt"
# reports
REPORT_DIR = "report"
REPORT_HTML = "profiler-report.html"
REPORT_RULES = "rules.json"
TUNING_HTML = "tuning-report.html"
# experiment tracking: the MLflow run of this run dir ({"run_id", "tracking_uri"}), for resume=RUN_DIR
MLFLOW_RUN = "mlflow-run.json"
# tuning run
TRIALS_DIR = "trials"  # trials/<NNN>/, one training run dir per trial (trial_dir)
TRIALS_CSV = "trials.csv"
TRIAL_COLUMNS = ("trial", "state", "objective", "epochs", "duration_s")  # then one column per tuned parameter
STUDY_JSON = "study.json"
BEST_OVERRIDES = "best_overrides.txt"
PLOT_DIR = "plots"


def trial_dir(tune_dir: str | Path, number: int) -> Path:
    """The run dir of trial ``number`` of the study in ``tune_dir``."""
    return Path(tune_dir) / TRIALS_DIR / f"{number:03d}"


def keep_records(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite ``path`` with the records ``keep`` accepts; a line cut short by a killed process goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def read_json(path: Path, default: Any) -> Any:
    """``path`` parsed, or ``default`` when the run did not write it."""
    return json.loads(path.read_text()) if path.is_file() else default


def read_rule_results(folder: Path) -> list[dict[str, Any]] | None:
    """The verdicts in ``folder/rule-results.json`` (``debug-output/`` or ``profiler-output/``); None if absent."""
    return read_json(folder / RULE_RESULTS, None)


def is_tuning_dir(run_dir: str | Path) -> bool:
    """A tuning run dir has ``trials.csv``; a training run dir does not."""
    return (Path(run_dir) / TRIALS_CSV).is_file()


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
        write_json(self.dir / name, data)

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


def load_trial(run_dir: str | Path) -> Trial:
    """Read ``<run_dir>/debug-output/`` (``run_dir`` may also be the ``debug-output`` folder itself)."""
    path = Path(run_dir)
    if path.name != DEBUG_DIR:
        path = path / DEBUG_DIR
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: the run had no debugger callback (add callbacks=default, which includes it)."
        )
    meta = read_json(path / DEBUG_META, {})
    rules = read_rule_results(path) or []
    return Trial(path, read_jsonl(path / LOSSES), read_jsonl(path / TENSORS), meta, rules)


@dataclass
class ProfileData:
    """System samples, per-step timings and job metadata of one run."""

    system: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    top_ops: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> np.ndarray:
        return np.asarray([s[key] for s in self.system if key in s], dtype=float)

    def gpu_series(self, key: str) -> np.ndarray:
        """``samples x gpus`` array (empty when no GPU was sampled)."""
        rows = [[g[key] for g in s.get("gpus", [])] for s in self.system]
        width = max((len(r) for r in rows), default=0)
        if width == 0:
            return np.zeros((0, 0))
        return np.asarray([r + [math.nan] * (width - len(r)) for r in rows], dtype=float)

    def step_values(self, key: str) -> np.ndarray:
        return np.asarray([s.get(key, math.nan) for s in self.steps], dtype=float)

    @property
    def has_gpu(self) -> bool:
        return self.gpu_series("util").size > 0


def load_profile(run_dir: str | Path) -> ProfileData:
    """Read ``<run_dir>/profiler-output/`` (empty data where files are missing)."""
    path = Path(run_dir)
    if path.name != PROFILER_DIR:
        path = path / PROFILER_DIR
    meta = read_json(path / PROFILER_META, {})
    top_ops = read_json(path / TOP_OPS, [])
    return ProfileData(read_jsonl(path / SYSTEM), read_jsonl(path / STEPS), meta, top_ops)
