"""The doctor's rules, one module per family. Importing this package registers every rule (registry.py, which
also holds the families' report order, `FAMILY_ORDER`); the doctor package imports it."""

from . import data, gates, gradients, history, loss, nonfinite, stagnation, truncation, validation  # noqa: F401
