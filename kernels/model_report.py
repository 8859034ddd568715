"""Rendering the performance model's document (kernels/model.py) as JSON and markdown. Every time printed here is
labelled modelled; measured figures appear only where `fastlstm bench --gpu-check` put them in a case's slot.
kernels/model.py builds the document and imports this module, never the other way."""

from __future__ import annotations

import json

LABEL = "modelled"  # every figure of the document carries it: no GPU ran any of this


def write_json(doc: dict, path: str) -> str:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
    return path


def _us(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _kib(n: float) -> str:
    return f"{n / 1024:.3g}"


def _n(x: float) -> str:
    """A per-step count: whole numbers as such, fractions (unrolled loops) to three figures."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.3g}"


# The kernel families of the summary, in the order of its columns (kernels/model.py: routes).
FAMILIES = ("single", "split-gluon", "split", "streaming")


def summary_table(doc: dict) -> str:
    """µs per step, modelled, per shape and kernel family, beside the nearest published nn.LSTM figure."""
    header = "| shape | routed | " + " | ".join(f"{f} fwd | {f} fwd+bwd" for f in FAMILIES)
    lines = [
        header + " | nn.LSTM published fwd / fwd+bwd | published shape |",
        "|---|---|" + "---:|---:|" * len(FAMILIES) + "---:|---|",
    ]
    for key, case in doc["cases"].items():
        cells = []
        for label in FAMILIES:
            k = case["kernels"].get(label)
            est = k[LABEL] if k else {}
            cells += [_us(est.get("forward_us_per_step")), _us(est.get("forward_backward_us_per_step"))]
        ref = case["nn_lstm_published"]
        where = f"H={ref['hidden']} B={ref['batch']} T={ref['seq']}, {ref['dtype']}, {ref['hardware']}"
        lines.append(
            f"| {key} | {case['routed'] or '—'} | {' | '.join(cells)} | "
            f"{_us(ref['forward_us_per_step'])} / {_us(ref['forward_backward_us_per_step'])} | {where} |"
        )
    return "\n".join(lines)


def detail_table(doc: dict) -> str:
    """Per program and time step, from the SASS: what each pass loads, stores, waits for."""
    lines = [
        (
            "| shape | kernel | pass | programs | global loads KiB | of which W_hh | stores KiB | shared ld/st KiB | "
            "BAR | grid sync (polls, strong loads, atomics+reds, fences, L1 invalidations) | MMA | round trips | "
            "limiter | µs (modelled) |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for key, case in doc["cases"].items():
        for label, k in case["kernels"].items():
            for name in ("forward", "backward"):
                p = k[name]
                s = p["sync"]
                counts = (
                    s.get("poll_loops", 0),
                    s.get("strong_loads", 0),
                    s.get("atomics", 0) + s.get("reductions", 0),
                    s.get("fences", 0),
                    s.get("cctl_invalidations", 0),
                )
                sync = ", ".join(_n(x) for x in counts)
                mma = ", ".join(f"{_n(n)}× {op}" for op, n in p["mma"].items())
                mma = mma or (f"{_n(p['ffma'])} FFMA" if p["ffma"] else "—")
                loads = _kib(sum(p["global_load_bytes"].values()))
                lines.append(
                    f"| {key} | {label} | {name} | {k['programs'][name]} | {loads} | "
                    f"{_kib(p['weight_load_bytes'])} | {_kib(sum(p['global_store_bytes'].values()))} | "
                    f"{_kib(p['shared_load_bytes'])} / {_kib(p['shared_store_bytes'])} | "
                    f"{_n(p['barriers'])} | {sync} | "
                    f"{mma} | {p['round_trips']:.3g} | {p['limiter']} | {_us(p['step_us'])} |"
                )
    return "\n".join(lines)


def critical_path_table(doc: dict) -> str:
    """Where the dependent round trips of a step come from, by the argument each waited-for load reads."""
    lines = ["| shape | kernel | pass | round trips per step, by what they wait for |", "|---|---|---|---|"]
    for key, case in doc["cases"].items():
        if case["problem"]["batch"] != 16:
            continue
        for label, k in case["kernels"].items():
            for name in ("forward", "backward"):
                parts = ", ".join(f"{arg} {n:.3g}" for arg, n in k[name]["round_trips_by_arg"].items() if n >= 0.5)
                lines.append(f"| {key} | {label} | {name} | {parts} |")
    return "\n".join(lines)


def constants_table(doc: dict) -> str:
    lines = ["| constant | value | unit | source |", "|---|---:|---|---|"]
    for c in doc["constants"]:
        value = f"{c['value']:.4g}" if isinstance(c["value"], float) else str(c["value"])
        lines.append(f"| {c['name']} | {value} | {c['unit']} | {c['source']} |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    weights = sorted(
        {
            f"{label} {name}"
            for case in doc["cases"].values()
            for label, k in case["kernels"].items()
            for name in ("forward", "backward")
            if k[name]["weights_every_step"]
        }
    )
    parts = [
        f"# Performance model: {doc['arch']}, {doc['hardware']}, triton {doc['triton']} ({LABEL})",
        "",
        (
            f"**Every time on this page is {LABEL}**, computed from the SASS that triton {doc['triton']} compiles for "
            f"{doc['arch']} and the constants below; no GPU ran any of it. Generated {doc['generated']} by "
            "`python -m fastlstm.kernels.model`; the method, the formula and its limits are in "
            "docs/performance-model.md. One layer, one direction, input size = hidden size, telemetry on, T = 1024. "
            '`routed` is what `backend="auto"` runs on CUDA today.'
        ),
        "",
        (
            "The nn.LSTM column is the nearest *published* measurement (its shape, precision and GPU in the last "
            "column; not this shape and not an H200 unless it says so): compare orders of magnitude, not digits."
        ),
        "",
        f"## µs per time step ({LABEL}): recurrence kernels plus the cuBLAS GEMMs around them, spread over the steps",
        "",
        summary_table(doc),
        "",
        (
            f"Variants whose time loop loads W_hh from global memory every step (read from the SASS): "
            f"{', '.join(weights) or 'none'}."
        ),
        "",
        f"## Per program and time step, read from the SASS ({LABEL} where a time)",
        "",
        (
            "Bytes are what the instructions request (threads × access width), so loads whose threads share an address "
            "count once per thread; loads live only at the first step (h0, c0) are left out; a software-pipelining "
            "prologue counts as the iterations it replaces. Grid sync counts instructions per warp."
        ),
        "",
        detail_table(doc),
        "",
        "## Dependent global round trips of a step, by what they wait for (B = 16)",
        "",
        critical_path_table(doc),
        "",
        "## Constants",
        "",
        constants_table(doc),
        "",
    ]
    return "\n".join(parts)
