"""The one base of every rule, its builder, and what a rule reports in SageMaker's words.

A verdict is ``NoIssuesFound``, ``IssuesFound`` or ``Error``.

Debugger rules (tensors) and profiler rules (timings, system usage) share this result type so that the
report and ``rules.json`` treat them alike. ``NotApplicable`` marks a rule that cannot judge this run
(a GPU rule on a CPU run) instead of raising a false alarm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

NO_ISSUES = "NoIssuesFound"
ISSUES = "IssuesFound"
ERROR = "Error"
NOT_APPLICABLE = "NotApplicable"
STATUSES = (NO_ISSUES, ISSUES, ERROR, NOT_APPLICABLE)


@dataclass
class RuleResult:
    """One rule's verdict: the first step it fired at and why, and what to change."""

    name: str
    kind: str
    status: str = NO_ISSUES
    step: int | None = None
    message: str = ""
    recommendation: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuleResult:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class Rule:
    """What every rule has: a SageMaker name, its kind, what to change when it fires, and its thresholds.

    Debugger rules (:mod:`dogbreed.rules.debugger`) judge a run step by step as data is recorded; profiler rules
    (:mod:`dogbreed.rules.profiler`) judge the recorded data at once. Both report through :class:`RuleResult`.
    """

    name = "rule"
    kind = "rule"
    recommendation = ""
    _state: tuple[str, ...] = ()  # attributes that hold the verdict, not a threshold

    def parameters(self) -> dict[str, Any]:
        """The rule's configurable thresholds (reported next to the verdict)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in self._state}


R = TypeVar("R", bound=Rule)


def build_rules(registry: Mapping[str, type[R]], config: Mapping[str, Any] | None, option: str) -> list[R]:
    """``{"overfit": {"patience": 2}, "dead_relu": false}`` -> rule objects (``null``/``{}``: defaults; false: off).

    ``option`` is the config key the mapping came from, so an unknown name is reported where the user typed it.
    """
    config = dict(config) if config is not None else {name: {} for name in registry}
    rules = []
    for name, params in config.items():
        if name not in registry:
            raise ValueError(f"{option} has an unknown rule {name!r}; known rules: {sorted(registry)}.")
        if params is not False:
            rules.append(registry[name](**dict(params or {})))
    return rules
