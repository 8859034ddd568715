"""Causal links between findings: a fault produces other findings as symptoms, and the report puts each symptom
under the fault that explains it, so the reader fixes the cause first instead of treating each symptom.

A link `cause -> effect` applies when both findings are present at warning or error level in the same run and its
condition (if any) holds for the two findings. An effect explained by several causes present is reported under the
first of them in report order; following those choices from any finding leads to its root cause.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .findings import SEVERITIES, Finding


def _arises_in_network(cause: Finding, effect: Finding) -> bool:
    """A non-finite value that arose inside the network (overflow), not in the data or the loss itself."""
    return not effect.evidence.get("data_fault", False)


def _before_first_nonfinite(cause: Finding, effect: Finding) -> bool:
    """The cause was under way before the first non-finite value appeared."""
    onset = cause.evidence.get("onset_step")
    first = effect.evidence.get("first_step")
    return _arises_in_network(cause, effect) and (onset is None or first is None or onset <= first)


@dataclasses.dataclass(frozen=True)
class Link:
    cause: str
    effects: tuple
    when: Callable | None = None  # (cause finding, effect finding) -> bool
    why: str = ""


LINKS = (
    Link("non_finite", ("loss_stagnant",), why="a NaN loss stops the curve"),
    Link("initial_loss_nonfinite", ("loss_stagnant",), why="nothing is learned from a NaN loss"),
    Link(
        "constant_target",
        ("loss_zero", "gate_saturation", "train_val_divergence"),
        why="a constant is fitted exactly; validation on real targets then worsens",
    ),
    Link(
        "unscaled_inputs",
        (
            "gate_saturation",
            "loss_stagnant",
            "exploding_gradients",
            "vanishing_gradients",
            "truncation_too_short",
            "loss_diverging",
            "val_oscillation",
        ),
        why="inputs in the thousands drive every gate pre-activation and the weight gradients",
    ),
    Link("unscaled_inputs", ("non_finite",), _arises_in_network, why="overflow from huge pre-activations"),
    Link(
        "unscaled_targets",
        ("gate_saturation", "loss_stagnant", "exploding_gradients", "loss_diverging"),
        why="a large offset or scale makes the first steps' errors, and gradients, huge",
    ),
    Link("loss_zero", ("loss_stagnant",), why="a zero loss cannot fall"),
    Link(
        "loss_diverging",
        (
            "exploding_gradients",
            "gate_saturation",
            "vanishing_gradients",
            "loss_stagnant",
            "val_oscillation",
            "train_val_divergence",
        ),
        why="steps too large for the loss surface grow the weights, saturate the gates and blow up the gradients",
    ),
    Link("loss_diverging", ("non_finite",), _before_first_nonfinite, why="the rising loss overflowed"),
    Link(
        "exploding_gradients",
        ("loss_stagnant", "val_oscillation", "gate_saturation"),
        why="oversized steps throw the weights around",
    ),
    Link("exploding_gradients", ("non_finite",), _before_first_nonfinite, why="the gradients overflowed"),
    Link("gate_saturation", ("vanishing_gradients", "loss_stagnant"), why="saturated gates pass almost no gradient"),
    Link("vanishing_gradients", ("loss_stagnant",), why="no gradient reaches the early steps"),
    Link(
        "truncation_too_short",
        ("loss_stagnant", "loss_diverging"),
        why="the dependency the loss needs is never backpropagated (a model that knew it forgets it)",
    ),
)


def consequences_of(code: str) -> tuple:
    """The codes a finding `code` can explain."""
    return tuple(dict.fromkeys(e for link in LINKS if link.cause == code for e in link.effects))


def attach_causes(findings: list, order: tuple) -> list:
    """Set `caused_by` (and, for readers of the evidence, `likely_caused_by` plus a remedy that says to fix the cause
    first) on every warning/error that a present warning/error explains; return them grouped for the report:
    root causes by the worst severity of their group, then report order; each followed by its consequences."""
    rank = {code: i for i, code in enumerate(order)}
    severe = [f for f in findings if f.severity != "info"]
    linked = []
    for f in findings:
        causes = []
        if f.severity != "info":
            for link in LINKS:
                if f.code not in link.effects or link.cause == f.code:
                    continue
                for c in severe:
                    if c.code == link.cause and c.code not in causes and (link.when is None or link.when(c, f)):
                        causes.append(c.code)
        causes.sort(key=lambda code: rank.get(code, len(rank)))
        linked.append(f if not causes else _as_consequence(f, causes))
    return _grouped(_break_cycles(linked, rank), rank)


def _as_consequence(f: Finding, causes: list) -> Finding:
    note = f"Probably a consequence of {' and '.join(causes)}: fix that first, then re-check. "
    evidence = {**f.evidence, "likely_caused_by": list(causes)}
    return dataclasses.replace(f, evidence=evidence, remedy=note + f.remedy, caused_by=tuple(causes))


def _break_cycles(findings: list, rank: dict) -> list:
    """Follow caused_by[0] from each finding; a finding reached again on its own chain loses its parent (the one
    earliest in report order stays a root)."""
    by_code = {f.code: f for f in findings}
    parent = {f.code: f.caused_by[0] for f in findings if f.caused_by and f.caused_by[0] in by_code}
    for start in list(parent):
        chain, code = [start], parent.get(start)
        while code is not None and code not in chain:
            chain.append(code)
            code = parent.get(code)
        if code is not None:  # a cycle through `code`
            cycle = chain[chain.index(code) :]
            root = min(cycle, key=lambda c: rank.get(c, len(rank)))
            parent.pop(root, None)
    result = []
    for f in findings:
        if f.caused_by and f.code not in parent:
            evidence = {k: v for k, v in f.evidence.items() if k != "likely_caused_by"}
            f = dataclasses.replace(f, evidence=evidence, caused_by=())
        result.append(f)
    return result


def _grouped(findings: list, rank: dict) -> list:
    by_code: dict = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)
    children: dict = {}
    roots = []
    for f in findings:
        parent = f.caused_by[0] if f.caused_by and f.caused_by[0] in by_code else None
        (children.setdefault(parent, []) if parent else roots).append(f)

    def subtree(f: Finding) -> list:
        kids = sorted(children.get(f.code, []) if by_code[f.code][0] is f else [], key=_key(rank))
        return [f] + [g for kid in kids for g in subtree(kid)]

    groups = [subtree(r) for r in roots]
    groups.sort(key=lambda g: (-max(SEVERITIES.index(f.severity) for f in g), rank.get(g[0].code, len(rank))))
    return [f for group in groups for f in group]


def _key(rank: dict) -> Callable:
    return lambda f: (-SEVERITIES.index(f.severity), rank.get(f.code, len(rank)))
