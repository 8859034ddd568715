"""Argument types and checks the `fastlstm` commands share (cli.py's demo, bench/runner.py, bench/gpu_check.py): a
bad command line exits 2 with a message before any work runs, not with a traceback after it. `check_counts` is the
same rule for the counts the trainer's and the Monitor's constructors take."""

from __future__ import annotations

import argparse
import numbers
import os


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def output_folder_usable(path: str) -> bool:
    """Whether `path` can be an output folder: a folder, or not there yet under folders (not a file)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent
    return os.path.isdir(path)


def check_counts(minimum: int = 1, **counts) -> None:
    """Each given count (None: not given) is an int >= minimum: a float or a string would be truncated or fail
    later with a riddle, a zero or negative interval would silently mean something else."""
    for name, value in counts.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
