"""gpu-check.md: the table of `fastlstm bench --gpu-check`, measured fastlstm and nn.LSTM beside the performance
model's estimates (labelled modelled), one row per case, from the check's JSON document."""

from __future__ import annotations

from .gpu_plan import MODES


def markdown(doc: dict) -> str:
    env = doc["environment"]
    gpu = (env.get("gpu") or {}).get("name", env.get("device"))
    tests = doc["tests"]
    extras = [p for p in doc["settings"]["providers"] if p not in ("fastlstm", "nn.LSTM")]
    lines = [
        f"# fastlstm GPU check: {gpu}",
        "",
        (
            f"{env.get('date')}, driver {env.get('driver')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, git {env.get('git_commit')}. Budget {doc['settings']['budget_s']:.0f} s, "
            f"{doc.get('elapsed_s', 0):.0f} s used. Measured times are medians of separately timed calls (CUDA events; "
            "perf_counter on the CPU) after an untimed first call; `modelled` columns are the committed "
            "performance-model table's estimates, not measurements."
        ),
        "",
        f"GPU tests: **{tests.get('status')}**"
        + (
            f" ({tests.get('tests', '?')} tests, {tests.get('failures', 0)} failures, {tests.get('errors', 0)} errors,"
            f" {tests.get('skipped', 0)} skipped, {tests.get('seconds', 0):.0f} s)"
            if "seconds" in tests
            else f": {tests.get('reason', '')}"
        ),
        "",
        (
            "| case | status | fastlstm fwd ms | modelled | nn.LSTM fwd ms | speedup | "
            "fastlstm fwd+bwd ms | modelled | "
            "nn.LSTM fwd+bwd ms | speedup | "
            + "".join(f"{p} fwd / fwd+bwd ms | " for p in extras)
            + "fastlstm µs/step fwd / fwd+bwd |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extras) + "---:|",
    ]
    for name, case in doc["cases"].items():
        timing, model = case.get("timing", {}), case.get("modelled") or {}
        cells = []
        for mode, key in (("forward", "forward_ms"), ("forward_backward", "forward_backward_ms")):
            fast, base = _median(timing, mode, "fastlstm"), _median(timing, mode, "nn.LSTM")
            speed = f"{base / fast:.2f}×" if fast and base else "—"
            cells += [_ms(fast), _ms(model.get(key)), _ms(base), speed]
        for extra in extras:
            cells.append("/".join(_ms(_median(timing, m, extra)) for m in MODES))
        per_step = "/".join(
            _ms(_median(timing, m, "fastlstm") and _median(timing, m, "fastlstm") * 1e3 / case["problem"]["seq"])
            for m in MODES
        )
        status = case.get("status", "?") + (f" ({case['reason']})" if case.get("reason") else "")
        missed = [
            f"{p} error {c['max_error']:.1e} > {c['threshold']:.0e}"
            for p, c in case.get("correctness", {}).items()
            if c.get("passed") is False
        ]
        status += f" (gate: {'; '.join(missed)})" if missed else ""
        lines.append(f"| {name} | {status} | {' | '.join(cells)} | {per_step} |")
    if doc["notes"]:
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def _median(timing: dict, mode: str, provider: str):
    record = timing.get(mode, {}).get(provider)
    return None if record is None else record.get("median_ms")


def _ms(value) -> str:
    return "—" if value is None else f"{value:.3g}"
