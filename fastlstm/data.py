"""The datasets embedded in the package, and the two preparations a forecaster needs: a split and a scaler.

`load_macrodata()` reads `fastlstm/datasets/macrodata.csv`: US macroeconomic data 1959Q1-2009Q3, public domain,
from FRED (Federal Reserve Bank of St. Louis) and the Bureau of Labor Statistics, as shipped by statsmodels. Source,
licence and column meanings are in `fastlstm/datasets/README.md`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from importlib import resources

import numpy as np

MACRODATA_FILE = "macrodata.csv"
# The calendar columns index the rows; every other column is a feature.
_CALENDAR = ("year", "quarter")


@dataclasses.dataclass(frozen=True)
class TimeSeries:
    """A multivariate series: `values[t, j]` is feature `columns[j]` at time `index[t]`."""

    values: np.ndarray  # float64 [T, F]
    columns: tuple
    index: tuple  # one label per row, e.g. "1959Q1"

    def __len__(self) -> int:
        return self.values.shape[0]

    def select(self, columns) -> TimeSeries:
        """The same rows with only `columns`, in the given order."""
        positions = [self.columns.index(name) for name in columns]
        return TimeSeries(self.values[:, positions], tuple(columns), self.index)


def read_dataset_text(name: str) -> str:
    """The text of a file shipped in fastlstm/datasets (works from a wheel, a zip or an editable install)."""
    return resources.files("fastlstm").joinpath("datasets", name).read_text(encoding="utf-8")


def load_macrodata() -> TimeSeries:
    """The 203 quarters x 12 series of US macroeconomic data, unscaled (see the module docstring)."""
    rows = list(csv.reader(io.StringIO(read_dataset_text(MACRODATA_FILE))))
    header, body = rows[0], [r for r in rows[1:] if r]
    features = [j for j, name in enumerate(header) if name not in _CALENDAR]
    year, quarter = header.index("year"), header.index("quarter")
    values = np.array([[float(r[j]) for j in features] for r in body], dtype=np.float64)
    index = tuple(f"{int(float(r[year]))}Q{int(float(r[quarter]))}" for r in body)
    return TimeSeries(values, tuple(header[j] for j in features), index)


def chronological_split(length: int, val_fraction: float) -> tuple:
    """(train rows, validation rows) as slices: the validation set is the last `val_fraction` of time, so a
    forecaster is validated on the future it never saw."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = round(length * (1.0 - val_fraction))
    if not 0 < cut < length:
        raise ValueError(
            f"val_fraction {val_fraction} of {length} rows leaves no {'training' if cut <= 0 else 'validation'} rows"
        )
    return slice(0, cut), slice(cut, length)


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """Per-feature (x - mean) / std with statistics fitted on the training rows only (fitting on all rows would
    leak the validation period's level into training)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Standardizer:
        std = values.std(axis=0)
        # A constant feature carries no information; dividing by 1 keeps it finite instead of producing NaN.
        return cls(values.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean
