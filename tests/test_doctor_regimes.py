"""The doctor in the regimes that fooled it: a loss rising by orders of magnitude or turning NaN (never "stagnant"),
a loss converging to zero with the gradient norm (no spike against a collapsed baseline, never from one step),
clipping at every step (healthy when the loss falls; the learning rate when it rises), truncation done by the
user's own loop (seen from the carried state), and causes reported before their consequences.

Recorded-history tests build histories in docs/history.md's format and derive expectations from the documented
thresholds; end-to-end tests train small runs from tests/doctor_loops.py, doctor_lm.py and doctor_real.py (a few
seconds each) and check the findings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import doctor_lm
import doctor_loops
import doctor_real
import failure_suite as suite
import numpy as np
import pytest

from fastlstm import doctor

TH = doctor.DEFAULT_THRESHOLDS
SEVERE = ("warning", "error")


def _history(loss, grad_norm=None, lr=0.01, applied=None, update_ratio=None) -> dict:
    steps = []
    for i, value in enumerate(loss):
        entry = {"step": i, "loss": float(value), "lr": float(lr[i] if np.ndim(lr) else lr), "skipped": False}
        entry["grad_norm"] = 1.0 if grad_norm is None else float(grad_norm[i])
        if applied is not None:
            entry["grad_norm_applied"] = float(applied[i])
        if update_ratio is not None and update_ratio[i] is not None:
            entry["update_ratio"] = float(update_ratio[i])
        steps.append(entry)
    return {"format": "fastlstm.history/1", "steps": steps}


def _codes(findings, severities=SEVERE) -> set:
    return {f.code for f in findings if f.severity in severities}


def _get(findings, code):
    return next(f for f in findings if f.code == code)


# ---- a rising loss is diverging, never stagnant ----


def test_loss_rising_by_orders_of_magnitude_is_diverging_not_stagnant():
    rng = np.random.default_rng(0)
    loss = np.exp(np.linspace(0.0, math.log(1e6), 60)) * (1 + 0.05 * rng.standard_normal(60))
    findings = doctor.diagnose(_history(loss))
    assert "loss_stagnant" not in _codes(findings, doctor.SEVERITIES)
    f = _get(findings, "loss_diverging")
    assert f.severity == "error"  # beyond diverge_error × its start
    assert f.evidence["rise_over_reference"] > TH.diverge_error
    assert "Lower the learning rate" in f.remedy and "ReduceLROnPlateau" in f.remedy


def test_loss_turning_nonfinite_is_never_stagnant():
    loss = [1.0] * 30 + [math.nan] * 30  # flat, then NaN: the flat part alone would read as stagnant
    history = _history(loss)
    findings = doctor.diagnose(history)
    assert "loss_stagnant" not in _codes(findings, doctor.SEVERITIES)
    assert "non_finite" in _codes(findings)
    assert "loss_stagnant" in _codes(doctor.diagnose(_history([1.0] * 30)))  # the same flat part, finite to the end


def test_moderate_rise_counts_only_as_a_trend_across_blocks():
    """A stream whose first chunks are easy repeats its pattern every epoch: not a rise. A steady 60% climb is."""
    rng = np.random.default_rng(1)
    pattern = np.r_[0.02, 0.02, np.full(30, 1.0)]
    periodic = np.tile(pattern, 5) * (1 + 0.05 * rng.standard_normal(160))
    steady = np.linspace(1.0, 1.6, 160) * (1 + 0.05 * rng.standard_normal(160))
    assert "loss_diverging" not in _codes(doctor.diagnose(_history(periodic)), doctor.SEVERITIES)
    f = _get(doctor.diagnose(_history(steady)), "loss_diverging")
    assert f.severity == "warning" and f.evidence["rise_over_reference"] > 1 + TH.diverge_rise


def test_diverging_with_clipping_always_in_effect_names_the_learning_rate():
    n = 80
    loss = np.linspace(1.0, 3.0, n)
    norm = np.full(n, 5.0)
    findings = doctor.diagnose(_history(loss, grad_norm=norm, applied=np.full(n, 0.25)))
    f = _get(findings, "loss_diverging")
    assert f.evidence["clipped_share"] == 1.0
    assert f.evidence["likely_causes"][0] == "learning_rate_too_high"
    assert "Clipping is already in effect" in f.remedy and "clip_grad_norm_" not in f.remedy


def test_diverging_after_a_warmup_names_the_schedule():
    n = 100
    lr = np.minimum(1e-3 * (1 + np.arange(n)), 0.05)
    loss = np.r_[np.linspace(1.0, 0.5, 40), np.linspace(0.5, 5.0, 60)]
    f = _get(doctor.diagnose(_history(loss, lr=lr)), "loss_diverging")
    assert "learning_rate_increased" in f.evidence["likely_causes"]
    assert f.evidence["lr_at_onset"] > 1.5 * f.evidence["lr_at_start"]


def test_update_ratio_and_unclipped_growth_are_named_as_causes():
    n = 60
    loss = np.exp(np.linspace(0, 5, n))
    norm = np.exp(np.linspace(0, 8, n))
    ratio = [0.2 if i % 10 == 0 else None for i in range(n)]
    f = _get(doctor.diagnose(_history(loss, grad_norm=norm, update_ratio=ratio)), "loss_diverging")
    assert f.evidence["update_ratio_to_onset"] == pytest.approx(0.2)
    assert {"learning_rate_too_high", "gradients_growing_unclipped"} <= set(f.evidence["likely_causes"])
    clip = float(f.remedy.split("max_norm=")[1].split(")")[0])
    assert clip <= 10 * norm[0]  # from the norms before the loss turned, not the exploded ones


# ---- gradient spikes: a baseline that does not collapse, never one step ----


def test_converging_to_zero_loss_raises_no_spike_and_no_alarm():
    """Cross-entropy that converges to exactly zero: the gradient norm collapses by nine orders of magnitude, so a
    global median reads the first step as a 1e9× spike. Against the preceding steps, floored at the early level,
    nothing spikes; the gradual fall to zero is information, not a bug."""
    n = 200
    rng = np.random.default_rng(2)
    loss = np.r_[1.4 * np.exp(-np.arange(150) / 8.0), np.zeros(50)]
    norm = np.r_[np.exp(-np.arange(150) / 8.0), np.full(50, 1e-9)] * np.exp(0.3 * rng.standard_normal(n))
    norm[170] = 1e-6  # a blip 1000× the converged level, far below anything early in training
    findings = doctor.diagnose(_history(loss, grad_norm=norm))
    assert not _codes(findings), [(f.code, f.severity, f.message) for f in findings]
    assert _get(findings, "loss_zero").severity == "info"
    globally = norm[0] / np.median(norm)
    assert globally > TH.explode_error  # the old global-median rule read this as an error-level spike


def test_a_lone_spike_is_info_and_repeated_spikes_are_a_warning():
    rng = np.random.default_rng(3)
    base = 1.0 + 0.1 * rng.standard_normal(100)
    loss = np.linspace(1.0, 0.3, 100)
    one, two = base.copy(), base.copy()
    one[50] = 500.0
    two[[50, 70]] = 500.0
    f1 = _get(doctor.diagnose(_history(loss, grad_norm=one)), "exploding_gradients")
    f2 = _get(doctor.diagnose(_history(loss, grad_norm=two)), "exploding_gradients")
    assert (f1.severity, f1.evidence["spiking_steps"]) == ("info", 1)
    assert (f2.severity, f2.evidence["spiking_steps"]) == ("warning", 2)
    assert f2.evidence["spike_ratio"] == pytest.approx(500.0 / np.median(base[30:50]), rel=0.05)


def test_a_spike_over_the_baseline_floor_is_described_against_the_floor():
    # Early norms of 100, then 1e-4: the median of the steps before the spikes is 1e-4, the floor 100 / 100 = 1.
    norm = np.r_[np.full(20, 100.0), np.full(60, 1e-4), [200.0, 1e-4, 1e-4, 300.0], np.full(16, 1e-4)]
    f = _get(doctor.diagnose(_history(np.geomspace(1.0, 1e-3, norm.size), grad_norm=norm)), "exploding_gradients")
    floor = np.median(norm[: TH.spike_baseline_steps]) / TH.explode_spike
    assert f.evidence["baseline_at_max"] == pytest.approx(floor)
    assert "floor" in f.message and "the median of the 20 steps before it" not in f.message


def test_spikes_that_clipping_contains_are_info():
    rng = np.random.default_rng(4)
    norm = 1.0 + 0.1 * rng.standard_normal(100)
    norm[[30, 50, 70]] = 400.0
    applied = np.minimum(norm, 2.0)
    f = _get(
        doctor.diagnose(_history(np.linspace(1, 0.3, 100), grad_norm=norm, applied=applied)), "exploding_gradients"
    )
    assert f.severity == "info" and f.evidence["clipped_share_of_spikes"] == 1.0


# ---- gate saturation in several layers ----


def test_saturated_layers_are_one_finding_with_each_layers_evidence():
    def layer(k, saturated):
        gates = {"i": saturated, "f": 0.1, "g": saturated, "o": 0.1}
        return {"layer": k, "direction": 0, "elements": 1000, "forget_gate_mean": 0.5, "gate_saturation": gates}

    snapshot = {"layers": [layer(0, 0.9), layer(1, 0.8)]}
    history = {
        "format": "fastlstm.history/1",
        "telemetry": [{"step": s, "lstm": "lstm", "snapshot": snapshot} for s in range(0, 40, 5)],
    }
    (f,) = [f for f in doctor.diagnose(history) if f.code == "gate_saturation"]
    assert f.severity == "warning"
    recent = [signal["gates"]["i"]["saturated_fraction_recent"] for signal in f.evidence["signals"]]
    assert recent == pytest.approx([0.9, 0.8])  # layer 0's evidence, then layer 1's
    assert "layer 0" in f.message and "layer 1" in f.message


# ---- truncation by the user's own loop ----


def _chunked_history(carried: bool, attached: bool = False, rho: float = 0.95, window: int = 8) -> dict:
    """Telemetry windows whose profile accumulates geometrically (a loss at every step, a recurrence keeping
    rho of the gradient per step) and the carried-state counts of a loop cutting streams into `window` steps."""
    profile = np.cumsum(rho ** np.arange(window))[::-1]  # time order: the chunk's first step first
    history = _history(np.linspace(1.0, 0.6, 60))
    history["lstms"] = {"lstm": {"input_size": 2, "hidden_size": 8, "num_layers": 1, "num_directions": 1}}
    history["telemetry"] = [
        {
            "step": s,
            "first_step": s - 4,
            "lstm": "lstm",
            "snapshot": {
                "layers": [
                    {
                        "layer": 0,
                        "direction": 0,
                        "elements": 100,
                        "grad_norm_per_step": profile.tolist(),
                        "gate_saturation": {g: 0.0 for g in "ifgo"},
                        "forget_gate_mean": 0.5,
                        "cell_absmax": 1.0,
                    }
                ]
            },
        }
        for s in range(4, 60, 5)
    ]
    history["states"] = [
        {
            "step": s,
            "first_step": s - 4,
            "lstm": "lstm",
            "passes": 5,
            "with_state": 5 if carried else 0,
            "nonzero_state": 5 if carried else 0,
            "attached_state": 5 if attached else 0,
            "timesteps": window,
        }
        for s in range(4, 60, 5)
    ]
    return history


def test_truncation_by_the_users_loop_is_judged_from_the_telemetry():
    f = _get(doctor.diagnose(_chunked_history(carried=True)), "truncation_too_short")
    share = f.evidence["gradient_profile"]["gradient_share_beyond_window"]
    assert f.severity == "warning" and share == pytest.approx(0.95**8, abs=0.1)
    assert f.evidence["chunk_steps"] == 8 and f.evidence["suggested_steps"] > 8
    assert "TBPTTTrainer" in f.remedy
    # No carried state (each chunk from zeros), or a state that keeps its graph (full backpropagation): no cut.
    assert "truncation_too_short" not in _codes(doctor.diagnose(_chunked_history(carried=False)))
    assert "truncation_too_short" not in _codes(doctor.diagnose(_chunked_history(carried=True, attached=True)))
    # A recurrence that forgets within the chunk: nothing beyond it.
    assert "truncation_too_short" not in _codes(doctor.diagnose(_chunked_history(carried=True, rho=0.3)))


# ---- causes before consequences ----


def test_a_consequence_is_reported_under_its_cause_with_the_link_in_json():
    n = 100
    rng = np.random.default_rng(5)
    norm = 1.0 + 0.1 * rng.standard_normal(n)
    norm[[40, 60, 80]] = 236.0  # the spikes unscaled inputs produced in the reproduction
    history = _history(np.linspace(1.0, 0.5, n), grad_norm=norm)
    history["inputs"] = [
        {
            "step": 9,
            "lstm": "lstm",
            "count": 500,
            "mean": [0.0, 5000.0],
            "std": [1.0, 800.0],
            "min": [-3.0, 2000.0],
            "max": [3.0, 8000.0],
        }
    ]
    findings = doctor.diagnose(history)
    assert [f.code for f in findings[:2]] == ["unscaled_inputs", "exploding_gradients"]
    assert findings[1].caused_by == ("unscaled_inputs",) and not findings[0].caused_by
    data = json.loads(doctor.dumps(findings))
    assert data["findings"][1]["caused_by"] == ["unscaled_inputs"]
    report = doctor.format_report(findings)
    assert report.index("[WARNING] unscaled_inputs") < report.index("exploding_gradients: a consequence of")
    assert doctor.root_causes(findings)[0].code == "unscaled_inputs"


def test_inputs_that_grow_in_training_are_not_unscaled_data():
    """An embedding whose weights the steps blew up feeds the LSTM ever larger inputs: that is not a scaling
    fault of the data (the first window was fine), and a diverging loss names it as part of its cause."""
    history = _history(np.exp(np.linspace(0, 5, 60)))
    history["inputs"] = [
        {"step": s, "lstm": "lstm", "count": 100, "mean": [0.0], "std": [0.05 * 3**k], "min": [-1.0], "max": [1.0]}
        for k, s in enumerate(range(9, 60, 10))
    ]
    findings = doctor.diagnose(history)
    assert "unscaled_inputs" not in _codes(findings)
    assert "upstream_weights_growing" in _get(findings, "loss_diverging").evidence["likely_causes"]


# ---- the registry: one vocabulary, one table ----


def test_codes_and_the_docs_table_derive_from_the_registry():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "doctor.md"), encoding="utf-8") as handle:
        assert doctor.codes_table() in handle.read()
    with open(os.path.join(root, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert [c for c in doctor.CODES if f"`{c}`" not in readme] == []
    assert len(set(doctor.CODES)) == len(doctor.CODES)
    assert {link.cause for link in doctor.LINKS} <= set(doctor.CODES)
    assert {e for link in doctor.LINKS for e in link.effects} <= set(doctor.CODES)


def test_the_registry_module_prints_the_table_of_the_registered_rules():
    """`python -m fastlstm.doctor.registry` (docs/doctor.md) prints the same table, every code in it."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    command = [sys.executable, "-m", "fastlstm.doctor.registry"]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == doctor.codes_table()
    assert all(f"| `{code}` |" in result.stdout for code in doctor.CODES)


def test_the_doctor_reads_a_history_without_torch_or_the_trainer(tmp_path):
    """The doctor and what it imports need numpy only: run it where importing torch or fastlstm.tbptt fails."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_chunked_history(carried=True)))
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    script = f"""
import importlib.abc, sys, types
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "triton") or name == "fastlstm.tbptt":
            raise ImportError("refused: " + name)
sys.meta_path.insert(0, Refuse())
package = types.ModuleType("fastlstm")
package.__path__ = [{os.path.join(root, "fastlstm")!r}]  # the package without its __init__ (which imports torch)
sys.modules["fastlstm"] = package
from fastlstm import doctor
print(",".join(f.code for f in doctor.diagnose({str(path)!r})))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "truncation_too_short" in result.stdout


def test_the_doctor_reads_a_recorded_history_importing_neither_torch_nor_the_trainer(tmp_path):
    """A history the trainer recorded and saved is diagnosed by a process that imports only the doctor (and the
    History format): torch and the trainer's modules never load."""
    torch = pytest.importorskip("torch")
    import fastlstm
    from fastlstm.tbptt import TBPTTTrainer

    torch.manual_seed(0)
    model = fastlstm.LSTM(2, 8)
    x, y = torch.randn(40, 3, 2), torch.randn(40, 3, 8)
    trainer = TBPTTTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.functional.mse_loss, k1=5)
    path = tmp_path / "run.json"
    trainer.fit((x, y)).save(path)
    in_process = [f.code for f in doctor.diagnose(str(path))]
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    script = f"""
import sys, types
package = types.ModuleType("fastlstm")
package.__path__ = [{os.path.join(root, "fastlstm")!r}]  # the package without its __init__ (which imports torch)
sys.modules["fastlstm"] = package
from fastlstm import doctor
from fastlstm.history import History
codes = [f.code for f in doctor.diagnose(History.load({str(path)!r}))]
trainer = [m for m in sys.modules if m in ("fastlstm.tbptt", "fastlstm.monitor", "fastlstm.truncation_state")]
print(",".join(codes)); print("torch" in sys.modules, trainer)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    codes, loaded = result.stdout.strip().splitlines()
    assert loaded == "False []"
    assert (codes.split(",") if codes else []) == in_process


# ---- small end-to-end runs ----


def _run(scenario_list, name):
    scenario = next(s for s in scenario_list if s.name == name)
    return suite.run(scenario, seed=0)


@pytest.mark.parametrize(
    "scenarios, name",
    [
        (doctor_loops.SCENARIOS, "healthy_chunked_loop"),
        (doctor_loops.SCENARIOS, "truncation_chunked_loop"),
        (doctor_loops.SCENARIOS, "healthy_classifier_to_zero"),
        (doctor_loops.SCENARIOS, "healthy_clipped_every_step"),
        (doctor_loops.SCENARIOS, "diverging_lr"),
        (doctor_lm.SCENARIOS, "diverging_word_lm"),
        (doctor_real.SCENARIOS, "sunspots_healthy"),
        (doctor_real.SCENARIOS, "sunspots_raw_units"),
        (doctor_real.SCENARIOS, "sunspots_nan_reading"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_end_to_end(scenarios, name):
    o = _run(scenarios, name)
    flagged = [(f.code, f.severity, f.caused_by) for f in o.findings if f.severity in SEVERE]
    assert o.ok, f"{name}: {suite._verdict(o)}; flagged {flagged}"


def test_clipping_at_every_step_is_recorded_and_healthy():
    o = _run(doctor_loops.SCENARIOS, "healthy_clipped_every_step")
    steps = o.history["steps"]
    clipped = [s["grad_norm_applied"] < 0.999 * s["grad_norm"] for s in steps]
    assert np.mean(clipped) > 0.9  # the 0.05 clip was in effect on (almost) every step
    assert all(s["grad_norm_applied"] <= 0.05 * (1 + 1e-5) for s in steps)
    assert not [f for f in o.findings if f.severity in SEVERE]


def test_diverging_word_lm_is_named_with_the_learning_rate():
    o = _run(doctor_lm.SCENARIOS, "diverging_word_lm")
    f = o.findings[0]
    assert f.code == "loss_diverging" and not f.caused_by
    assert "learning_rate_too_high" in f.evidence["likely_causes"]
    assert f.evidence["lr_median"] == 100.0 and "from 100 to 10" in f.remedy
    assert "loss_stagnant" not in {g.code for g in o.findings}
