"""`fastlstm bench`: the benchmark runner (runner.py) with its grid (cases.py), implementations (providers.py),
timing (timing.py) and report (report.py)."""

from .runner import cpu_threads, main, problem_seed, run

__all__ = ["cpu_threads", "main", "problem_seed", "run"]
