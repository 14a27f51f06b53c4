"""SageMaker's profiler rules, with SageMaker's names and thresholds, evaluated on a run's profiler output.

They judge only what ``<run>/profiler-output/`` holds (:func:`dogbreed.rundir.load_profile`), so the report
can judge an old run again. Rules about GPUs report ``NotApplicable`` on a run without GPU samples instead of
a false alarm.
``patience`` (system samples skipped at the start) is capped at half the samples, so a run shorter than
SageMaker's warm-up is still judged on its second half.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from dogbreed.rules.base import ERROR, ISSUES, NO_ISSUES, NOT_APPLICABLE, Rule, RuleResult, build_rules
from dogbreed.rundir import ProfileData


def _skip(values: np.ndarray, patience: int) -> np.ndarray:
    return values[min(patience, len(values) // 2) :]


def _pct(values: np.ndarray, q: float) -> float:
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q)) if values.size else math.nan


class ProfilerRule(Rule):
    """A rule over :class:`~dogbreed.rundir.ProfileData`; ``evaluate`` returns its :class:`RuleResult`."""

    name = "ProfilerRule"
    kind = "profiler"
    needs_gpu = False

    def result(self, status: str, message: str, step: int | None = None) -> RuleResult:
        return RuleResult(
            self.name, self.kind, status, step, message,
            self.recommendation if status == ISSUES else "", self.parameters(),
        )  # fmt: skip

    def evaluate(self, data: ProfileData) -> RuleResult:
        if self.needs_gpu and not data.has_gpu:
            return self.result(NOT_APPLICABLE, "not applicable: no GPU was used (or NVML was unavailable) in this run")
        return self.check(data)

    def check(self, data: ProfileData) -> RuleResult:
        raise NotImplementedError


class LowGPUUtilization(ProfilerRule):
    """GPU utilisation p95 below ``threshold_p95``, or p95 above it with p5 below ``threshold_p5`` (fluctuating)."""

    name = "LowGPUUtilization"
    needs_gpu = True
    recommendation = (
        "The GPU is underused: increase data.batch_size, use more dataloader workers (data.num_workers), or a "
        "smaller instance; if utilisation fluctuates, look for a data-loading bottleneck."
    )

    def __init__(self, threshold_p95: float = 70, threshold_p5: float = 10, window: int = 500, patience: int = 1000):
        self.threshold_p95, self.threshold_p5, self.window, self.patience = (
            threshold_p95,
            threshold_p5,
            window,
            patience,
        )

    def check(self, data: ProfileData) -> RuleResult:
        util = _skip(data.gpu_series("util"), self.patience)
        for gpu in range(util.shape[1]):
            p95, p5 = _pct(util[:, gpu], 95), _pct(util[:, gpu], 5)
            if p95 < self.threshold_p95:
                return self.result(ISSUES, f"GPU{gpu} utilisation p95 {p95:.0f}% < {self.threshold_p95:g}%: underused")
            if p5 < self.threshold_p5:
                return self.result(
                    ISSUES, f"GPU{gpu} utilisation fluctuates: p95 {p95:.0f}% but p5 {p5:.0f}% < {self.threshold_p5:g}%"
                )
        return self.result(NO_ISSUES, f"GPU utilisation p95 {_pct(util, 95):.0f}%, p5 {_pct(util, 5):.0f}%")


class CPUBottleneck(ProfilerRule):
    """More than ``threshold`` % of the time the GPU is below ``gpu_threshold`` % while the CPU is above
    ``cpu_threshold`` %."""

    name = "CPUBottleneck"
    needs_gpu = True
    recommendation = (
        "The GPU waits on the CPU: move preprocessing to the GPU, use more dataloader workers, cache decoded "
        "images, or choose an instance with more vCPUs per GPU."
    )

    def __init__(
        self, threshold: float = 50, gpu_threshold: float = 10, cpu_threshold: float = 90, patience: int = 1000
    ):
        self.threshold, self.gpu_threshold, self.cpu_threshold, self.patience = (
            threshold,
            gpu_threshold,
            cpu_threshold,
            patience,
        )

    def check(self, data: ProfileData) -> RuleResult:
        gpu = _skip(np.nanmax(data.gpu_series("util"), axis=1), self.patience)
        cpu = _skip(data.series("cpu_total"), self.patience)
        n = min(len(gpu), len(cpu))
        share = float(np.mean((gpu[:n] < self.gpu_threshold) & (cpu[:n] > self.cpu_threshold)) * 100) if n else 0.0
        if share > self.threshold:
            return self.result(
                ISSUES,
                f"CPU-bound {share:.0f}% of the time (GPU < {self.gpu_threshold:g}%, CPU > {self.cpu_threshold:g}%)",
            )
        return self.result(NO_ISSUES, f"CPU-bound {share:.0f}% of the time")


class IOBottleneck(ProfilerRule):
    """More than ``threshold`` % of the time I/O wait is above ``io_threshold`` % (and, with a GPU, the GPU below
    ``gpu_threshold`` %)."""

    name = "IOBottleneck"
    recommendation = (
        "Training waits on storage: stage the data on local disk (data.source is cached after the first run), "
        "use more dataloader workers, or use FastFile/Pipe input mode on SageMaker."
    )

    def __init__(
        self, threshold: float = 50, gpu_threshold: float = 10, io_threshold: float = 50, patience: int = 1000
    ):
        self.threshold, self.gpu_threshold, self.io_threshold, self.patience = (
            threshold,
            gpu_threshold,
            io_threshold,
            patience,
        )

    def check(self, data: ProfileData) -> RuleResult:
        io = _skip(data.series("iowait"), self.patience)
        if io.size == 0:
            return self.result(NO_ISSUES, "no system samples")
        waiting = io > self.io_threshold
        if data.has_gpu:
            gpu = _skip(np.nanmax(data.gpu_series("util"), axis=1), self.patience)[: len(io)]
            waiting = waiting[: len(gpu)] & (gpu < self.gpu_threshold)
        share = float(np.mean(waiting) * 100)
        if share > self.threshold:
            return self.result(ISSUES, f"I/O wait above {self.io_threshold:g}% for {share:.0f}% of the time")
        return self.result(NO_ISSUES, f"I/O wait p95 {_pct(io, 95):.1f}%")


class BatchSize(ProfilerRule):
    """p95 of CPU, GPU and GPU memory utilisation all below their thresholds: the batch could be larger."""

    name = "BatchSize"
    needs_gpu = True
    recommendation = (
        "The machine is underused: increase data.batch_size (scale model.lr with it) or pick a smaller instance."
    )

    def __init__(
        self, cpu_threshold_p95: float = 70, gpu_threshold_p95: float = 70, gpu_memory_threshold_p95: float = 70,
        patience: int = 1000, window: int = 500,
    ):  # fmt: skip
        self.cpu_threshold_p95, self.gpu_threshold_p95 = cpu_threshold_p95, gpu_threshold_p95
        self.gpu_memory_threshold_p95, self.patience, self.window = gpu_memory_threshold_p95, patience, window

    def check(self, data: ProfileData) -> RuleResult:
        cpu = _pct(_skip(data.series("cpu_total"), self.patience), 95)
        gpu = _pct(_skip(data.gpu_series("util"), self.patience).ravel(), 95)
        mem = _pct(_skip(data.gpu_series("mem_percent"), self.patience).ravel(), 95)
        message = f"p95 CPU {cpu:.0f}%, GPU {gpu:.0f}%, GPU memory {mem:.0f}%"
        if cpu < self.cpu_threshold_p95 and gpu < self.gpu_threshold_p95 and mem < self.gpu_memory_threshold_p95:
            return self.result(ISSUES, f"{message}: all below their thresholds")
        return self.result(NO_ISSUES, message)


class GPUMemoryIncrease(ProfilerRule):
    """GPU memory (moving average of ``window`` samples) grows by more than ``increase`` percentage points."""

    name = "GPUMemoryIncrease"
    needs_gpu = True
    recommendation = (
        "GPU memory keeps growing: look for tensors kept across steps (losses appended without .detach() or "
        ".item()), growing caches, or variable input sizes."
    )

    def __init__(self, increase: float = 5, patience: int = 1000, window: int = 10):
        self.increase, self.patience, self.window = increase, patience, window

    def check(self, data: ProfileData) -> RuleResult:
        mem = _skip(data.gpu_series("mem_percent"), self.patience)
        worst = 0.0
        for gpu in range(mem.shape[1]):
            series = mem[:, gpu][np.isfinite(mem[:, gpu])]
            if series.size < self.window:
                continue
            smooth = np.convolve(series, np.ones(self.window) / self.window, mode="valid")
            growth = smooth - np.minimum.accumulate(smooth)
            worst = max(worst, float(growth.max()))
        if worst > self.increase:
            return self.result(ISSUES, f"GPU memory grew by {worst:.1f} percentage points (> {self.increase:g})")
        return self.result(NO_ISSUES, f"GPU memory grew by at most {worst:.1f} percentage points")


class StepOutlier(ProfilerRule):
    """More than ``n_outliers`` training steps take longer than mean + ``stddev`` standard deviations."""

    name = "StepOutlier"
    recommendation = (
        "Some steps are much slower than the rest: look for periodic work (checkpointing, logging, validation "
        "inside the epoch), dataloader stalls, or other jobs competing for the machine."
    )

    def __init__(
        self, stddev: float = 3, mode: str | None = None, n_outliers: int = 10, scan_interval_us: int = 60_000_000
    ):
        self.stddev, self.mode, self.n_outliers, self.scan_interval_us = stddev, mode, n_outliers, scan_interval_us

    def check(self, data: ProfileData) -> RuleResult:
        durations = data.step_values("duration")[1:]  # the first step includes start-up, not a steady step
        steps = np.asarray([s["step"] for s in data.steps[1:]])
        if durations.size < 2:
            return self.result(NO_ISSUES, "too few steps to judge")
        mean, std = float(np.mean(durations)), float(np.std(durations))
        limit = mean + self.stddev * std
        outliers = np.flatnonzero(durations > limit)
        message = (
            f"{len(outliers)} step(s) longer than {limit * 1000:.0f} ms "
            f"(mean {mean * 1000:.0f} ms, std {std * 1000:.0f} ms)"
        )
        if len(outliers) > self.n_outliers:
            return self.result(ISSUES, message, int(steps[outliers[0]]))
        return self.result(NO_ISSUES, message)


class Dataloader(ProfilerRule):
    """Dataloader workers below ``min_threshold`` % of the CPU cores while steps wait on data for more than
    ``wait_threshold`` % of their time, or above ``max_threshold`` % of the cores.

    SageMaker's rule looks at the worker count alone; requiring a measurable wait keeps ``num_workers=0``
    on a small, fast dataset from being reported as a problem.
    """

    name = "Dataloader"
    recommendation = (
        "Data loading holds training back: set data.num_workers to about the number of CPU cores (fewer if they "
        "oversubscribe it), enable data.pin_memory on GPU, and keep decoding light."
    )

    def __init__(self, min_threshold: float = 70, max_threshold: float = 200, wait_threshold: float = 10):
        self.min_threshold, self.max_threshold, self.wait_threshold = min_threshold, max_threshold, wait_threshold

    def check(self, data: ProfileData) -> RuleResult:
        workers, cores = data.meta.get("num_workers"), data.meta.get("cpu_count") or 1
        wait, duration = data.step_values("dataloader")[1:], data.step_values("duration")[1:]
        share = float(np.nansum(wait) / np.nansum(duration) * 100) if np.nansum(duration) > 0 else 0.0
        message = f"{workers} worker(s) on {cores} core(s); steps spend {share:.0f}% of their time waiting for data"
        if workers is None:
            return self.result(NO_ISSUES, f"no dataloader information; waiting for data {share:.0f}% of step time")
        ratio = workers / cores * 100
        if ratio > self.max_threshold:
            return self.result(ISSUES, f"{message}: {ratio:.0f}% of the cores > {self.max_threshold:g}%")
        if share > self.wait_threshold and ratio < self.min_threshold:
            return self.result(ISSUES, f"{message}: {ratio:.0f}% of the cores < {self.min_threshold:g}%")
        return self.result(NO_ISSUES, message)


class MaxInitializationTime(ProfilerRule):
    """The first training step starts more than ``threshold`` minutes after the profiler was created (with the
    trainer: data staging, image checks and loader start-up count; building the model before it does not)."""

    name = "MaxInitializationTime"
    recommendation = (
        "Start-up is slow: stage the dataset once (it is cached under paths.cache_dir), skip re-verifying images "
        "(data.verify_images=false once checked), and use FastFile input mode on SageMaker."
    )

    def __init__(self, threshold: float = 20, scan_interval_us: int = 60_000_000):
        self.threshold, self.scan_interval_us = threshold, scan_interval_us

    def check(self, data: ProfileData) -> RuleResult:
        start, first = data.meta.get("created"), data.meta.get("first_step")
        if start is None or first is None:
            return self.result(NO_ISSUES, "no training step recorded")
        minutes = (first - start) / 60
        message = f"initialisation took {minutes * 60:.1f} s"
        if minutes > self.threshold:
            return self.result(ISSUES, f"{message} > {self.threshold:g} min", 0)
        return self.result(NO_ISSUES, message)


class CPUContention(ProfilerRule):
    """Other processes took the CPU: for more than ``threshold`` % of the training loop the machine is above
    ``cpu_threshold`` % busy while other processes than the training's own (main process + DataLoader workers)
    use more than ``other_threshold`` % of all cores.

    Not in SageMaker, whose instances run one job; on a shared machine it explains slow steps that no change
    to the code would fix. Runs recorded without ``proc_cpu`` report ``NotApplicable``.
    """

    name = "CPUContention"
    recommendation = (
        "Steps are slower because other processes compete for the CPU, not because of the training code: run "
        "when the machine is quiet, on a machine (or cores: taskset, a cgroup CPU quota) of its own, and compare "
        "step times there before tuning data.num_workers or data.batch_size."
    )

    def __init__(self, threshold: float = 30, cpu_threshold: float = 90, other_threshold: float = 30):
        self.threshold, self.cpu_threshold, self.other_threshold = threshold, cpu_threshold, other_threshold

    def check(self, data: ProfileData) -> RuleResult:
        start, end = data.meta.get("first_step") or -math.inf, data.meta.get("train_end") or math.inf
        samples = [s for s in data.system if "proc_cpu" in s and start <= s["t"] <= end]
        if not samples:
            return self.result(
                NOT_APPLICABLE, "not applicable: no per-process CPU samples (proc_cpu) during training in this run"
            )
        machine = np.asarray([s["cpu_total"] for s in samples], dtype=float)
        own = np.asarray([s["proc_cpu"] for s in samples], dtype=float)
        others = np.clip(machine - own, 0, 100)
        contended = (machine > self.cpu_threshold) & (others > self.other_threshold)
        share = float(np.mean(contended) * 100)
        message = (
            f"machine CPU > {self.cpu_threshold:g}% with other processes above {self.other_threshold:g}% of the "
            f"cores for {share:.0f}% of training; median machine {np.median(machine):.0f}%, training processes "
            f"{np.median(own):.0f}%, other processes {np.median(others):.0f}%"
        )
        return self.result(ISSUES if share > self.threshold else NO_ISSUES, message)


class OverallSystemUsage(ProfilerRule):
    """A summary of CPU, memory and GPU usage; it never fires."""

    name = "OverallSystemUsage"

    def __init__(self, scan_interval_us: int = 60_000_000):
        self.scan_interval_us = scan_interval_us

    def check(self, data: ProfileData) -> RuleResult:
        cpu, own = data.series("cpu_total"), data.series("proc_cpu")
        parts = [f"CPU p50/p95 {_pct(cpu, 50):.0f}/{_pct(cpu, 95):.0f}%"]
        if own.size:  # recorded since the monitor samples the training's process tree
            parts.append(f"training processes' CPU p50/p95 {_pct(own, 50):.0f}/{_pct(own, 95):.0f}%")
        parts.append(f"memory p95 {_pct(data.series('mem_percent'), 95):.0f}%")
        if data.has_gpu:
            util, mem = data.gpu_series("util").ravel(), data.gpu_series("mem_percent").ravel()
            parts += [f"GPU p50/p95 {_pct(util, 50):.0f}/{_pct(util, 95):.0f}%", f"GPU memory p95 {_pct(mem, 95):.0f}%"]
        return self.result(NO_ISSUES, ", ".join(parts))


PROFILER_RULES = {
    cls.name: cls
    for cls in (
        LowGPUUtilization, CPUBottleneck, IOBottleneck, BatchSize, GPUMemoryIncrease, StepOutlier, Dataloader,
        MaxInitializationTime, CPUContention, OverallSystemUsage,
    )
}  # fmt: skip


def build_profiler_rules(config: Mapping[str, Any] | None = None) -> list[ProfilerRule]:
    """``{"StepOutlier": {"stddev": 4}, "BatchSize": false}`` -> rules (all with defaults when None)."""
    return build_rules(PROFILER_RULES, config, "callbacks.profiler.rules")


def evaluate_profiler_rules(data: ProfileData, rules: list[ProfilerRule]) -> list[RuleResult]:
    """Every rule's result; a rule that raises reports ``Error`` with the reason."""
    results = []
    for rule in rules:
        try:
            results.append(rule.evaluate(data))
        except Exception as err:
            results.append(rule.result(ERROR, f"the rule failed: {type(err).__name__}: {err}"))
    return results
