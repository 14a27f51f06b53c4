"""SageMaker's debugger and profiler rules as plain Python over recorded data, without Lightning.

The callbacks feed the debugger rules while training; the report judges an old run again from its run
directory (:mod:`dogbreed.rundir`) in a process that need not have Lightning installed.
"""

from dogbreed.rules.base import ERROR, ISSUES, NO_ISSUES, NOT_APPLICABLE, STATUSES, Rule, RuleResult, build_rules
from dogbreed.rules.debugger import RULES, DebuggerRule, build_debugger_rules
from dogbreed.rules.profiler import PROFILER_RULES, ProfilerRule, build_profiler_rules, evaluate_profiler_rules

__all__ = [
    "ERROR",
    "ISSUES",
    "NOT_APPLICABLE",
    "NO_ISSUES",
    "PROFILER_RULES",
    "RULES",
    "STATUSES",
    "DebuggerRule",
    "ProfilerRule",
    "Rule",
    "RuleResult",
    "build_debugger_rules",
    "build_profiler_rules",
    "build_rules",
    "evaluate_profiler_rules",
]
