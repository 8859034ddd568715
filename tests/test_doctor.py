"""The doctor on real failure reproductions (tests/failure_suite.py), plus its input forms, thresholds, output
formats and the plot / TensorBoard adapters.

The reproduction tests train small fastlstm.LSTMs into each failure (a few seconds each on the CPU) and check that
the intended codes come out and that healthy controls get no warning or error. The remaining tests build
histories from small real runs or from the documented format, and check the behaviour against the documented
thresholds (`fastlstm.doctor.Thresholds`), computing expectations from the history itself.
"""

from __future__ import annotations

import dataclasses
import json
import math

import failure_suite as suite
import numpy as np
import pytest
import torch
from support import one_cpu_thread

import fastlstm
from fastlstm import doctor
from fastlstm.doctor.measures import truncated_gradient_share
from fastlstm.history_view import HistoryView
from fastlstm.jsonio import write_json

SEVERE = ("warning", "error")


# ---------------------------------------------------------------------------------------------------------------
# Failure reproductions
# ---------------------------------------------------------------------------------------------------------------

_outcomes: dict = {}


def outcome(name: str) -> suite.Outcome:
    """Each scenario trains once per session; several tests read its findings."""
    if name not in _outcomes:
        scenario = next(s for s in suite.SCENARIOS if s.name == name)
        _outcomes[name] = suite.run(scenario, seed=0)
    return _outcomes[name]


@pytest.mark.parametrize("name", [s.name for s in suite.SCENARIOS if not s.healthy])
def test_failure_is_diagnosed(name):
    o = outcome(name)
    assert not o.missed, f"{name}: expected {sorted(o.scenario.expected)}, found {sorted(o.found)}"
    for code in o.scenario.expected:
        assert any(f.code == code and f.severity in SEVERE for f in o.findings), f"{code} must be a warning/error"
    assert not o.false_alarms, f"{name}: unexpected {sorted(o.false_alarms)}"
    assert o.lead_ok, f"{name}: the report leads with {o.lead}, not one of {sorted(o.scenario.lead_codes)}"


@pytest.mark.parametrize("name", [s.name for s in suite.SCENARIOS if s.healthy])
def test_healthy_control_gets_no_warning(name):
    o = outcome(name)
    severe = [f"{f.code}: {f.message}" for f in o.findings if f.severity in SEVERE]
    assert not severe, f"{name}: " + "\n".join(severe)


def test_precision_and_recall_over_the_suite():
    outcomes = [outcome(s.name) for s in suite.SCENARIOS]
    table = suite.scores(outcomes)
    tp = sum(v["tp"] for v in table.values())
    fn = sum(v["fn"] for v in table.values())
    fp = sum(v["fp"] for v in table.values())
    assert tp + fn == sum(len(o.scenario.expected) for o in outcomes)
    assert tp / (tp + fn) == 1.0 and tp / (tp + fp) == 1.0, suite.markdown(outcomes)


# One scenario per family that reads telemetry (non-finite values, gradients through time, gates, truncation) and a
# healthy control; the whole suite is compared by `python tests/failure_suite.py --compare-sampled 4` (docs/doctor.md).
SAMPLED = ("nan_input", "exploding", "gate_saturation", "truncation_too_short", "healthy_forecast")


@pytest.mark.parametrize("name", SAMPLED)
def test_a_sampled_history_gets_the_findings_of_a_full_one(name):
    full = outcome(name)
    scenario = next(s for s in suite.SCENARIOS if s.name == name)
    with suite.sampled(4):
        part = suite.run(scenario, seed=0)
    steps = part.history["steps"]
    assert part.history["sampling"] == {"instrument_every": 4}
    assert sum(s["instrumented"] for s in steps) < len(steps) / 2  # most steps ran natively
    assert suite.findings_key(part.findings) == suite.findings_key(full.findings)
    for a, b in zip(part.findings, full.findings):
        if a.code == "non_finite":
            assert a.evidence["data_fault"] == b.evidence["data_fault"]


def _finding(name, code) -> doctor.Finding:
    return next(f for f in outcome(name).findings if f.code == code)


def test_unscaled_inputs_names_the_offending_features():
    f = _finding("unscaled_inputs", "unscaled_inputs")
    # The scenario multiplies features 1 and 2 by 300 and 20000 (feature 0 stays standardised).
    assert set(f.evidence["too_large"]) == {"feature 1", "feature 2"}
    assert f.evidence["too_large"]["feature 2"]["rms"] > f.evidence["too_large"]["feature 1"]["rms"] > 100
    # 20000 / 1 exceeds the spread threshold, so the standardised feature is reported as drowned out.
    assert list(f.evidence["too_small"]) == ["feature 0"]
    assert "feature 2" in f.message


def test_non_finite_points_at_the_corrupted_input():
    f = _finding("nan_input", "non_finite")
    loc = f.evidence["first_location"]
    # The NaN was written into batch row 3, timestep 7, of the batch of step 40.
    assert (loc["stage"], loc["tensor"], loc["layer"], loc["timestep"]) == ("forward", "input", 0, 7)
    assert f.evidence["first_step"] == 40
    assert "NaN" in f.remedy


def test_nan_targets_blame_the_loss_not_the_network():
    f = _finding("nan_from_start", "initial_loss_nonfinite")
    assert f.evidence.get("target_features") == ["target 0"]
    assert "Mask missing targets" in f.remedy


def test_exploding_remedy_derives_the_clip_value_from_the_healthy_norms():
    """The clip value comes from the steps before the gradients grew (norm below 10× that of the first steps),
    not from the exploded ones: clipping at the median of a blown-up run would clip nothing."""
    o = outcome("exploding")
    norms = np.array([s["grad_norm"] for s in o.history["steps"] if _finite(s["grad_norm"])])
    grown = np.flatnonzero(norms > 10 * np.median(norms[:3]))
    healthy = float(np.median(norms[: max(3, grown[0])]))
    for code in ("exploding_gradients", "loss_diverging"):
        f = next(f for f in o.findings if f.code == code)
        clip = float(f.remedy.split("max_norm=")[1].split(")")[0])
        assert 2 * healthy <= clip <= 10 * healthy, (code, clip, healthy)


def _finite(value) -> bool:
    return value is not None and not isinstance(value, str) and math.isfinite(value)


def test_vanishing_remedy_offers_chrono_for_the_sequence_length():
    f = _finding("vanishing", "vanishing_gradients")
    assert f.evidence["timesteps"] == 60
    assert "chrono_(lstm, max_timescale=60)" in f.remedy
    assert f.evidence["start_over_end"] < doctor.DEFAULT_THRESHOLDS.vanish_ratio


def test_truncation_suggests_a_longer_window_that_covers_the_dependency():
    # (scenario, k2 used, the task's dependency length): the suggestion must reach past the dependency.
    for name, k2, dependency in (("truncation_too_short", 8, 20), ("truncation_too_short_learned", 4, 6)):
        f = _finding(name, "truncation_too_short")
        assert f.evidence["k2"] == k2
        assert f.evidence["suggested_k2"] > dependency


def test_truncation_sources_are_independent():
    """The residual probe catches a dependency the network never learned; the gradient profile catches memory the
    network uses beyond the window (with the probe off)."""
    assert "trainer" in _finding("truncation_too_short", "truncation_too_short").evidence
    learned = _finding("truncation_too_short_learned", "truncation_too_short").evidence
    assert "trainer" not in learned
    assert learned["gradient_profile"]["gradient_share_beyond_window"] > doctor.DEFAULT_THRESHOLDS.truncation_bias


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_gradient_share_estimate_matches_a_geometric_accumulation(rho):
    """A loss at every step and a recurrence that keeps a fraction rho of the gradient per step give the profile
    ‖∂L/∂h_(K-1-k)‖ = Σ_(j<=k) rho^j; the share beyond the window is rho^K."""
    window = 16
    lags = np.arange(window)
    profile = np.cumsum(rho**lags)[::-1]  # time order: the window start first
    share, _ = truncated_gradient_share(profile, window)
    assert share == pytest.approx(rho**window, abs=0.02 + 0.3 * rho**window)


def test_train_val_divergence_reports_the_best_epoch():
    f = _finding("train_val_divergence", "train_val_divergence")
    history = outcome("train_val_divergence").history
    val = [e["val_loss"] for e in history["evals"]]
    best = int(np.argmin(val))
    assert f.evidence["best_step"] == history["evals"][best]["step"]
    assert f.evidence["recent_val_loss"] > f.evidence["best_val_loss"] * (1 + doctor.DEFAULT_THRESHOLDS.divergence_rise)


def test_subset_disparity_names_the_neglected_subset():
    f = _finding("subset_disparity", "subset_disparity")
    assert f.evidence["worst_subset"] == "regime-B"
    assert f.evidence["worst_over_median_of_others"] >= doctor.DEFAULT_THRESHOLDS.subset_ratio


def _subset_history(subset_losses_per_eval: list) -> dict:
    evals = [
        {"step": 10 * i, "epoch": i, "val_loss": float(np.mean(list(s.values()))), "subset_losses": s}
        for i, s in enumerate(subset_losses_per_eval)
    ]
    return {"format": "fastlstm.history/1", "evals": evals}


@pytest.mark.parametrize(
    "subsets",
    [{"calm": -1.10, "stormy": -1.00}, {"calm": -0.5, "stormy": 3.0}, {"a": 0.0, "b": 0.0}],
    ids=["negative-nll", "one-negative", "all-zero"],
)
def test_subset_disparity_needs_losses_with_a_zero(subsets):
    # A ratio of losses means nothing for a loss that can go negative, and two perfect subsets differ by nothing.
    history = _subset_history([subsets] * 3)
    assert not [f for f in doctor.diagnose(history) if f.code == "subset_disparity"]


def test_subset_disparity_with_a_perfect_subset_at_the_first_evaluation():
    history = _subset_history([{"a": 0.0, "b": 0.5}, {"a": 0.1, "b": 0.5}])
    (f,) = [f for f in doctor.diagnose(history) if f.code == "subset_disparity"]
    assert f.evidence["worst_subset"] == "b"
    assert f.evidence["worst_over_median_of_others"] == pytest.approx(0.5 / 0.1)
    assert f.evidence["ratio_at_first_eval"] == math.inf  # a perfect reference: any loss is infinitely worse


def test_symptoms_point_at_their_cause():
    f = _finding("unscaled_inputs", "gate_saturation")
    assert f.caused_by[0] == "unscaled_inputs" and f.evidence["likely_caused_by"][0] == "unscaled_inputs"
    findings = outcome("unscaled_inputs").findings
    assert findings[0].code == "unscaled_inputs" and not findings[0].caused_by
    assert all(f.caused_by for f in findings[1:] if f.severity != "info")


# ---------------------------------------------------------------------------------------------------------------
# Inputs: History objects, dicts, JSON files with special floats
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded():
    """A short real run recorded by fastlstm.Monitor: (History, its dict)."""
    with one_cpu_thread():
        return _record_short_run()


def _record_short_run():
    torch.manual_seed(0)
    model = suite.Net(3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = fastlstm.Monitor(model, optimizer=opt, every=5)
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        x, y = suite.sines(gen, 8, 16)
        x = x * torch.tensor([1.0, 1.0, 50.0])  # one unscaled feature
        pred, _ = model(x)
        loss = (pred - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss=loss.detach(), targets=y)
    history = monitor.history
    return history, history.to_dict()


def test_accepts_history_object_dict_and_path(recorded, tmp_path):
    history, as_dict = recorded
    path = tmp_path / "run.json"
    history.save(path)
    results = [doctor.dumps(doctor.diagnose(h)) for h in (history, as_dict, str(path), path)]
    assert all(r == results[0] for r in results)
    assert any(f.code == "unscaled_inputs" for f in doctor.diagnose(history))


def test_special_floats_survive_the_json_round_trip(tmp_path):
    history = {
        "format": "fastlstm.history/1",
        "steps": [{"step": i, "loss": 1.0, "lr": 0.01, "grad_norm": 1.0, "skipped": False} for i in range(20)],
    }
    history["steps"][5].update(loss=math.nan, grad_norm=math.inf, skipped=True)
    path = tmp_path / "h.json"
    write_json(path, history)
    text = path.read_text()
    assert '"nan"' in text and '"inf"' in text
    loaded = fastlstm.History.load(path)
    assert math.isnan(loaded.steps[5]["loss"])
    direct, reloaded = doctor.diagnose(history), doctor.diagnose(loaded)
    assert [f.to_dict() for f in direct] == [f.to_dict() for f in reloaded]
    f = next(f for f in direct if f.code == "non_finite")
    assert f.evidence["first_step"] == 5 and f.evidence["skipped_steps"] == 1


def test_null_means_unmeasured_not_nan():
    steps = [{"step": i, "loss": 1.0 / (i + 1), "lr": None, "grad_norm": None} for i in range(20)]
    findings = doctor.diagnose({"format": "fastlstm.history/1", "steps": steps})
    assert not any(f.code == "non_finite" for f in findings)


def test_empty_history_only_says_what_is_missing():
    findings = doctor.diagnose({"format": "fastlstm.history/1"})
    assert [f.code for f in findings] == ["history_incomplete"]
    assert findings[0].severity == "info"
    assert set(findings[0].evidence["skipped"]) == {"steps", "telemetry", "inputs", "targets", "evals"}


def test_unknown_keys_are_ignored(recorded):
    _, as_dict = recorded
    extended = json.loads(json.dumps(as_dict))
    extended["something_new"] = [{"step": 1, "x": 2}]
    extended["steps"][0]["new_field"] = "ignored"
    assert doctor.dumps(doctor.diagnose(extended)) == doctor.dumps(doctor.diagnose(as_dict))


# ---------------------------------------------------------------------------------------------------------------
# Thresholds: each rule fires on its documented side of its threshold
# ---------------------------------------------------------------------------------------------------------------


def _inputs_history(rms_values):
    """A history whose only content is input statistics with the given per-feature RMS (mean 0)."""
    return {
        "format": "fastlstm.history/1",
        "inputs": [
            {
                "step": 0,
                "lstm": "lstm",
                "count": 100,
                "mean": [0.0] * len(rms_values),
                "std": list(rms_values),
                "min": [-3 * r for r in rms_values],
                "max": [3 * r for r in rms_values],
            },
        ],
    }


def test_unscaled_inputs_threshold_is_the_documented_one():
    limit = doctor.DEFAULT_THRESHOLDS.feature_rms_max
    below = doctor.diagnose(_inputs_history([1.0, limit * 0.99]))
    above = doctor.diagnose(_inputs_history([1.0, limit * 1.01]))
    assert not any(f.code == "unscaled_inputs" for f in below)
    assert any(f.code == "unscaled_inputs" for f in above)
    relaxed = doctor.Thresholds(feature_rms_max=limit * 2)
    assert not any(f.code == "unscaled_inputs" for f in doctor.diagnose(_inputs_history([1.0, limit * 1.01]), relaxed))


def test_feature_spread_flags_features_too_small_to_matter():
    spread = doctor.DEFAULT_THRESHOLDS.feature_spread_max
    f = next(f for f in doctor.diagnose(_inputs_history([1.0, 0.5 / spread])) if f.code == "unscaled_inputs")
    assert list(f.evidence["too_small"]) == ["feature 1"] and not f.evidence["too_large"]


def _loss_history(losses, lr=0.01):
    steps = [{"step": i, "loss": float(v), "lr": lr, "grad_norm": 1.0, "skipped": False} for i, v in enumerate(losses)]
    return {"format": "fastlstm.history/1", "steps": steps}


def test_loss_stagnant_compares_the_fall_with_its_noise():
    rng = np.random.default_rng(0)
    flat = 1.0 + 0.05 * rng.standard_normal(100)
    falling = np.linspace(1.0, 0.3, 100) + 0.05 * rng.standard_normal(100)
    assert any(f.code == "loss_stagnant" for f in doctor.diagnose(_loss_history(flat)))
    assert not any(f.code == "loss_stagnant" for f in doctor.diagnose(_loss_history(falling)))
    zero_lr = next(f for f in doctor.diagnose(_loss_history(flat, lr=0.0)) if f.code == "loss_stagnant")
    assert "learning rate is 0" in zero_lr.remedy


def test_loss_zero_is_relative_to_the_initial_loss():
    ratio = doctor.DEFAULT_THRESHOLDS.zero_relative
    tiny = np.r_[np.ones(10), np.full(40, ratio * 0.5)]
    small = np.r_[np.ones(10), np.full(40, ratio * 50)]
    assert any(f.code == "loss_zero" for f in doctor.diagnose(_loss_history(tiny)))
    assert not any(f.code == "loss_zero" for f in doctor.diagnose(_loss_history(small)))


def _evals_history(val, train=None):
    train = np.linspace(1.0, 0.1, 10 * len(val)) if train is None else train
    history = _loss_history(train)
    history["evals"] = [{"step": 10 * (i + 1) - 1, "epoch": i + 1, "val_loss": float(v)} for i, v in enumerate(val)]
    return history


def test_divergence_needs_a_rising_trend_after_the_best_epoch():
    rising = [1.0, 0.6, 0.5, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    noisy_flat = [1.0, 0.6, 0.5, 0.45, 0.47, 0.44, 0.46, 0.45, 0.46]
    f = next(f for f in doctor.diagnose(_evals_history(rising)) if f.code == "train_val_divergence")
    assert f.evidence["best_epoch"] == 4
    assert not any(f.code == "train_val_divergence" for f in doctor.diagnose(_evals_history(noisy_flat)))


def test_oscillation_needs_reversals_and_large_rises():
    zigzag = [1.0, 0.5] + [0.3, 0.45] * 5
    gentle = [1.0, 0.5] + [0.30, 0.31] * 5
    monotone = list(np.linspace(1.0, 0.2, 12))
    assert any(f.code == "val_oscillation" for f in doctor.diagnose(_evals_history(zigzag)))
    assert not any(f.code == "val_oscillation" for f in doctor.diagnose(_evals_history(gentle)))
    assert not any(f.code == "val_oscillation" for f in doctor.diagnose(_evals_history(monotone)))


def _targets_history(mean, std, initial_loss):
    history = _loss_history(np.linspace(initial_loss, initial_loss / 10, 40))
    history["targets"] = [
        {"step": 39, "count": 500, "mean": [mean], "std": [std], "min": [mean - 3 * std], "max": [mean + 3 * std]}
    ]
    return history


def test_unscaled_targets_by_magnitude_or_by_an_offset_the_model_starts_far_from():
    th = doctor.DEFAULT_THRESHOLDS
    codes = lambda h: {f.code for f in doctor.diagnose(h)}
    # A small target (magnitude 5) offset by 4.8 std, where the initial loss is ~10× worse than predicting its mean.
    offset_far = _targets_history(4.8, 1.0, initial_loss=(th.initial_vs_constant + 1) * 1.0)
    offset_near = _targets_history(4.8, 1.0, initial_loss=(th.initial_vs_constant - 1) * 1.0)
    large = _targets_history(0.0, th.feature_rms_max * 2, initial_loss=1.0)
    assert "unscaled_targets" in codes(offset_far)
    assert "unscaled_targets" not in codes(offset_near)
    assert "unscaled_targets" in codes(large)
    f = next(f for f in doctor.diagnose(offset_far) if f.code == "unscaled_targets")
    assert f.evidence["initial_over_constant"] > th.initial_vs_constant


def test_constant_target_uses_the_recorded_range():
    history = {
        "format": "fastlstm.history/1",
        "targets": [{"step": 4, "count": 50, "mean": [2.5, 0.1], "std": [0.0, 1.0], "min": [2.5, -2], "max": [2.5, 2]}],
    }
    f = next(f for f in doctor.diagnose(history) if f.code == "constant_target")
    assert f.severity == "warning" and f.evidence["constant_targets"] == {"target 0": 2.5}
    history["targets"][0].update(std=[0.0, 0.0], min=[2.5, 0.1], max=[2.5, 0.1])
    assert next(f for f in doctor.diagnose(history) if f.code == "constant_target").severity == "error"


# ---------------------------------------------------------------------------------------------------------------
# Output: JSON form and text report
# ---------------------------------------------------------------------------------------------------------------

FINDING_KEYS = {"code", "severity", "message", "evidence", "remedy", "caused_by"}


def test_json_form_is_stable_and_round_trips():
    findings = outcome("unscaled_inputs").findings
    text = doctor.dumps(findings, source="run.json")
    data = json.loads(text)
    assert set(data) == {"format", "source", "counts", "findings"}
    assert data["format"] == doctor.FINDINGS_FORMAT
    assert data["counts"] == {s: sum(f.severity == s for f in findings) for s in doctor.SEVERITIES}
    assert all(set(item) == FINDING_KEYS for item in data["findings"])
    assert [doctor.Finding.from_dict(item) for item in data["findings"]] == [
        doctor.Finding.from_dict(f.to_dict()) for f in findings
    ]
    assert doctor.dumps([doctor.Finding.from_dict(i) for i in data["findings"]], source="run.json") == text


def test_findings_are_grouped_by_root_cause_and_use_the_vocabulary():
    """Each root cause is followed by the findings it explains; groups are ordered by their worst severity."""
    for o in (outcome("exploding"), outcome("nan_from_start"), outcome("unscaled_inputs")):
        groups = []
        for f in o.findings:
            if not f.caused_by:
                groups.append([f])
            else:
                assert groups and f.caused_by[0] in {g.code for g in groups[-1]}, (f.code, f.caused_by)
                groups[-1].append(f)
        worst = [max(doctor.SEVERITIES.index(f.severity) for f in g) for g in groups]
        assert worst == sorted(worst, reverse=True)
        assert all(f.code in doctor.CODES for f in o.findings)


def test_report_lists_every_finding_with_evidence_and_remedy():
    findings = outcome("exploding").findings
    report = doctor.format_report(findings, title="t")
    assert report.splitlines()[0].startswith("t: ")
    for f in findings:
        assert f"[{f.severity.upper()}] {f.code}" in report
        if f.caused_by:  # a consequence is printed under its cause, saying so
            assert f"[{f.severity.upper()}] {f.code}: a consequence of {f.caused_by[0]}" in report
    assert report.count("evidence:") == report.count("remedy:") == len(findings)
    assert any(f.caused_by for f in findings)
    assert "no findings" in doctor.format_report([])


def test_finding_rejects_unknown_severity():
    with pytest.raises(ValueError):
        doctor.Finding("x", "fatal", "m", {}, "r")


# ---------------------------------------------------------------------------------------------------------------
# Plots and TensorBoard
# ---------------------------------------------------------------------------------------------------------------


def test_plots_written_for_a_real_history(tmp_path):
    pytest.importorskip("matplotlib")
    from fastlstm import plots

    o = outcome("healthy_two_layer_recall")
    paths = plots.plot_all(o.history, o.findings, str(tmp_path))
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == ["gate_saturation.png", "gradient_vs_lag.png", "input_scales.png", "losses.png"]
    for p in paths:
        with open(p, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_skip_what_the_history_lacks(tmp_path):
    pytest.importorskip("matplotlib")
    from fastlstm import plots

    history = _loss_history(np.linspace(1, 0.1, 20))
    assert [p.split("/")[-1] for p in plots.plot_all(history, [], str(tmp_path))] == ["losses.png"]


def test_loss_plot_marks_the_steps_findings_cite():
    from fastlstm import plots

    findings = outcome("nan_input").findings
    marks = plots._finding_marks(findings)
    assert (40, "non_finite (error)", "tab:red") in marks


class FakeWriter:
    def __init__(self):
        self.scalars, self.histograms, self.texts = [], [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def add_histogram(self, tag, values, step):
        self.histograms.append((tag, np.asarray(values), step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_tensorboard_logs_history_scalars_and_histograms(recorded):
    from fastlstm.tensorboard import TelemetryLogger

    history, as_dict = recorded
    writer = FakeWriter()
    TelemetryLogger(writer).log_history(history)
    tags = {t for t, _, _ in writer.scalars}
    assert {"fastlstm/train/loss", "fastlstm/train/lr", "fastlstm/lstm/layer0/saturation/f"} <= tags
    losses = [(s, v) for t, v, s in writer.scalars if t == "fastlstm/train/loss"]
    assert losses == [(e["step"], e["loss"]) for e in as_dict["steps"]]
    view = HistoryView(as_dict)
    hist = [(s, v) for t, v, s in writer.histograms if t == "fastlstm/lstm/layer0/grad_norm_per_step"]
    assert len(hist) == len(view.telemetry["lstm"])
    np.testing.assert_allclose(hist[0][1], view.telemetry["lstm"][0].layers[0].grad_norm_per_step)


def test_tensorboard_attaches_to_a_monitor_and_logs_findings():
    from fastlstm.tensorboard import TelemetryLogger

    model = suite.Net(3)
    monitor = fastlstm.Monitor(model, every=2)
    writer = FakeWriter()
    logger = TelemetryLogger(writer, prefix="run")
    logger.attach(monitor)
    for _ in range(4):
        pred, _ = model(torch.randn(4, 10, 3))
        pred.pow(2).mean().backward()
        monitor.step(loss=torch.tensor(1.0))
    steps = sorted({s for t, _, s in writer.scalars if t == "run/lstm/layer0/forget_gate_mean"})
    assert steps == [1, 3]
    logger.log_findings(doctor.diagnose(monitor.history), step=3)
    assert writer.texts and writer.texts[-1][0] == "run/doctor"
    with pytest.raises(TypeError):
        TelemetryLogger(object())


def test_thresholds_are_a_frozen_dataclass_with_documented_fields():
    names = {f.name for f in dataclasses.fields(doctor.Thresholds)}
    with open(_docs_path(), encoding="utf-8") as handle:
        text = handle.read()
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"thresholds not documented in docs/doctor.md: {missing}"
    codes_missing = [c for c in doctor.CODES if f"`{c}`" not in text]
    assert not codes_missing, f"codes not documented in docs/doctor.md: {codes_missing}"


def _docs_path():
    import os

    return os.path.join(os.path.dirname(__file__), "..", "docs", "doctor.md")


@pytest.mark.parametrize(
    "x, digits, text",
    [
        (99.5, 3, "99.5"),
        (99.5, 2, "100"),
        (5.0, 3, "5"),
        (0.0123, 3, "0.0123"),
        (2e7, 3, "2e+07"),
        (float("nan"), 3, "nan"),
    ],
)
def test_numbers_in_findings_are_written_without_exponents_where_prose_needs_none(x, digits, text):
    from fastlstm.doctor.findings import format_number

    assert format_number(x, digits) == text


def test_thresholds_given_as_a_dict_are_refused_with_how_to_give_them():
    with pytest.raises(TypeError, match=r"dataclasses.replace\(DEFAULT_THRESHOLDS"):
        fastlstm.diagnose({"steps": []}, {"min_steps": 3})
