"""What every rule reports, in SageMaker's words: ``NoIssuesFound``, ``IssuesFound`` or ``Error``.

Debugger rules (tensors) and profiler rules (timings, system usage) share this result type so that the
report and ``rules.json`` treat them alike. ``NotApplicable`` marks a rule that cannot judge this run
(a GPU rule on a CPU run) instead of raising a false alarm.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

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
    """Base of the debugger rules: keeps the first firing and turns the rule's own failures into ``Error``.

    Subclasses set ``name``, ``recommendation`` and the hooks they need; a hook returns a reason string
    when the rule fires and ``None`` otherwise. After the first firing (or an error) the rule stays quiet.

    Args:
        stop_training_on_fire: Ask the trainer to stop after the step where the rule fired (Lightning honours
            it once ``trainer.min_epochs`` are done, as for early stopping).
    """

    name = "rule"
    kind = "debugger"
    recommendation = ""

    def __init__(self, *, stop_training_on_fire: bool = False) -> None:
        self.stop_training_on_fire = stop_training_on_fire
        self.result = RuleResult(self.name, self.kind, recommendation="", parameters=self.parameters())
        self.fired_now = False

    def parameters(self) -> dict[str, Any]:
        """The rule's configurable thresholds (reported next to the verdict)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("result", "fired_now")}

    @property
    def done(self) -> bool:
        return self.result.status in (ISSUES, ERROR)

    def fire(self, step: int | None, reason: str) -> None:
        self.result.status = ISSUES
        self.result.step = step
        self.result.message = reason
        self.result.recommendation = self.recommendation
        self.fired_now = True
        log.warning("Rule %s: IssuesFound at step %s: %s", self.name, step, reason)

    def call(self, hook: str, step: int | None, *args: Any) -> None:
        """Run ``self.<hook>(step, *args)`` unless the rule is done; record a firing or an error."""
        if self.done:
            return
        try:
            reason = getattr(self, hook)(step, *args)
        except Exception as err:  # a broken rule must not break training; it reports Error instead
            self.result.status = ERROR
            self.result.step = step
            self.result.message = f"the rule failed in {hook}: {type(err).__name__}: {err}"
            log.exception("Rule %s failed", self.name)
            return
        if reason:
            self.fire(step, reason)

    def set_message(self, message: str) -> None:
        """A note on a rule that did not fire (what it checked, or why it could not judge)."""
        if self.result.status == NO_ISSUES:
            self.result.message = message
