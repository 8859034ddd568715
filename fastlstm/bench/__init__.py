"""`fastlstm bench`: the benchmark runner (runner.py) with its grid (cases.py), implementations (providers.py),
timing (timing.py) and report (report.py); `fastlstm bench --gpu-check` is gpu_check.py (with gpu_plan.py,
gpu_worker.py, gpu_supervisor.py and gpu_report.py)."""

from .providers import problem_seed
from .runner import main, run
from .timing import cpu_threads

__all__ = ["cpu_threads", "main", "problem_seed", "run"]
