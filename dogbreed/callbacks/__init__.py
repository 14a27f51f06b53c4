"""Lightning callbacks for cross-cutting concerns, one module per concern."""

from dogbreed.callbacks.finetuning import BackboneFreezeUnfreeze
from dogbreed.callbacks.metrics_log import LogMetrics, format_metrics

__all__ = ["BackboneFreezeUnfreeze", "LogMetrics", "format_metrics"]
