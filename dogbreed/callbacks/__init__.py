"""Lightning callbacks for cross-cutting concerns, one module per concern.

The debugger and profiler record data into the run directory (:mod:`dogbreed.rundir`) and call the rules
(:mod:`dogbreed.rules`); what they record is read back with :func:`dogbreed.rundir.load_trial` and
:func:`dogbreed.rundir.load_profile`.
"""

from dogbreed.callbacks.checkpoint_io import (
    CheckpointError,
    DurableCheckpointIO,
    agree_on_checkpoint,
    checkpoint_damage,
    share_checkpoint,
)
from dogbreed.callbacks.debugger import Debugger
from dogbreed.callbacks.ema import EMAWeights
from dogbreed.callbacks.finetuning import BackboneFreezeUnfreeze
from dogbreed.callbacks.metrics_log import LogMetrics, format_metrics
from dogbreed.callbacks.profiler import Profiler
from dogbreed.callbacks.resume import ResumeState
from dogbreed.callbacks.smdebug_bridge import SMDebugBridge

__all__ = [
    "BackboneFreezeUnfreeze",
    "CheckpointError",
    "Debugger",
    "DurableCheckpointIO",
    "EMAWeights",
    "LogMetrics",
    "Profiler",
    "ResumeState",
    "SMDebugBridge",
    "agree_on_checkpoint",
    "checkpoint_damage",
    "format_metrics",
    "share_checkpoint",
]
