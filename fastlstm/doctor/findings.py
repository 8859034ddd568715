"""The doctor's vocabulary and output: `Finding`, the severity levels, the codes, and the two output forms
(a text report for people, and the stable JSON form `fastlstm.findings/1` documented in docs/doctor.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap

from ..jsonio import to_json_safe

SEVERITIES = ("info", "warning", "error")


# The fixed vocabulary (DESIGN.md §2), then the codes this module adds. Reports list findings in this order
# within a severity.
CODES = (
    "non_finite",
    "initial_loss_nonfinite",
    "exploding_gradients",
    "vanishing_gradients",
    "gate_saturation",
    "unscaled_inputs",
    "unscaled_targets",
    "loss_stagnant",
    "loss_zero",
    "constant_target",
    "train_val_divergence",
    "val_oscillation",
    "subset_disparity",
    "truncation_too_short",
    "history_incomplete",
)


FINDINGS_FORMAT = "fastlstm.findings/1"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosis. `evidence` is a JSON-safe dict of the measured numbers the finding rests on."""

    code: str
    severity: str  # "info" | "warning" | "error"
    message: str
    evidence: dict
    remedy: str

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": to_json_safe(self.evidence),
            "remedy": self.remedy,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        return cls(d["code"], d["severity"], d["message"], dict(d.get("evidence") or {}), d.get("remedy", ""))


def findings_to_json(findings, source: str | None = None) -> dict:
    """The documented, stable JSON form: {"format", "source", "counts", "findings"}."""
    counts = {severity: sum(f.severity == severity for f in findings) for severity in SEVERITIES}
    return {
        "format": FINDINGS_FORMAT,
        "source": source,
        "counts": counts,
        "findings": [f.to_dict() for f in findings],
    }


def dumps(findings, source: str | None = None) -> str:
    return json.dumps(findings_to_json(findings, source), indent=2, sort_keys=True, allow_nan=False)


def format_report(findings, title: str | None = None) -> str:
    """A human-readable report: a summary line, then each finding with its evidence and remedy."""
    counts = {sev: sum(f.severity == sev for f in findings) for sev in SEVERITIES}
    summary = ", ".join(
        f"{n} {sev}{'s' if n != 1 and sev != 'info' else ''}" for sev, n in reversed(counts.items()) if n
    )
    lines = [f"{title or 'fastlstm doctor'}: {summary or 'no findings'}"]
    if not findings:
        lines.append("  Nothing to report: no rule found a problem in this history.")
    for f in findings:
        lines.append("")
        lines.append(f"[{f.severity.upper()}] {f.code}")
        lines.extend(_wrap(f.message, "  "))
        lines.append("  evidence:")
        lines.extend(f"    {line}" for line in _evidence_lines(f.evidence))
        lines.append("  remedy:")
        lines.extend(_wrap(f.remedy, "    "))
    return "\n".join(lines)


def _wrap(text: str, indent: str, width: int = 110) -> list:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


def _evidence_lines(evidence, depth: int = 0) -> list:
    lines = []
    for key, value in evidence.items():
        if isinstance(value, dict) and value and any(isinstance(v, dict) for v in value.values()):
            lines.append(f"{key}:")
            lines.extend(f"  {line}" for line in _evidence_lines(value, depth + 1))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                lines.append(f"{key}[{i}]:")
                lines.extend(f"  {line}" for line in _evidence_lines(item, depth + 1))
        else:
            lines.append(f"{key}: {_format_value(value)}")
    return lines


def _format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return format_number(value, 4)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def format_number(x, digits: int = 3) -> str:
    """A number for prose: 3 significant digits, no trailing noise."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"
