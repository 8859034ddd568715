"""The one place where the doctor's rules are registered.

Each rule module (`fastlstm/doctor/rules/<family>.py`) declares its codes with `@rule(...)`: the code, its family,
and the three columns of the table in docs/doctor.md (severity, signal, threshold). The vocabulary `CODES`, the
order of reports, and that table all derive from the registrations, so a new code is added in exactly one place:

    python -m fastlstm.doctor.registry      # prints the markdown table docs/doctor.md embeds (a test compares)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class RuleSpec:
    """One rule: `check(signals) -> [Finding]` for `code`, and how docs/doctor.md describes it."""

    code: str
    family: str
    severity: str
    signal: str
    threshold: str
    check: Callable


_REGISTRY: list = []

# The report order: the families (modules of rules/) in this order, each family's rules in the order its module
# defines them. That order also decides which of several causes a consequence is reported under (causes.py), so
# families whose findings are root causes (bad values, bad data) come before those whose findings are usually their
# symptoms.
FAMILY_ORDER = ("nonfinite", "data", "loss", "gradients", "gates", "truncation", "stagnation", "validation", "history")


def rule(code: str, *, family: str, severity: str, signal: str, threshold: str) -> Callable:
    """Register the decorated `check(signals)` as the rule for `code`."""

    def register(check: Callable) -> Callable:
        if any(spec.code == code for spec in _REGISTRY):
            raise ValueError(f"finding code {code!r} registered twice")
        _REGISTRY.append(RuleSpec(code, family, severity, signal, threshold, check))
        return check

    return register


def specs() -> tuple:
    """Every registered rule in report order: by family (FAMILY_ORDER), then in the order each family's module
    defines them. The rules register when the doctor package imports rules/."""

    def family_rank(spec: RuleSpec) -> int:
        module = spec.check.__module__.rsplit(".", 1)[-1]
        return FAMILY_ORDER.index(module) if module in FAMILY_ORDER else len(FAMILY_ORDER)

    return tuple(sorted(_REGISTRY, key=family_rank))  # sorted() is stable: definition order within a family


def codes() -> tuple:
    return tuple(spec.code for spec in specs())


def codes_table() -> str:
    """The markdown table of docs/doctor.md's "Rules" section."""
    lines = [
        "| code | family | severity | signal | threshold (`Thresholds` field = default) |",
        "|---|---|---|---|---|",
    ]
    for spec in specs():
        lines.append(f"| `{spec.code}` | {spec.family} | {spec.severity} | {spec.signal} | {spec.threshold} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # Run with -m, this file is a second copy of the module: the rules registered in the package's copy.
    from fastlstm.doctor.registry import codes_table as registered_table

    print(registered_table())
