"""The `fastlstm` command: the demo's acceptance (unscaled run names the scaling problem and its features, scaled
run finds nothing above info), `doctor` text / JSON output and its round trip through History.load, and the
pass-through subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import failure_suite as suite
import pytest
import torch

import fastlstm
from fastlstm import cli, doctor
from fastlstm.data import chronological_split, load_macrodata


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo exactly as `fastlstm demo` runs it (default configuration), once for the module."""
    out = tmp_path_factory.mktemp("demo")
    log = os.path.join(out, "log.txt")
    argv = ["demo", "--out", str(out)]
    with open(log, "w", encoding="utf-8") as handle:
        saved, sys.stdout = sys.stdout, handle
        try:
            code = cli.main(argv)
        finally:
            sys.stdout = saved
    with open(log, encoding="utf-8") as handle:
        return code, str(out), handle.read()


def _findings(folder):
    with open(os.path.join(folder, "findings.json"), encoding="utf-8") as handle:
        return [doctor.Finding.from_dict(f) for f in json.load(handle)["findings"]]


def test_demo_unscaled_run_names_the_scaling_problem_and_features(demo_run):
    code, out, log = demo_run
    assert code == 0
    findings = _findings(os.path.join(out, "unscaled"))
    scaling = [f for f in findings if f.code == "unscaled_inputs"]
    assert scaling and scaling[0].severity == "warning"
    # The offending features are the macro series measured in billions of dollars, index points and millions,
    # which the test reads from the dataset itself: every column whose magnitude exceeds the threshold.
    data = load_macrodata()
    rms = (data.values[:-1] ** 2).mean(axis=0) ** 0.5
    large = {name for name, r in zip(data.columns, rms) if r > 3 * doctor.DEFAULT_THRESHOLDS.feature_rms_max}
    assert large and large <= set(scaling[0].evidence["too_large"])
    assert "realgdp" in scaling[0].message
    assert "unscaled_inputs" in log and "realgdp" in log


def test_demo_scaled_run_finds_nothing_above_info(demo_run):
    _, out, log = demo_run
    findings = _findings(os.path.join(out, "scaled"))
    assert all(f.severity == "info" for f in findings), [(f.code, f.severity, f.message) for f in findings]
    assert "doctor, scaled run" in log


def test_demo_writes_progress_histories_and_plots(demo_run):
    _, out, log = demo_run
    assert "50/50 epochs" in log and "[###" in log
    for run in ("unscaled", "scaled"):
        history = fastlstm.History.load(os.path.join(out, run, "history.json"))
        assert len(history.steps) > 100 and history.evals and history.telemetry
        if _has_matplotlib():
            for name in ("losses.png", "gradient_vs_lag.png", "gate_saturation.png", "input_scales.png"):
                assert os.path.getsize(os.path.join(out, run, name)) > 1000


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_doctor_json_matches_the_demo_findings_and_round_trips(demo_run, capsys):
    _, out, _ = demo_run
    path = os.path.join(out, "unscaled", "history.json")
    assert cli.main(["doctor", path, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == doctor.FINDINGS_FORMAT and printed["source"] == path
    with open(os.path.join(out, "unscaled", "findings.json"), encoding="utf-8") as handle:
        assert printed["findings"] == json.load(handle)["findings"]
    # The history the CLI read round-trips through History.load / save with the same diagnosis.
    history = fastlstm.History.load(path)
    again = os.path.join(out, "resaved.json")
    history.save(again)
    assert doctor.findings_to_json(doctor.diagnose(fastlstm.History.load(again)))["findings"] == printed["findings"]


@pytest.fixture(scope="module")
def unscaled_history(tmp_path_factory):
    scenario = next(s for s in suite.SCENARIOS if s.name == "unscaled_inputs")
    history = suite.train(scenario.setup(), 0)
    path = tmp_path_factory.mktemp("h") / "history.json"
    fastlstm.History.from_dict(history).save(path)
    return str(path)


def test_doctor_text_report(unscaled_history, capsys):
    assert cli.main(["doctor", unscaled_history]) == 0
    text = capsys.readouterr().out
    expected = doctor.format_report(doctor.diagnose(unscaled_history))
    assert text.strip() == expected.strip()
    assert "[WARNING] unscaled_inputs" in text and "remedy:" in text


def test_doctor_fail_on(unscaled_history, capsys):
    assert cli.main(["doctor", unscaled_history, "--fail-on", "warning"]) == cli.EXIT_FINDINGS
    assert cli.main(["doctor", unscaled_history, "--fail-on", "error"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "content",
    [
        None,
        b"{not json",
        b"[1, 2]",
        b"null",
        b"\xff\xfe",
        b'{"format": "fastlstm.findings/1", "findings": []}',
        b'{"steps": [1, 2]}',
        b'{"steps": [{"loss": "x"}]}',
        b'{"inputs": [{"lstm": "a", "count": 5, "mean": [1, 2], "std": [1]}]}',
    ],
)
def test_doctor_unreadable_file(tmp_path, capsys, content):
    # Anything that is not a saved history exits EXIT_UNAVAILABLE with a message, never EXIT_FINDINGS (what
    # --fail-on returns for a finding) or a traceback: the doctor's own --json output included.
    path = tmp_path / "history.json"
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["doctor", str(path)]) == cli.EXIT_UNAVAILABLE
    assert "cannot read" in capsys.readouterr().err


def test_doctor_does_not_follow_a_json_string_as_a_path(tmp_path, unscaled_history, capsys):
    pointer = tmp_path / "pointer.json"
    pointer.write_text(json.dumps(unscaled_history))  # a file whose JSON names another, real history
    assert cli.main(["doctor", str(pointer)]) == cli.EXIT_UNAVAILABLE
    assert f"cannot read {pointer}" in capsys.readouterr().err


def test_demo_refuses_a_run_of_no_epochs(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", "--epochs", "0"])
    assert exited.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_module_entry_point_runs(unscaled_history):
    result = subprocess.run(
        [sys.executable, "-m", "fastlstm.cli", "doctor", unscaled_history, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout)["counts"]["warning"] >= 1


def test_passthrough_subcommands_call_main_with_their_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("fastlstm.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fastlstm.bench", fake)
    assert cli.main(["bench", "--quick", "-k", "fwd"]) == 0
    assert seen["argv"] == ["--quick", "-k", "fwd"]


@pytest.mark.parametrize("command, module", sorted(cli.PASSTHROUGH.items()))
def test_missing_passthrough_module_gives_a_clear_message(command, module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if it were not installed
    assert cli.main([command]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert module in err and "not part of this installation" in err


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_embedded_dataset():
    data = load_macrodata()
    assert data.values.shape == (203, 12)
    assert data.index[0] == "1959Q1" and data.index[-1] == "2009Q3"
    assert {"realgdp", "unemp", "infl"} <= set(data.columns)
    assert torch.isfinite(torch.as_tensor(data.values)).all()


def test_chronological_split_never_leaves_a_side_empty():
    """The validation rows are the last share of time; a split that would leave no training or no validation row
    is refused (fitting the standardiser on no rows gave NaN everywhere)."""
    train, val = chronological_split(10, 0.2)
    assert (train, val) == (slice(0, 8), slice(8, 10))
    for length, fraction, side in ((3, 0.1, "validation"), (1, 0.5, "training")):
        with pytest.raises(ValueError, match=f"no {side} rows"):
            chronological_split(length, fraction)
