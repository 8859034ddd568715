"""The doctor's output: `Finding`, the severity levels, and the two output forms (a text report for people that
leads with each root cause and lists its consequences under it, and the stable JSON form `fastlstm.findings/1`
documented in docs/doctor.md). The vocabulary of codes lives with the rules (registry.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap

from ..jsonio import to_json_safe

SEVERITIES = ("info", "warning", "error")


FINDINGS_FORMAT = "fastlstm.findings/1"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One diagnosis. `evidence` is a JSON-safe dict of the measured numbers the finding rests on.

    `caused_by` names the findings of the same run that explain this one (codes, the one it is reported under
    first); it is empty for a root cause. `diagnose` sets it from the causal links (causes.py).
    """

    code: str
    severity: str  # "info" | "warning" | "error"
    message: str
    evidence: dict
    remedy: str
    caused_by: tuple = ()

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "caused_by", tuple(self.caused_by))

    @property
    def is_consequence(self) -> bool:
        return bool(self.caused_by)

    def to_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": to_json_safe(self.evidence),
            "remedy": self.remedy,
            "caused_by": list(self.caused_by),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        return cls(
            d["code"],
            d["severity"],
            d["message"],
            dict(d.get("evidence") or {}),
            d.get("remedy", ""),
            tuple(d.get("caused_by") or ()),
        )


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


def root_causes(findings) -> list:
    """The findings no other finding explains, in report order."""
    return [f for f in findings if not f.caused_by]


def format_report(findings, title: str | None = None) -> str:
    """A human-readable report: a summary line, then each root cause with its evidence and remedy, and under it
    the findings it explains (its consequences), indented."""
    counts = {sev: sum(f.severity == sev for f in findings) for sev in SEVERITIES}
    summary = ", ".join(
        f"{n} {sev}{'s' if n != 1 and sev != 'info' else ''}" for sev, n in reversed(counts.items()) if n
    )
    consequences = sum(f.is_consequence for f in findings)
    if consequences:
        roots = len(findings) - consequences
        causes = f"{roots} root cause{'s' if roots != 1 else ''}"
        summary += f" ({causes}, {consequences} consequence{'s' if consequences != 1 else ''})"
    lines = [f"{title or 'fastlstm doctor'}: {summary or 'no findings'}"]
    if not findings:
        lines.append("  Nothing to report: no rule found a problem in this history.")
    depths = _depths(findings)
    for f, depth in zip(findings, depths):
        pad = "    " * depth
        lines.append("")
        if depth:
            lines.append(f"{pad}[{f.severity.upper()}] {f.code}: a consequence of {' and '.join(f.caused_by)}")
        else:
            lines.append(f"[{f.severity.upper()}] {f.code}")
        lines.extend(_wrap(f.message, pad + "  "))
        lines.append(f"{pad}  evidence:")
        lines.extend(f"{pad}    {line}" for line in _evidence_lines(f.evidence))
        lines.append(f"{pad}  remedy:")
        lines.extend(_wrap(f.remedy, pad + "    "))
    return "\n".join(lines)


def _depths(findings) -> list:
    """How deep under its root cause each finding sits (0 for a root), following caused_by[0]."""
    by_code = {}
    for f in findings:
        by_code.setdefault(f.code, f)
    depths = []
    for f in findings:
        depth, seen, current = 0, {f.code}, f
        while current.caused_by and current.caused_by[0] in by_code and current.caused_by[0] not in seen:
            seen.add(current.caused_by[0])
            current = by_code[current.caused_by[0]]
            depth += 1
        depths.append(depth)
    return depths


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
    if 1 <= abs(x) < 1e6:  # positional: "%g" writes 99.5 to 2 digits as "1e+02"
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
        text = f"{x:.{decimals}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{x:.{digits}g}"
