"""Lightning callbacks for cross-cutting concerns, one module per concern."""

from dogbreed.callbacks.debug_output import Trial, load_trial
from dogbreed.callbacks.debugger import Debugger
from dogbreed.callbacks.finetuning import BackboneFreezeUnfreeze
from dogbreed.callbacks.metrics_log import LogMetrics, format_metrics
from dogbreed.callbacks.profiler import Profiler
from dogbreed.callbacks.resume import ResumeState
from dogbreed.callbacks.rules import RuleResult
from dogbreed.callbacks.smdebug_bridge import SMDebugBridge

__all__ = [
    "BackboneFreezeUnfreeze",
    "Debugger",
    "LogMetrics",
    "Profiler",
    "ResumeState",
    "RuleResult",
    "SMDebugBridge",
    "Trial",
    "format_metrics",
    "load_trial",
]
