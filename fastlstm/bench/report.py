"""What `fastlstm bench` writes: the environment, results.json, results.md and the plots.

Input is the runner's result document (fastlstm/bench/runner.py: `{"environment", "settings", "cases": [...]}`
where each
case has `results[provider]` records); this module derives the comparisons (speedup against nn.LSTM, telemetry
overhead, packed against padded) and renders them. Plots use matplotlib's object API (no pyplot state) and are
skipped with a note when matplotlib is not installed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict

import torch

from .. import jsonio
from .cases import MODES
from .providers import BASELINE

SCHEMA = "fastlstm.bench/1"
FAST, FAST_OFF = "fastlstm", "fastlstm-notelemetry"


# ------------------------------------------------------------------------------------------------- environment


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver():
    """The driver version from nvidia-smi (torch does not expose it); None where it is absent."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None  # an installed copy outside a checkout
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """Everything needed to tell two result files apart: hardware, driver, library versions, date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),  # not imported: importing it here could change how kernels compile later
        "numpy": _version("numpy"),
        "fastlstm": _version("fastlstm"),
        "git_commit": _git_commit(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "driver": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
        }
        env["driver"] = _nvidia_driver()
    return env


# ------------------------------------------------------------------------------------------------ derivations


def median_ms(record) -> float | None:
    if record is None or record.get("status") != "ok" or not record.get("timing"):
        return None
    return record["timing"]["median_ms"]


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def derive(case: dict) -> dict:
    """The comparisons of one case: speedup of fastlstm (telemetry on and off) and of any other provider over
    nn.LSTM (> 1: faster than nn.LSTM), and telemetry overhead (time with telemetry / without; 1.02 = 2%)."""
    times = {name: median_ms(r) for name, r in case["results"].items()}
    base = times.get(BASELINE)
    speedups = {name: _ratio(base, t) for name, t in times.items() if name != BASELINE}
    return {"speedup": speedups, "telemetry_overhead": _ratio(times.get(FAST), times.get(FAST_OFF))}


def packed_vs_padded(cases: list) -> list:
    """For each packed case whose padded twin also ran: time packed / time padded per provider."""
    by_key = {(c["problem"]["name"], c["mode"]): c for c in cases}
    rows = []
    for c in cases:
        if not c["problem"]["packed"]:
            continue
        twin = by_key.get((c["padded_twin"], c["mode"]))
        if twin is None:
            continue
        ratios = {name: _ratio(median_ms(r), median_ms(twin["results"].get(name))) for name, r in c["results"].items()}
        rows.append({"case": c["name"], "padded": twin["name"], "ratio": ratios})
    return rows


def _tally(values, ok) -> dict:
    values = [v for v in values if v is not None]
    return {"met": sum(1 for v in values if ok(v)), "of": len(values)}


def targets(cases: list) -> dict:
    """The targets of docs/design.md, counted over the cases that have the numbers: how many meet each."""
    speedups = [(c, c["derived"]["speedup"].get(FAST)) for c in cases]
    small = [
        v
        for c, v in speedups
        if c["mode"] == "forward_backward" and c["problem"]["hidden"] <= 1024 and c["problem"]["batch"] <= 64
    ]
    syncs = [
        r["sync_check"]["status"]
        for c in cases
        for name in (FAST, FAST_OFF)
        if (r := c["results"].get(name)) and r.get("sync_check") and r["sync_check"]["status"] != "skipped"
    ]
    return {
        "forward_backward at least 2x nn.LSTM for H <= 1024, B <= 64": _tally(small, lambda v: v >= 2),
        "never slower than nn.LSTM": _tally([v for _, v in speedups], lambda v: v >= 1),
        "packed within 1.2x of padded": _tally(
            [r["ratio"].get(FAST) for r in packed_vs_padded(cases)], lambda v: v <= 1.2
        ),
        "telemetry costs at most 2%": _tally([c["derived"]["telemetry_overhead"] for c in cases], lambda v: v <= 1.02),
        "no host sync in a training step": _tally(syncs, lambda v: v == "passed"),
    }


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def summary(doc: dict) -> dict:
    """Counts by status, geometric-mean speedups by mode and dtype, telemetry overhead, sync checks."""
    status = defaultdict(int)
    for c in doc["cases"]:
        for r in c["results"].values():
            status[r["status"]] += 1
    speedups = defaultdict(list)
    overheads = []
    for c in doc["cases"]:
        speedups[(c["mode"], c["problem"]["dtype"])].append(c["derived"]["speedup"].get(FAST))
        overheads.append(c["derived"]["telemetry_overhead"])
    overheads = [o for o in overheads if o is not None]
    syncs = defaultdict(lambda: defaultdict(int))
    for c in doc["cases"]:
        for name, r in c["results"].items():
            if r.get("sync_check"):
                syncs[name][r["sync_check"]["status"]] += 1
    return {
        "status_counts": dict(status),
        "geomean_speedup": {f"{m}/{d}": _geomean(v) for (m, d), v in speedups.items() if _geomean(v) is not None},
        "telemetry_overhead": {
            "median": statistics.median(overheads) if overheads else None,
            "max": max(overheads) if overheads else None,
        },
        "sync_checks": {name: dict(v) for name, v in syncs.items()},
        "packed_vs_padded": packed_vs_padded(doc["cases"]),
        "targets": targets(doc["cases"]),
    }


# ---------------------------------------------------------------------------------------------------- writers


def write_json(doc: dict, path: str) -> str:
    jsonio.write_json(path, doc)
    return path


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _times(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _with_speedup(record, speedup) -> str:
    return _cell(record) if speedup is None else f"{_cell(record)} ({_times(speedup)})"


def _mib(record) -> str:
    mem = record.get("memory") if record else None
    return "—" if not mem else f"{mem['peak_extra_bytes'] / 2**20:.0f}"


def _cell(record) -> str:
    """A provider's time, or why there is none."""
    if record is None:
        return "—"
    if record["status"] == "ok":
        return _ms(record["timing"]["median_ms"])
    if record["status"] == "failed":
        c = record["correctness"]
        return f"FAILED ({c['worst']} err {c['max_error']:.1e} > {c['threshold']:.0e})"
    return record["status"]  # "skipped" or "error": the reason is in the JSON


def _spread(case) -> str:
    spreads = [r["timing"]["spread"] for r in case["results"].values() if r["status"] == "ok" and r.get("timing")]
    return "—" if not spreads else f"{100 * max(spreads):.0f}%"


def _sync_cell(case) -> str:
    statuses = {name: r["sync_check"]["status"] for name, r in case["results"].items() if r.get("sync_check")}
    if not statuses:
        return ""
    return ", ".join(f"{name}: {status}" for name, status in statuses.items() if status != "skipped") or "skipped"


def markdown(doc: dict) -> str:
    env, settings, cases = doc["environment"], doc["settings"], doc["cases"]
    others = [p for p in settings["providers"] if p not in (FAST, FAST_OFF, BASELINE)]
    hardware = env["gpu"]["name"] if env.get("gpu") else f"CPU ({env['cpu']}, {env['torch_threads']} threads)"
    lines = [
        "# fastlstm benchmark",
        "",
        f"{hardware} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · cuDNN {env['cudnn']}"
        f" · driver {env['driver']} · python {env['python']} · {env['date']}"
        + (
            f" · fastlstm {env['git_commit'][:10]}{'-dirty' * env['git_commit'].endswith('-dirty')}"
            if env.get("git_commit")
            else ""
        ),
        "",
        (
            f"`{settings['command']}`: {len(cases)} cases; {_timer_text(settings['timer'])}; inputs rotated over "
            f"{settings['input_pool']} buffers."
        ),
        (
            "Times are medians in ms over separate repeats (min–max in results.json); "
            "speedup = nn.LSTM time / fastlstm "
            "time (> 1: fastlstm faster); telemetry = time with telemetry / without; spread = largest (max − min) / "
            "median of the repeat medians in the row; peak = extra MiB allocated during one call."
        ),
    ]
    if settings["device"] != "cuda":
        lines += [
            "",
            (
                "**CPU smoke run**: fastlstm runs its plain-torch reference backend here, "
                "not the Triton kernels; these "
                "numbers check that the suite works and say nothing about fastlstm's speed."
            ),
        ]
    lines += _summary_lines(doc["summary"], gpu=settings["device"] == "cuda")
    for mode in MODES:
        rows = [c for c in cases if c["mode"] == mode]
        if rows:
            lines += ["", f"## {mode.replace('_', ' ')}", ""] + _mode_table(rows, others, mode)
    packed = doc["summary"]["packed_vs_padded"]
    if packed:
        lines += ["", "## Packed (mixed lengths) / padded", "", "| case | " + " | ".join(packed[0]["ratio"]) + " |"]
        lines.append("|---|" + "---:|" * len(packed[0]["ratio"]))
        lines += [f"| {r['case']} | " + " | ".join(_times(v) for v in r["ratio"].values()) + " |" for r in packed]
    failed = [(c["name"], n, r) for c in cases for n, r in c["results"].items() if r["status"] in ("failed", "error")]
    if failed:
        lines += ["", "## Not timed", ""]
        lines += [f"- {case} / {name}: {r['status']}: {r.get('reason', '')}" for case, name, r in failed]
    return "\n".join(lines) + "\n"


def _timer_text(t: dict) -> str:
    return (
        f"{t['repeats']} repeats of ≥ {t['min_iters']} calls and ~{t['rep_ms']:g} ms each after "
        f"{t['warmup_ms']:g} ms of warm-up"
    )


def _summary_lines(s: dict, gpu: bool) -> list:
    lines = ["", "## Summary", ""]
    lines.append("- results: " + ", ".join(f"{k} {v}" for k, v in sorted(s["status_counts"].items())))
    if s["geomean_speedup"]:
        lines.append(
            "- fastlstm speedup over nn.LSTM (geometric mean): "
            + ", ".join(f"{k} {_times(v)}" for k, v in sorted(s["geomean_speedup"].items()))
        )
    t = s["telemetry_overhead"]
    if t["median"] is not None:
        lines.append(f"- telemetry on / off: median {_times(t['median'])}, worst {_times(t['max'])}")
    met = [f"{name}: {t['met']} of {t['of']}" for name, t in s["targets"].items() if t["of"]]
    if met and gpu:  # the targets are about the kernels; a CPU run times the reference backend
        lines.append("- Targets (docs/design.md), cases meeting them: " + "; ".join(met))
    if s["sync_checks"]:
        lines.append(
            "- host-sync check of a training step: "
            + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for n, c in s["sync_checks"].items())
        )
    return lines


def _mode_table(rows: list, others: list, mode: str) -> list:
    sync = mode == "train_step"
    header = ["case", "nn.LSTM ms", "fastlstm ms", "speedup", "no-telemetry ms", "telemetry", "peak MiB fast / nn"]
    header += [f"{o} ms (speedup)" for o in others] + ["spread"] + (["host syncs"] if sync else [])
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for c in rows:
        r, d = c["results"], c["derived"]
        cells = [
            c["problem"]["name"],
            _cell(r.get(BASELINE)),
            _cell(r.get(FAST)),
            _times(d["speedup"].get(FAST)),
            _cell(r.get(FAST_OFF)),
            _times(d["telemetry_overhead"]),
            f"{_mib(r.get(FAST))} / {_mib(r.get(BASELINE))}",
        ]
        cells += [_with_speedup(r.get(o), d["speedup"].get(o)) for o in others]
        cells += [_spread(c)] + ([_sync_cell(c)] if sync else [])
        out.append("| " + " | ".join(cells) + " |")
    return out


# ------------------------------------------------------------------------------------------------------ plots


def _figure(**kwargs):
    from matplotlib.figure import Figure  # optional dependency: callers catch ImportError

    return Figure(layout="constrained", **kwargs)


def _base_cases(cases):
    return [c for c in cases if c["problem"]["variant"] == "base"]


def _heatmap_panels(cases: list) -> dict:
    """(mode, dtype) -> {(hidden, batch): speedup} at the panel's longest sequence length, for panels with at least
    two cells (one cell is not a map)."""
    by_key = defaultdict(list)
    for c in _base_cases(cases):
        if c["derived"]["speedup"].get(FAST) is not None:
            by_key[(c["mode"], c["problem"]["dtype"])].append(c)
    panels = {}
    for key, chosen in by_key.items():
        seq = max(c["problem"]["seq"] for c in chosen)
        cells = {
            (c["problem"]["hidden"], c["problem"]["batch"]): c["derived"]["speedup"][FAST]
            for c in chosen
            if c["problem"]["seq"] == seq
        }
        if len(cells) > 1:
            panels[key + (seq,)] = cells
    return panels


def plot_speedup_heatmap(cases: list, path: str) -> str | None:
    """Speedup of fastlstm over nn.LSTM over hidden × batch, one panel per (mode, dtype), at the longest sequence
    length measured for that panel; one colour scale for all panels, symmetric around 1 on a log scale (blue:
    fastlstm faster). None when no panel has data."""
    import numpy as np
    from matplotlib.colors import LogNorm

    panels = _heatmap_panels(cases)
    if not panels:
        return None
    keys = sorted(panels, key=lambda k: (MODES.index(k[0]), k[1]))
    bound = max(2.0, *(max(v, 1 / v) for cells in panels.values() for v in cells.values()))
    ticks = [2.0**e for e in range(-math.floor(math.log2(bound)), math.floor(math.log2(bound)) + 1)]
    columns = min(len(keys), 3)
    fig = _figure(figsize=(4.2 * columns, 3.6 * math.ceil(len(keys) / columns)))
    axes = fig.subplots(math.ceil(len(keys) / columns), columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        cells = panels[key]
        hiddens = sorted({h for h, _ in cells})
        batches = sorted({b for _, b in cells})
        grid = np.full((len(hiddens), len(batches)), np.nan)
        for (h, b), v in cells.items():
            grid[hiddens.index(h), batches.index(b)] = v
        image = ax.imshow(grid, cmap="RdBu", norm=LogNorm(1 / bound, bound), origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(hiddens)), [str(h) for h in hiddens])
        ax.set_xlabel("batch")
        ax.set_ylabel("hidden")
        ax.set_title(f"{key[0].replace('_', ' ')} · {key[1]} · T={key[2]}", fontsize=9)
        bar = fig.colorbar(image, ax=ax, ticks=ticks)
        bar.ax.set_yticklabels([f"{t:g}×" for t in ticks])
        bar.ax.minorticks_off()
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle("fastlstm speedup over nn.LSTM (> 1, blue: fastlstm faster)")
    fig.savefig(path, dpi=110)
    return path


def plot_time_per_step(cases: list, path: str, max_shapes: int = 4) -> str | None:
    """Time per timestep (µs) against sequence length, fastlstm solid and nn.LSTM dashed, one panel per mode, for
    up to `max_shapes` hidden × batch shapes of one dtype (the first with several lengths). None without data."""
    series = defaultdict(dict)  # (mode, dtype, hidden, batch, provider) -> {seq: µs per step}
    for c in _base_cases(cases):
        p = c["problem"]
        for name in (FAST, BASELINE):
            t = median_ms(c["results"].get(name))
            if t is not None:
                series[(c["mode"], p["dtype"], p["hidden"], p["batch"], name)][p["seq"]] = 1000 * t / p["seq"]
    multi = [k for k, v in series.items() if len(v) > 1]
    if not multi:
        return None
    dtype = min({k[1] for k in multi}, key=["bf16", "fp16", "tf32", "fp32"].index)
    shapes = sorted({(k[2], k[3]) for k in multi if k[1] == dtype})
    picks = min(max_shapes, len(shapes))  # spread over the sorted shapes, smallest and largest included
    shapes = [shapes[round(i * (len(shapes) - 1) / max(picks - 1, 1))] for i in range(picks)]
    modes = [m for m in MODES if any(k[0] == m and k[1] == dtype for k in multi)]
    fig = _figure(figsize=(4.5 * len(modes), 3.8))
    axes = fig.subplots(1, len(modes), squeeze=False).ravel()
    colors = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for ax, mode in zip(axes, modes, strict=False):
        for color, (hidden, batch) in zip(colors, dict.fromkeys(shapes), strict=False):
            for name, style in ((FAST, "-"), (BASELINE, "--")):
                points = series.get((mode, dtype, hidden, batch, name))
                if points:
                    xs = sorted(points)
                    label = f"H={hidden} B={batch}" if name == FAST else None  # colour = shape, style = provider
                    ax.plot(xs, [points[x] for x in xs], style, marker="o", color=color, label=label)
        ax.set_xscale("log", base=2)
        seqs = sorted({x for k, v in series.items() if k[0] == mode and k[1] == dtype for x in v})
        ax.set_xticks(seqs, [str(x) for x in seqs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("µs per timestep")
        ax.set_title(f"{mode.replace('_', ' ')} · {dtype}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("time per step vs sequence length (fastlstm solid, nn.LSTM dashed)")
    fig.savefig(path, dpi=110)
    return path


def write_plots(cases: list, folder: str) -> tuple[list, str | None]:
    """The PNGs that have data, and a note when matplotlib is missing (plots are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], 'plots skipped: matplotlib is not installed (pip install "fastlstm[plots]")'
    written = [
        plot_speedup_heatmap(cases, os.path.join(folder, "speedup_heatmap.png")),
        plot_time_per_step(cases, os.path.join(folder, "time_per_step.png")),
    ]
    return [p for p in written if p], None
