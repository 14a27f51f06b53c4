"""A background thread that samples CPU, memory, I/O wait and (through NVML) GPU usage, like SageMaker's.

Each sample is one JSON line of ``<run>/profiler-output/system.jsonl``::

    {"t": 1767268800.5, "cpu": [12.0, 80.5], "cpu_total": 46.2, "mem_percent": 31.0, "mem_used_gb": 4.9,
     "iowait": 0.3, "proc_cpu": 41.8, "proc_mem_percent": 12.5, "proc_mem_gb": 2.0, "proc_count": 3,
     "gpus": [{"util": 97.0, "mem_percent": 41.2}]}

``cpu``, ``cpu_total``, ``mem_*`` and ``iowait`` are the whole machine's; ``proc_*`` are the training's own
process tree (the main process and its DataLoader workers), on the same scale as ``cpu_total`` and
``mem_percent``, so the difference is what other processes took. Runs recorded before the ``proc_*`` fields
existed lack them; readers treat a missing field as "not recorded".

NVML comes from the optional ``nvidia-ml-py`` package (``pip install dogbreed[gpu]``); without it, or
without a GPU, ``gpus`` is an empty list and nothing else changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from dogbreed._io import DiskFullError, is_disk_full

log = logging.getLogger(__name__)


class _Nvml:
    """GPU utilisation and memory through NVML, or nothing when NVML or a GPU is missing."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.pynvml = pynvml
        except Exception as err:  # ImportError, or NVMLError on a machine without a driver: both mean "no GPU data"
            log.debug("NVML unavailable (%s): no GPU samples", err)

    def sample(self) -> list[dict[str, float]]:
        out = []
        for handle in self.handles:
            try:
                util = self.pynvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self.pynvml.nvmlDeviceGetMemoryInfo(handle)
                out.append({"util": float(util.gpu), "mem_percent": 100.0 * mem.used / max(mem.total, 1)})
            except Exception:  # a GPU that stops answering must not kill the monitor
                out.append({"util": float("nan"), "mem_percent": float("nan")})
        return out

    def close(self) -> None:
        if self.handles:
            with contextlib.suppress(Exception):
                self.pynvml.nvmlShutdown()


def _footprint(proc: psutil.Process) -> int:
    """Bytes of memory ``proc`` occupies, pages it shares counted once across the tree.

    Forked DataLoader workers share the main process's pages until they write to them, so summing RSS counts
    them once per worker (the tree then "uses" more than the machine). PSS splits each shared page among its
    sharers (Linux; about 3 ms per process); elsewhere, RSS.
    """
    try:
        return int(proc.memory_full_info().pss)
    except (AttributeError, psutil.AccessDenied):  # no PSS outside Linux
        return int(proc.memory_info().rss)


class ProcessTree:
    """CPU and memory of one process and its descendants (DataLoader workers come and go between epochs).

    CPU is measured from each process's CPU time between two samples rather than ``Process.cpu_percent``,
    which reads 0 on its first call: a worker started between samples still counts for the time it ran.

    Args:
        pid: The root process (the training process by default).
    """

    def __init__(self, pid: int | None = None) -> None:
        self.root = psutil.Process(pid)
        self._last_times: dict[int, float] = {}
        self._last_wall = time.monotonic()
        self.sample()  # the baseline the first real sample measures from

    def _processes(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root itself is gone
            return []

    def sample(self) -> dict[str, Any]:
        """``proc_cpu`` (% of all cores, like ``cpu_total``), ``proc_mem_percent``/``_gb``, ``proc_count``."""
        now = time.monotonic()
        elapsed, self._last_wall = max(now - self._last_wall, 1e-6), now
        cpu_seconds, footprint, times = 0.0, 0, {}
        for proc in self._processes():
            try:
                with proc.oneshot():
                    used, memory = proc.cpu_times(), _footprint(proc)
            except psutil.Error:  # a worker that exited between listing and reading
                continue
            footprint += memory
            times[proc.pid] = used.user + used.system
            cpu_seconds += times[proc.pid] - self._last_times.get(proc.pid, 0.0)
        self._last_times = times
        cores = psutil.cpu_count() or 1
        return {
            "proc_cpu": round(min(100.0, max(0.0, 100.0 * cpu_seconds / (elapsed * cores))), 1),
            "proc_mem_percent": round(100.0 * footprint / psutil.virtual_memory().total, 2),
            "proc_mem_gb": round(footprint / 2**30, 3),
            "proc_count": len(times),
        }


def sample_system(nvml: _Nvml | None = None, tree: ProcessTree | None = None) -> dict[str, Any]:
    """One sample; CPU percentages are since the previous call (the first call of a process reads 0)."""
    per_core = psutil.cpu_percent(percpu=True)
    times = psutil.cpu_times_percent()
    mem = psutil.virtual_memory()
    return {
        "t": time.time(),
        "cpu": per_core,
        "cpu_total": sum(per_core) / max(len(per_core), 1),
        "mem_percent": mem.percent,
        "mem_used_gb": round((mem.total - mem.available) / 2**30, 3),
        "iowait": float(getattr(times, "iowait", 0.0)),
        **(tree.sample() if tree else {}),
        "gpus": nvml.sample() if nvml else [],
    }


class SystemMonitor:
    """Append a system sample to ``path`` every ``interval`` seconds until :meth:`stop`.

    Args:
        path: The JSON-lines file (appended to, so fit and test of one run share it).
        interval: Seconds between samples (SageMaker's default is 500 ms).
        pid: The process whose tree ``proc_*`` describes; the calling (training) process by default.
    """

    def __init__(self, path: str | Path, interval: float = 0.5, pid: int | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"callbacks.profiler.monitor_interval must be > 0 seconds, got {interval}.")
        self.path = Path(path)
        self.interval = interval
        self.pid = pid
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dogbreed-system-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5 * self.interval + 1)
            self._thread = None

    def _run(self) -> None:
        nvml = _Nvml()
        psutil.cpu_percent(percpu=True)  # prime the counters: the first reading is meaningless
        psutil.cpu_times_percent()
        try:
            tree = ProcessTree(self.pid)
            with open(self.path, "a") as f:
                while not self._stop.wait(self.interval):
                    f.write(json.dumps(sample_system(nvml, tree)) + "\n")
                    f.flush()
        except OSError as err:
            if is_disk_full(err):  # one line: training stops on the full disk itself and says where and how much
                log.warning("System monitor stopped: %s", DiskFullError(self.path, None))
            else:
                log.exception("System monitor stopped")
        except Exception:  # never take training down with the monitor
            log.exception("System monitor stopped")
        finally:
            nvml.close()
