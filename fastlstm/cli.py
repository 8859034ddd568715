"""The `fastlstm` command: `demo`, `doctor PATH [--json]`, `aot`, `bench`.

Only argument parsing and dispatch live here; each subcommand's work is in its own module, imported when the
subcommand runs so that `fastlstm doctor` does not pay for what `demo` needs (and `aot`/`bench` can be absent).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .arguments import output_folder_usable, positive_int

EXIT_FINDINGS = 1  # `doctor --fail-on`: a finding at or above the given severity
EXIT_UNAVAILABLE = 2  # a subcommand whose module is not installed, an unreadable history, an unusable --out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # aot and bench own their arguments: pass everything after the subcommand through untouched.
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    return args.run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlstm", description="fastlstm: a drop-in torch.nn.LSTM with telemetry.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,doctor,aot,bench}")

    demo = sub.add_parser("demo", help="train a forecaster on the embedded dataset, unscaled then scaled, and diagnose")
    demo.add_argument("--out", default="fastlstm-demo", help="folder for histories, findings and plots")
    demo.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default 50)")
    demo.add_argument("--no-plots", action="store_true", help="skip the plots (they need matplotlib)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_run_demo)

    doctor = sub.add_parser("doctor", help="diagnose a saved training history (JSON, docs/history.md)")
    doctor.add_argument(
        "path", help="a History saved as JSON (History.save: Monitor, TBPTTTrainer, the Lightning DoctorCallback)"
    )
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON (format fastlstm.findings/1)")
    doctor.add_argument(
        "--fail-on",
        choices=("info", "warning", "error"),
        default=None,
        help=f"exit with status {EXIT_FINDINGS} if a finding has at least this severity (for CI)",
    )
    doctor.set_defaults(run=_run_doctor)

    sub.add_parser(
        "aot", help="compile-check every kernel variant ahead of time (fastlstm.kernels.aot)", add_help=False
    )
    sub.add_parser("bench", help="run the benchmark suite (fastlstm.bench)", add_help=False)
    return parser


def _run_demo(args) -> int:
    import dataclasses

    from .demo import DemoConfig, run_demo

    if not output_folder_usable(args.out):
        print(f"fastlstm demo: --out {args.out} is a file, not a folder", file=sys.stderr)
        return EXIT_UNAVAILABLE
    config = DemoConfig(out=args.out, plots=not args.no_plots, seed=args.seed)
    if args.epochs is not None:
        config = dataclasses.replace(config, epochs=args.epochs)
    run_demo(config)
    return 0


def _run_doctor(args) -> int:
    import json

    from . import doctor
    from .history_view import as_history_dict
    from .jsonio import read_json

    def unreadable(why) -> int:
        print(f"fastlstm doctor: cannot read {args.path} as a fastlstm history: {why}", file=sys.stderr)
        return EXIT_UNAVAILABLE

    try:
        content = read_json(args.path)
        if not isinstance(content, dict):  # as_history_dict would take a JSON string for the path of another file
            return unreadable(f"its JSON is a {type(content).__name__}, not an object")
        history = as_history_dict(content)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        return unreadable(exc)
    try:
        findings = doctor.diagnose(history)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        # The doctor reads fields as docs/history.md defines them; a file of another shape fails on one of them
        # (a step that is not an object, a loss that is not a number), and a --fail-on run must not take that
        # for a finding.
        return unreadable(f"a field does not have docs/history.md's form ({type(exc).__name__}: {exc})")
    try:
        print(doctor.dumps(findings, source=args.path) if args.json else doctor.format_report(findings))
    except BrokenPipeError:  # `fastlstm doctor H | head`: the reader left, which is not an error of ours
        sys.stderr.close()
        return 0
    if args.fail_on is not None:
        floor = doctor.SEVERITIES.index(args.fail_on)
        if any(doctor.SEVERITIES.index(f.severity) >= floor for f in findings):
            return EXIT_FINDINGS
    return 0


# Subcommands implemented by modules other parts of the project provide; they may not be installed.
PASSTHROUGH = {"aot": "fastlstm.kernels.aot", "bench": "fastlstm.bench"}


def _passthrough(command: str, argv: list) -> int:
    module_name = PASSTHROUGH[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        absent = exc.name is not None and (exc.name == module_name or module_name.startswith(exc.name + "."))
        reason = "is not part of this installation" if absent else f"needs the missing package {exc.name!r}"
        print(f"fastlstm {command}: {module_name} {reason} ({exc}).", file=sys.stderr)
        return EXIT_UNAVAILABLE
    result = module.main(argv)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
