"""The LSTM doctor: turns a training History (docs/history.md) into findings with evidence and remedies.

    findings = fastlstm.diagnose(history)       # a History, a dict in docs/history.md's format, or a JSON path
    print(fastlstm.doctor.format_report(findings))
    print(fastlstm.doctor.dumps(findings))      # the stable JSON form, "fastlstm.findings/1"

Each rule (rules.py) reads measured signals (signals.py: losses, validation results, per-timestep gradient norms,
gate saturation, first non-finite location, input and target statistics, truncation events), compares them with a
documented threshold (`Thresholds`), and reports a `Finding(code, severity, message, evidence, remedy)`
(findings.py). docs/doctor.md documents every rule and the precision/recall measured on real failure reproductions.
"""

from __future__ import annotations

from ..history_view import HistoryView
from .findings import CODES, FINDINGS_FORMAT, SEVERITIES, Finding, dumps, findings_to_json, format_report
from .rules import CONSEQUENCES, RULES, attribute_causes
from .signals import DEFAULT_THRESHOLDS, Signals, Thresholds


def diagnose(history, thresholds: Thresholds | None = None) -> list:
    """Findings for `history` (a History, a docs/history.md dict or a path to its JSON), most severe first."""
    signals = Signals(HistoryView(history), thresholds or DEFAULT_THRESHOLDS)
    findings = []
    for rule in RULES:
        findings.extend(rule(signals))
    findings = attribute_causes(findings)
    # Most severe first; within a severity, causes before the findings they explain.
    return sorted(
        findings, key=lambda f: (-SEVERITIES.index(f.severity), "likely_caused_by" in f.evidence, code_rank(f.code))
    )


def code_rank(code: str) -> int:
    return CODES.index(code) if code in CODES else len(CODES)


__all__ = [
    "CODES",
    "CONSEQUENCES",
    "DEFAULT_THRESHOLDS",
    "FINDINGS_FORMAT",
    "SEVERITIES",
    "Finding",
    "Thresholds",
    "diagnose",
    "dumps",
    "findings_to_json",
    "format_report",
]  # fmt: skip
