"""The doctor's rules, one module per family. Importing this package registers every rule (registry.py).

`FAMILY_ORDER` is the report order: the families in this order, each module's rules in the order it defines them.
That order also decides which of several causes a consequence is reported under (causes.py), so families whose
findings are root causes (bad values, bad data) come before those whose findings are usually their symptoms.
"""

from . import data, gates, gradients, history, loss, nonfinite, stagnation, truncation, validation  # noqa: F401

FAMILY_ORDER = ("nonfinite", "data", "loss", "gradients", "gates", "truncation", "stagnation", "validation", "history")
