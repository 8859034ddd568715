"""The LSTM doctor: turns a training History (docs/history.md) into findings with evidence and remedies.

    findings = fastlstm.diagnose(history)       # a History, a dict in docs/history.md's format, or a JSON path
    print(fastlstm.doctor.format_report(findings))
    print(fastlstm.doctor.dumps(findings))      # the stable JSON form, "fastlstm.findings/1"

Each rule (rules/<family>.py, registered in registry.py) reads measured signals (signals.py: losses, gradient norms
before and after clipping, update ratios, per-timestep gradient norms, gate saturation, first non-finite location,
input and target statistics, carried state, truncation events; the statistics in measures.py), compares them with a
documented threshold (`Thresholds`, thresholds.py), and reports a `Finding(code, severity, message, evidence,
remedy, caused_by)` (findings.py). The causal links (causes.py) put each symptom under the fault that explains it.
docs/doctor.md documents every rule and the precision/recall measured on failure reproductions and real datasets.

Reading a history needs numpy only: nothing here imports torch or the trainer.
"""

from __future__ import annotations

from ..history_view import HistoryView
from . import rules  # noqa: F401 - importing the families registers their rules (registry.py)
from .causes import LINKS, attach_causes, consequences_of
from .findings import FINDINGS_FORMAT, SEVERITIES, Finding, dumps, findings_to_json, format_report, root_causes
from .registry import codes, codes_table, specs
from .signals import Signals
from .thresholds import DEFAULT_THRESHOLDS, Thresholds

CODES = codes()  # the fixed vocabulary, in report order (registry.py)
CONSEQUENCES = {code: consequences_of(code) for code in CODES if consequences_of(code)}


def diagnose(history, thresholds: Thresholds | None = None) -> list:
    """Findings for `history` (a History, a docs/history.md dict or a path to its JSON): each root cause, worst
    group first, followed by the findings it explains (their `caused_by` names it)."""
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(
            f"thresholds must be a Thresholds (dataclasses.replace(DEFAULT_THRESHOLDS, min_steps=...)), got "
            f"{type(thresholds).__name__}"
        )
    signals = Signals(HistoryView(history), thresholds or DEFAULT_THRESHOLDS)
    findings = []
    for spec in specs():
        findings.extend(spec.check(signals))
    return attach_causes(findings, CODES)


__all__ = [
    "CODES",
    "CONSEQUENCES",
    "DEFAULT_THRESHOLDS",
    "FINDINGS_FORMAT",
    "LINKS",
    "SEVERITIES",
    "Finding",
    "Thresholds",
    "codes_table",
    "diagnose",
    "dumps",
    "findings_to_json",
    "format_report",
    "root_causes",
]
