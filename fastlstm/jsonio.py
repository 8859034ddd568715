"""JSON for histories, findings, telemetry and benchmark results: JSON has no NaN or infinity, so fastlstm writes
them as the strings "nan", "inf", "-inf" (docs/history.md), and files are replaced atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile

import numpy as np

HISTORY_FORMAT = "fastlstm.history/1"  # docs/history.md
NONFINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_json_safe(value):
    """A copy of `value` that json.dumps(allow_nan=False) accepts: non-finite floats become "nan"/"inf"/"-inf",
    numpy values become Python ones, tuples become lists, dict keys become strings."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


# Fields that hold names, never numbers: a module or a feature may be called "inf", and stays a string.
TEXT_FIELDS = frozenset({"format", "lstm", "kind", "feature_names", "target_names", "stage", "tensor", "reason"})


def from_json_safe(value):
    """The inverse of `to_json_safe` for values (dict keys, and the values of TEXT_FIELDS, are left alone)."""
    if isinstance(value, dict):
        return {k: v if k in TEXT_FIELDS else from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_safe(v) for v in value]
    if isinstance(value, str) and value in NONFINITE_STRINGS:
        return NONFINITE_STRINGS[value]
    return value


def to_float(value) -> float:
    """One number of these files as a float: None -> nan, "nan"/"inf"/"-inf" -> the special floats."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return NONFINITE_STRINGS[value] if value in NONFINITE_STRINGS else float(value)
    return float(value)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a torn one:
    a temporary file in the same directory, fsync, os.replace, then fsync of the directory entry."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every platform can open a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: str | os.PathLike, value, indent: int | None = 1) -> None:
    """`value` as strict JSON (special floats as strings), written atomically."""
    text = json.dumps(to_json_safe(value), indent=indent, allow_nan=False)
    atomic_write(path, (text + "\n").encode())


def read_json(path: str | os.PathLike):
    """A JSON file as written by `write_json`; special floats stay strings (see `from_json_safe`)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
