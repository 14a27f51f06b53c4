"""``Profiler``: per-step timings, a background system monitor and SageMaker's profiler rules.

Writes ``<run>/profiler-output/``: ``system.jsonl`` (see :mod:`dogbreed.callbacks.system_monitor`),
``steps.jsonl`` (``{"step", "start", "duration", "dataloader", "forward", "backward", "optimizer"}``, in
seconds; ``duration`` is the whole iteration including the wait for the batch), ``meta.json`` (job
timeline: ``created``, ``first_step``, ``train_end``, ``end``, and the dataloader set-up), and
``rule-results.json``. With ``trace_steps=[start, stop]`` it also keeps a ``torch.profiler`` trace of those
steps (``trace.json``, open in Perfetto or chrome://tracing) and the top operators (``top_ops.txt``/``.json``).
Steps count on across a resume from a checkpoint, like the debugger's.

On CUDA, forward/backward/optimizer times come from CUDA events read once the GPU has passed them, so
timing never forces a synchronisation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from dogbreed._io import cpu_description
from dogbreed.callbacks.system_monitor import SystemMonitor
from dogbreed.rules import build_profiler_rules, evaluate_profiler_rules
from dogbreed.rundir import (
    PROFILER_DIR,
    PROFILER_META,
    RULE_RESULTS,
    STEPS,
    SYSTEM,
    TOP_OPS,
    TOP_OPS_TXT,
    TRACE,
    keep_records,
    load_profile,
    read_rule_results,
)

log = logging.getLogger(__name__)

PHASES = ("forward", "backward", "optimizer")


class _StepClock:
    """Timestamps of the points inside one step: perf_counter on CPU, CUDA events on GPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[str, Any] = {}

    def mark(self, point: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[point] = event
        else:
            self.marks[point] = time.perf_counter()

    def ready(self) -> bool:
        end = self.marks.get("end")
        return not self.cuda or end is None or end.query()

    def durations(self) -> dict[str, float | None]:
        spans = {"forward": ("start", "before_backward"), "backward": ("before_backward", "after_backward"),
                 "optimizer": ("before_optimizer", "end")}  # fmt: skip
        out: dict[str, float | None] = {}
        for phase, (a, b) in spans.items():
            if a in self.marks and b in self.marks:
                if self.cuda:
                    out[phase] = self.marks[a].elapsed_time(self.marks[b]) / 1000
                else:
                    out[phase] = self.marks[b] - self.marks[a]
            else:
                out[phase] = None
        return out


class Profiler(Callback):
    """Profile a run like SageMaker's profiler and judge it with SageMaker's profiler rules.

    Args:
        run_dir: Where ``profiler-output/`` goes; the trainer's ``default_root_dir`` when None.
        monitor_interval: Seconds between system samples.
        trace_steps: ``[start, stop]``: keep a ``torch.profiler`` trace of training steps start..stop-1.
        top_ops: Rows of the top-operators table.
        rules: Rule name -> parameters (SageMaker's defaults when empty); ``false`` turns a rule off.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        monitor_interval: float = 0.5,
        trace_steps: list[int] | None = None,
        top_ops: int = 20,
        rules: Mapping[str, Any] | None = None,
    ) -> None:
        if trace_steps is not None and (len(trace_steps) != 2 or not 0 <= trace_steps[0] < trace_steps[1]):
            raise ValueError(
                f"callbacks.profiler.trace_steps must be [start, stop] with 0 <= start < stop, got {trace_steps}."
            )
        self.run_dir = run_dir
        self.monitor_interval = monitor_interval
        self.trace_steps = list(trace_steps) if trace_steps is not None else None
        self.top_ops = top_ops
        self.rules = build_profiler_rules(rules)
        self.created = time.time()
        self.dir: Path | None = None
        self.monitor: SystemMonitor | None = None
        self.meta: dict[str, Any] = {"created": self.created}
        self.step = 0
        self._loaded: dict[str, Any] | None = None
        self._steps_file: Any = None
        self._pending: list[tuple[dict[str, Any], _StepClock]] = []
        self._clock: _StepClock | None = None
        self._last_end: float | None = None
        self._torch_profiler: torch.profiler.profile | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        if self.dir is None:
            self.dir = Path(self.run_dir or trainer.default_root_dir) / PROFILER_DIR
            self.dir.mkdir(parents=True, exist_ok=True)
            self.monitor = SystemMonitor(self.dir / SYSTEM, self.monitor_interval)
            log.info("Profiler: timings, system usage and rule results in %s", self.dir)
        self.monitor.start()
        self._steps_file = open(self.dir / STEPS, "a")  # noqa: SIM115 - closed in teardown

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is not None:  # resuming: count on from the checkpoint, drop what was written past it
            self.step = self._loaded["step"]
            self._loaded = None
            if self._steps_file:
                self._steps_file.close()
                keep_records(self.dir / STEPS, lambda r: r["step"] < self.step)
                self._steps_file = open(self.dir / STEPS, "a")  # noqa: SIM115 - closed in teardown
        self.meta.update(
            fit_start=time.time(),
            cpu_count=os.cpu_count(),
            cpu=cpu_description(),
            torch_cpu_kernels=torch.backends.cpu.get_cpu_capability(),
            accelerator=type(trainer.accelerator).__name__,
            devices=trainer.num_devices,
            gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
            max_epochs=trainer.max_epochs,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = time.perf_counter()  # the first batch's wait includes starting the loader's workers
        loader = trainer.train_dataloader
        if loader is not None and "num_workers" not in self.meta:
            self.meta.update(
                num_workers=getattr(loader, "num_workers", None),
                batch_size=getattr(loader, "batch_size", None),
                pin_memory=getattr(loader, "pin_memory", None),
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if "first_step" not in self.meta:
            self.meta["first_step"] = time.time()
        if self.trace_steps and self.step == self.trace_steps[0] and self.dir is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profiler = torch.profiler.profile(activities=activities)
            self._torch_profiler.__enter__()
        wait = now - self._last_end if self._last_end is not None else None
        # starting the trace is not part of the step: time the step from here
        self._record = {"step": self.step, "start": time.time(), "t0": time.perf_counter(), "dataloader": wait}
        self._clock = _StepClock(pl_module.device.type == "cuda")
        self._clock.mark("start")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._clock:
            self._clock.mark("before_backward")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._clock:
            self._clock.mark("after_backward")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._clock:
            self._clock.mark("before_optimizer")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._clock is None:
            return
        self._clock.mark("end")
        end = time.perf_counter()
        record = self._record
        record["duration"] = (end - record.pop("t0")) + (record["dataloader"] or 0.0)
        self._pending.append((record, self._clock))
        self._clock = None
        self._write_ready()
        if self._torch_profiler is not None and self.step == self.trace_steps[1] - 1:
            self._finish_trace()
        self._last_end = time.perf_counter()  # exporting a trace is not the next step's wait for data
        self.step += 1

    def _write_ready(self, force: bool = False) -> None:
        while self._pending and (force or self._pending[0][1].ready()):
            record, clock = self._pending.pop(0)
            if force and clock.cuda:
                torch.cuda.synchronize()
            record.update(clock.durations())
            if self._steps_file:
                self._steps_file.write(json.dumps(record) + "\n")

    def _finish_trace(self) -> None:
        prof, self._torch_profiler = self._torch_profiler, None
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(str(self.dir / TRACE))
        cuda = torch.cuda.is_available()
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        averages = prof.key_averages()
        (self.dir / TOP_OPS_TXT).write_text(averages.table(sort_by=sort_by, row_limit=self.top_ops))
        rows = sorted(averages, key=lambda e: getattr(e, sort_by.replace("cuda", "device"), 0) or e.self_cpu_time_total,
                      reverse=True)[: self.top_ops]  # fmt: skip
        ops = [
            {
                "name": e.key,
                "calls": e.count,
                "self_cpu_ms": e.self_cpu_time_total / 1000,
                "cpu_total_ms": e.cpu_time_total / 1000,
                "self_device_ms": getattr(e, "self_device_time_total", 0) / 1000,
            }
            for e in rows
        ]
        (self.dir / TOP_OPS).write_text(json.dumps(ops, indent=2))
        log.info("Profiler: torch.profiler trace of steps %s in %s", self.trace_steps, self.dir / TRACE)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meta["train_end"] = time.time()

    def write(self) -> None:
        """Flush timings and metadata, and evaluate the profiler rules on what was recorded so far."""
        if self.dir is None:
            return
        self._write_ready(force=True)
        if self._steps_file:
            self._steps_file.flush()
        self.meta["end"] = time.time()
        (self.dir / PROFILER_META).write_text(json.dumps(self.meta, indent=2))
        results = evaluate_profiler_rules(load_profile(self.dir), self.rules)
        (self.dir / RULE_RESULTS).write_text(json.dumps([r.to_dict() for r in results], indent=2))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._write_ready(force=True)  # the steps that led up to the checkpoint survive a kill
        if self._steps_file:
            self._steps_file.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict  # applied if this is a fit resuming; testing a checkpoint loads it too

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._torch_profiler is not None:
            self._finish_trace()
        self.write()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dir is None:
            return
        if self._torch_profiler is not None:
            self._finish_trace()
        if self.monitor:
            self.monitor.stop()
        self.write()
        if self._steps_file:
            self._steps_file.close()
            self._steps_file = None
        if stage == "fit":
            for r in read_rule_results(self.dir) or []:
                log.info("Profiler rule %s: %s %s", r["name"], r["status"], r["message"])
