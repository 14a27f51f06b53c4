"""Translate between Hydra overrides, SageMaker hyperparameters and the metric lines training prints.

No SageMaker SDK here: the container entry point uses these functions too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

# Keys SageMaker (SDK, tuner, toolkit) adds to a job's hyperparameters; they are not config overrides.
_RESERVED_PREFIXES = ("sagemaker_", "_")

# A finite number as ``format_metrics`` prints it (a float's repr): 0.10000000149011612, 12.0, 1e-05, -3.2e+20.
# ``nan`` and ``inf`` stay in the log but match nothing: CloudWatch stores no non-finite value, so such an
# epoch gets no point for that metric rather than a bogus one.
NUMBER = r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


def overrides_to_hyperparameters(overrides: Iterable[str]) -> dict[str, str]:
    """``["model.lr=1e-3", "experiment=demo", "~callbacks.early_stopping"]`` -> ``{"model.lr": "1e-3", ...}``.

    Values stay the strings the user typed, so that ``hyperparameters_to_overrides`` gives them back to
    Hydra unchanged; a deletion (``~key``) becomes ``{"~key": ""}``.
    """
    hyperparameters: dict[str, str] = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep and not key.startswith("~"):
            raise ValueError(f"override {override!r} is not key=value; write e.g. model.lr=1e-3.")
        if key.lstrip("+~").startswith("hydra."):
            raise ValueError(f"override {override!r}: hydra.* settings do not apply inside a SageMaker job.")
        hyperparameters[key] = value
    return hyperparameters


def _render(value: Any) -> str:
    """A decoded hyperparameter value as Hydra override syntax."""
    if isinstance(value, str):
        return value  # a string is what the user typed on the command line: Hydra parses it
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_render(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, float) else str(value)


def hyperparameters_to_overrides(hyperparameters: Mapping[str, Any]) -> list[str]:
    """A job's hyperparameters (values as SageMaker stores them: JSON strings) -> Hydra overrides.

    The SDK JSON-encodes estimator hyperparameters (``"\\"demo\\""``); the tuner passes raw values
    (``"0.0012"``). Each value is JSON-decoded when it can be and used as written otherwise. SageMaker's
    own keys (``sagemaker_*``, ``_tuning_objective_metric``) are skipped.
    """
    overrides = []
    for key, raw in hyperparameters.items():
        if key.startswith(_RESERVED_PREFIXES):
            continue
        value: Any = raw
        if isinstance(raw, str):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        if key.startswith("~") and value in ("", None):
            overrides.append(key)
        else:
            overrides.append(f"{key}={_render(value)}")
    return overrides


def metric_regex(name: str) -> str:
    """The regex that extracts ``name`` from a ``key=value`` metric line (see ``dogbreed.callbacks.metrics_log``).

    ``\\b`` keeps ``val/acc=`` from matching inside ``best_val/acc=``; ``=`` right after the name keeps it from
    matching ``val/acc_top5=``.
    """
    return rf"\b{re.escape(name)}=({NUMBER})"


def metric_definitions(names: Iterable[str]) -> list[dict[str, str]]:
    """SageMaker ``metric_definitions`` for the metric names training prints."""
    return [{"Name": name, "Regex": metric_regex(name)} for name in names]
