"""Profiler: step timings, system monitor, torch.profiler trace and SageMaker's profiler rules."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dogbreed.callbacks import Profiler
from dogbreed.callbacks.system_monitor import SystemMonitor
from dogbreed.rules import (
    ISSUES,
    NO_ISSUES,
    NOT_APPLICABLE,
    PROFILER_RULES,
    build_profiler_rules,
    evaluate_profiler_rules,
)
from dogbreed.rundir import ProfileData

from .test_debugger import TinyClassifier, tensors, tiny_fit

GPU_RULES = {"LowGPUUtilization", "CPUBottleneck", "BatchSize", "GPUMemoryIncrease"}


class SleepyDataset(Dataset):
    """Tiny samples; every ``every``-th one makes the loader sleep ``seconds`` (a stalling data source)."""

    def __init__(self, n: int, every: int, seconds: float) -> None:
        self.data, self.every, self.seconds = tensors(n), every, seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if i % self.every == self.every - 1:
            time.sleep(self.seconds)
        return self.data[i]


def results_by_name(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads((run_dir / "profiler-output" / "rule-results.json").read_text())}


@pytest.fixture(scope="module")
def sleepy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 one-sample steps; every 25th waits 200 ms for its data: 12 outliers, and a loader-bound run."""
    run_dir = tmp_path_factory.mktemp("sleepy")
    profiler = Profiler(run_dir=run_dir, monitor_interval=0.1)
    tiny_fit([profiler], train=SleepyDataset(300, every=25, seconds=0.2), batch_size=1, shuffle=False)
    return run_dir


@pytest.fixture(scope="module")
def demo_results(debug_demo_run: Path) -> dict[str, dict[str, Any]]:
    return results_by_name(debug_demo_run)


def test_step_outlier_fires_on_a_stalling_loader(sleepy_run: Path) -> None:
    result = results_by_name(sleepy_run)["StepOutlier"]
    assert result["status"] == ISSUES and result["message"].startswith("12 step(s) longer than")
    assert result["step"] == 24


def test_dataloader_fires_on_a_stalling_loader(sleepy_run: Path) -> None:
    result = results_by_name(sleepy_run)["Dataloader"]
    assert (
        result["status"] == ISSUES and "0 worker(s)" in result["message"] and "num_workers" in result["recommendation"]
    )


def test_step_timings_are_written(sleepy_run: Path) -> None:
    out = sleepy_run / "profiler-output"
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(300))
    for s in steps:
        assert s["duration"] >= s["dataloader"] >= 0 and min(s["forward"], s["backward"], s["optimizer"]) > 0
    assert np.mean([s["dataloader"] for s in steps[24::25]]) > 0.19  # the stalled batches waited for their data
    meta = json.loads((out / "meta.json").read_text())
    assert meta["created"] <= meta["first_step"] <= meta["train_end"] <= meta["end"]
    assert meta["num_workers"] == 0 and meta["batch_size"] == 1


def test_torch_profiler_trace_of_chosen_steps(tmp_path: Path) -> None:
    tiny_fit([Profiler(run_dir=tmp_path, trace_steps=[1, 3])])
    out = tmp_path / "profiler-output"
    ops = json.loads((out / "top_ops.json").read_text())
    assert ops and ops[0]["calls"] > 0 and ops[0]["self_cpu_ms"] > 0
    assert "aten::" in (out / "top_ops.txt").read_text() and (out / "trace.json").stat().st_size > 1000


def test_max_initialization_time_fires_on_a_slow_start(tmp_path: Path) -> None:
    class SlowSetup(TinyClassifier):
        def setup(self, stage: str) -> None:
            time.sleep(0.3)

    profiler = Profiler(run_dir=tmp_path, rules={"MaxInitializationTime": {"threshold": 0.003}})  # 0.18 s
    tiny_fit([profiler], model=SlowSetup())
    result = results_by_name(tmp_path)["MaxInitializationTime"]
    assert result["status"] == ISSUES and result["message"].endswith("> 0.003 min")


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule", ["StepOutlier", "Dataloader", "MaxInitializationTime", "IOBottleneck", "OverallSystemUsage"]
)
def test_demo_run_has_no_issues(demo_results: dict[str, dict[str, Any]], rule: str) -> None:
    assert demo_results[rule]["status"] == NO_ISSUES, demo_results[rule]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only run")
@pytest.mark.parametrize("rule", sorted(GPU_RULES))
def test_gpu_rules_are_not_applicable_on_cpu(demo_results: dict[str, dict[str, Any]], rule: str) -> None:
    assert demo_results[rule]["status"] == NOT_APPLICABLE


@pytest.mark.slow
def test_system_monitor_sampled_the_demo(debug_demo_run: Path) -> None:
    samples = [
        json.loads(line) for line in (debug_demo_run / "profiler-output" / "system.jsonl").read_text().splitlines()
    ]
    assert len(samples) >= 4
    assert {"t", "cpu", "cpu_total", "mem_percent", "mem_used_gb", "iowait", "gpus"} <= set(samples[0])
    assert all(0 <= s["cpu_total"] <= 100 for s in samples)


def test_system_monitor_without_nvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # as if nvidia-ml-py were not installed
    path = tmp_path / "system.jsonl"
    monitor = SystemMonitor(path, interval=0.05)
    monitor.start()
    deadline = time.monotonic() + 30  # a sample takes longer than the interval on a busy machine (CI failed at 0.3 s)
    while time.monotonic() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 2):
        time.sleep(0.05)
    monitor.stop()
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(samples) >= 2 and all(s["gpus"] == [] for s in samples)
    assert not monitor.running


# ---- the GPU rules on recorded GPU samples (the CI machine has no GPU) --------------------------------------------
def gpu_profile(util: float | list[float], mem: float | list[float] = 50.0, cpu: float = 50, iowait: float = 0):
    """100 samples of one GPU; a number is a constant series."""
    util = util if isinstance(util, list) else [util] * 100
    mem = mem if isinstance(mem, list) else [mem] * 100
    system = [
        {"t": i * 0.5, "cpu": [cpu], "cpu_total": cpu, "mem_percent": 20, "iowait": iowait,
         "gpus": [{"util": u, "mem_percent": m}]}
        for i, (u, m) in enumerate(zip(util, mem, strict=True))
    ]  # fmt: skip
    return ProfileData(system=system)


def evaluate(name: str, data: ProfileData, **params: Any) -> Any:
    return evaluate_profiler_rules(data, build_profiler_rules({name: params}))[0]


@pytest.mark.parametrize(
    ("name", "broken", "healthy"),
    [
        ("LowGPUUtilization", gpu_profile(30.0), gpu_profile(95.0)),
        ("LowGPUUtilization", gpu_profile([95.0, 0.0] * 50), gpu_profile(90.0)),
        ("CPUBottleneck", gpu_profile(5.0, cpu=95), gpu_profile(90.0, cpu=95)),
        ("IOBottleneck", gpu_profile(5.0, iowait=80), gpu_profile(90.0, iowait=80)),
        ("BatchSize", gpu_profile(40.0, 20.0, cpu=30), gpu_profile(95.0, 20.0, cpu=30)),
        ("GPUMemoryIncrease", gpu_profile(90.0, list(np.linspace(20, 40, 100))), gpu_profile(90.0, 30.0)),
    ],
)
def test_gpu_rules_on_recorded_samples(name: str, broken: ProfileData, healthy: ProfileData) -> None:
    assert evaluate(name, broken, patience=10).status == ISSUES
    assert evaluate(name, healthy, patience=10).status == NO_ISSUES


def test_io_bottleneck_on_cpu_looks_at_io_wait_alone() -> None:
    data = ProfileData(system=[{"t": i, "cpu": [10], "cpu_total": 10, "iowait": 90, "gpus": []} for i in range(50)])
    assert evaluate("IOBottleneck", data, patience=0).status == ISSUES


def test_dataloader_fires_on_too_many_workers() -> None:
    data = ProfileData(meta={"num_workers": 16, "cpu_count": 4})
    result = evaluate("Dataloader", data)
    assert result.status == ISSUES and "400% of the cores > 200%" in result.message


def test_every_profiler_rule_is_configurable(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from .conftest import compose_config, make_small

    cfg = make_small(compose_config(["experiment=demo", "callbacks.profiler.rules.StepOutlier.stddev=4"]), tmp_path)
    profiler = instantiate(cfg.callbacks.profiler)
    by_name = {r.name: r for r in profiler.rules}
    assert set(by_name) == set(PROFILER_RULES) and by_name["StepOutlier"].stddev == 4
    for name, rule in by_name.items():
        assert set(cfg.callbacks.profiler.rules[name]) == set(rule.parameters()), name
    with pytest.raises(ValueError, match="unknown rule 'StepOutliers'"):
        Profiler(rules={"StepOutliers": {}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_timings_and_gpu_samples(tmp_path: Path) -> None:
    """On a GPU: CUDA-event timings, and GPU samples when nvidia-ml-py is installed."""
    import lightning as L

    from .test_debugger import TinyClassifier

    profiler = Profiler(run_dir=tmp_path, monitor_interval=0.05)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[profiler])  # fmt: skip
    trainer.fit(TinyClassifier(), torch.utils.data.DataLoader(tensors(256), batch_size=16))
    steps = [json.loads(line) for line in (tmp_path / "profiler-output" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 16 and all(s["forward"] > 0 and s["backward"] > 0 for s in steps)
    results = results_by_name(tmp_path)
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert results["LowGPUUtilization"]["status"] == NOT_APPLICABLE
    else:
        assert results["LowGPUUtilization"]["status"] in (ISSUES, NO_ISSUES)


def test_system_monitor_records_the_training_process_tree(tmp_path: Path) -> None:
    """proc_* beside the machine's figures: a busy DataLoader-like child counts towards the training's CPU."""
    import multiprocessing

    monitor = SystemMonitor(tmp_path / "system.jsonl", interval=0.1)
    monitor.start()
    child = multiprocessing.get_context("fork").Process(target=_burn, args=(0.6,))
    child.start()
    child.join()
    time.sleep(0.2)
    monitor.stop()
    samples = [json.loads(line) for line in (tmp_path / "system.jsonl").read_text().splitlines()]
    assert {"proc_cpu", "proc_mem_percent", "proc_mem_gb", "proc_count"} <= set(samples[0])
    assert all(0 <= s["proc_cpu"] <= 100 and s["proc_mem_gb"] > 0 for s in samples)
    assert max(s["proc_count"] for s in samples) >= 2  # the child was seen
    cores = __import__("os").cpu_count() or 1
    # each proc_cpu covers the time since the previous sample: the 0.1 s interval plus the sampling itself, which
    # takes longer than the interval when pytest's tree holds the session's servers (the first: 0.1 s, at least)
    gaps = [0.1, *(b["t"] - a["t"] for a, b in pairwise(samples))]
    busy = sum(s["proc_cpu"] * gap for s, gap in zip(samples, gaps, strict=True)) * cores / 100  # CPU seconds
    assert busy > 0.3, samples  # most of the child's 0.6 s of spinning, even on a loaded machine


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PSS is Linux's")
def test_process_tree_counts_pages_shared_with_forked_workers_once() -> None:
    """A forked worker shares the main process's memory; summed RSS would count it twice (more than the machine)."""
    import multiprocessing

    from dogbreed.callbacks.system_monitor import ProcessTree

    ballast = np.ones(50_000_000, dtype=np.float32)  # 200 MB, resident
    alone = ProcessTree().sample()["proc_mem_gb"]
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(2,))
    child.start()
    time.sleep(0.3)
    with_worker = ProcessTree().sample()
    child.terminate()
    child.join()
    assert with_worker["proc_count"] >= 2 and ballast.sum() > 0
    assert with_worker["proc_mem_gb"] < alone + 0.1, (alone, with_worker)


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def contention_profile(machine: float, own: float, n: int = 40) -> ProfileData:
    """``n`` samples during training with the machine's and the training processes' CPU share."""
    system = [{"t": 100.0 + i * 0.5, "cpu": [machine], "cpu_total": machine, "mem_percent": 20, "iowait": 0,
               "proc_cpu": own, "gpus": []} for i in range(n)]  # fmt: skip
    return ProfileData(system=system, meta={"first_step": 100.0, "train_end": 100.0 + n * 0.5})


def test_cpu_contention_fires_when_other_processes_take_the_cpu() -> None:
    # a recorded contended run: the machine is full, the training gets a quarter of it
    result = evaluate("CPUContention", contention_profile(machine=98, own=25))
    assert result.status == ISSUES, result
    assert "other processes 73%" in result.message and "training processes 25%" in result.message
    assert "compete for the CPU" in result.recommendation


@pytest.mark.parametrize(("machine", "own"), [(98, 95), (40, 10)], ids=["the-training-uses-the-cpu", "a-quiet-machine"])
def test_cpu_contention_is_quiet_without_competition(machine: float, own: float) -> None:
    assert evaluate("CPUContention", contention_profile(machine, own)).status == NO_ISSUES


def test_cpu_contention_looks_at_the_training_loop_and_old_runs() -> None:
    data = contention_profile(machine=98, own=25)
    data.meta = {"first_step": 1000.0, "train_end": 2000.0}  # every sample before training: nothing to judge
    assert evaluate("CPUContention", data).status == NOT_APPLICABLE
    old = ProfileData(system=[{k: v for k, v in s.items() if k != "proc_cpu"} for s in data.system])
    result = evaluate("CPUContention", old)  # recorded before proc_cpu existed
    assert result.status == NOT_APPLICABLE and "proc_cpu" in result.message
