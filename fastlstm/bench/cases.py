"""The benchmark grid: which problems `fastlstm bench` measures, and how long that should take.

A `Problem` is one LSTM configuration and dtype; a `Case` is a problem run in one mode (forward, forward+backward,
training step). The runner (fastlstm/bench/runner.py) checks correctness once per problem and provider, then times every
mode of it. Nothing here touches torch, so the grid can be listed and tested anywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

# dtype keys: "tf32" is float32 storage with TF32 tensor-core matmuls allowed (cuBLAS, cuDNN and the kernels alike).
DTYPES = ("fp32", "tf32", "bf16", "fp16")
MODES = ("forward", "forward_backward", "train_step")
MODE_TAGS = {"forward": "fwd", "forward_backward": "fwdbwd", "train_step": "train"}

# The sweep (GPU). Every hidden × batch × seq point runs as a single-layer, unidirectional, padded LSTM.
GPU_SWEEP = {"hidden": (128, 256, 512, 768, 1024, 2048), "batch": (1, 16, 64, 256), "seq": (128, 1024)}
# The options (layers=2, bidirectional, proj_size, packed) each run on these shapes rather than the whole sweep:
# crossing every option with every shape would multiply the grid by 16 without telling us much more.
GPU_VARIANT_SHAPES = {"hidden": (256, 1024), "batch": (16, 64), "seq": (128, 1024)}

# CPU runs are smoke runs of the same code paths (reference backend), at sizes that take milliseconds.
CPU_SWEEP = {"hidden": (16, 32), "batch": (1, 4), "seq": (8, 32)}
CPU_VARIANT_SHAPES = {"hidden": (32,), "batch": (4,), "seq": (32,)}
# tf32 is a CUDA matmul setting and nn.LSTM has no float16 CPU path worth timing, so the CPU grid runs fp32 and bf16.
CPU_DTYPES = ("fp32", "bf16")

VARIANTS = ("layers2", "bidirectional", "proj", "packed")


@dataclass(frozen=True)
class Problem:
    """One LSTM configuration. input_size defaults to hidden (an LSTM fed by a layer of its own width)."""

    hidden: int
    batch: int
    seq: int
    dtype: str = "fp32"
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    packed: bool = False
    input_size: int = 0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 0 <= self.proj_size < self.hidden:
            raise ValueError(f"proj_size must be in [0, hidden), got {self.proj_size}")

    @property
    def inputs(self) -> int:
        return self.input_size or self.hidden

    @property
    def variant(self) -> str:
        """ "base" for the plain sweep, else the options that differ from it, joined by "+"."""
        parts = []
        if self.layers != 1:
            parts.append(f"layers{self.layers}")
        if self.bidirectional:
            parts.append("bidirectional")
        if self.proj_size:
            parts.append("proj")
        if self.packed:
            parts.append("packed")
        return "+".join(parts) or "base"

    @property
    def shape_name(self) -> str:
        name = f"h{self.hidden}-b{self.batch}-t{self.seq}"
        if self.inputs != self.hidden:
            name += f"-i{self.inputs}"
        return name

    @property
    def name(self) -> str:
        parts = [self.shape_name]
        if self.layers != 1:
            parts.append(f"l{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.proj_size:
            parts.append(f"proj{self.proj_size}")
        if self.packed:
            parts.append("packed")
        parts.append(self.dtype)
        return "-".join(parts)

    def padded_twin(self) -> Problem:
        """The same problem with padded input: what a packed problem is compared with."""
        return replace(self, packed=False)

    def to_dict(self) -> dict:
        return {**asdict(self), "input_size": self.inputs, "variant": self.variant, "name": self.name}


@dataclass(frozen=True)
class Case:
    problem: Problem
    mode: str

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def name(self) -> str:
        return f"{self.problem.name}-{MODE_TAGS[self.mode]}"


def variant_of(base: Problem, variant: str) -> Problem:
    """`base` with one option of VARIANTS switched on."""
    if variant == "layers2":
        return replace(base, layers=2)
    if variant == "bidirectional":
        return replace(base, bidirectional=True)
    if variant == "proj":
        return replace(base, proj_size=base.hidden // 4)
    if variant == "packed":
        return replace(base, packed=True)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def _shapes(spec: dict):
    return itertools.product(spec["hidden"], spec["batch"], spec["seq"])


def full_problems(device: str) -> list[Problem]:
    """The whole grid for a device: the sweep in every dtype, then every option on the variant shapes."""
    sweep, variant_shapes, dtypes = (
        (GPU_SWEEP, GPU_VARIANT_SHAPES, DTYPES) if device == "cuda" else (CPU_SWEEP, CPU_VARIANT_SHAPES, CPU_DTYPES)
    )
    problems = []
    for dtype in dtypes:
        problems += [Problem(h, b, t, dtype) for h, b, t in _shapes(sweep)]
        problems += [Problem(h, b, t, dtype) for h, b, t in _shapes(variant_shapes)]  # the twins options compare with
        for variant in VARIANTS:
            problems += [variant_of(Problem(h, b, t, dtype), variant) for h, b, t in _shapes(variant_shapes)]
    return list(dict.fromkeys(problems))


# --quick on the GPU: one problem per question the full grid answers, all three modes each.
QUICK_GPU = (
    Problem(768, 16, 1024, "fp16"),  # docs/design.md's cuDNN reference point (~2.0 ms fwd, ~5.2 ms fwd+bwd on an H100)
    Problem(256, 64, 1024, "bf16"),  # long sequences at moderate width
    Problem(1024, 16, 128, "bf16"),  # wide, small batch
    Problem(2048, 1, 128, "bf16"),  # the widest at batch 1: past the split kernels, the streaming ones run it
    Problem(128, 256, 128, "bf16"),  # B > 128: cuDNN's slow path
    Problem(512, 64, 128, "fp32"),  # exact fp32 (TF32 off)
    Problem(512, 64, 128, "tf32"),  # the same with TF32 allowed
    *(variant_of(Problem(256, 16, 1024, "bf16"), v) for v in VARIANTS),  # the options, at a length where they cost
    Problem(256, 16, 1024, "bf16"),  # the padded twin of the packed problem above
)
QUICK_CPU = (
    *(Problem(h, b, t, "fp32") for h, b, t in _shapes(CPU_SWEEP)),  # enough for both plots
    *(variant_of(Problem(32, 4, 32, "fp32"), v) for v in VARIANTS),  # the padded twin is in the sweep above
    Problem(32, 4, 32, "bf16"),
)


# The kernels' target grid (docs/kernels.md): forward <= 1 us and forward+backward <= 2.5 us per step at B <= 16,
# <= 2 and <= 5 us at B = 64. Every problem is also in the full GPU grid.
KERNEL_TARGETS = tuple(Problem(h, b, 1024, "bf16") for h in (512, 768, 1024) for b in (1, 16, 64))


def quick_problems(device: str) -> list[Problem]:
    return list(dict.fromkeys(QUICK_GPU if device == "cuda" else QUICK_CPU))


def cases_for(problems, modes=MODES) -> list[Case]:
    """Every problem in every mode, problem-major (a problem's modes run back to back, after its one check)."""
    return [Case(p, m) for p in dict.fromkeys(problems) for m in modes]


def select(cases, keywords=(), dtypes=None, modes=None) -> list[Case]:
    """Cases whose name contains any of `keywords` (all cases if none), restricted to the given dtypes and modes."""
    return [
        c
        for c in cases
        if (not keywords or any(k in c.name for k in keywords))
        and (dtypes is None or c.problem.dtype in dtypes)
        and (modes is None or c.mode in modes)
    ]


@dataclass(frozen=True)
class TimerSettings:
    """How each (case, provider) is timed: `repeats` separate runs of at least `min_iters` calls and about
    `rep_ms` milliseconds each, after `warmup_ms` of warm-up calls (and one untimed first call that compiles).
    `budget_ms` caps the timed calls of one measurement for slow calls: a repeat then shrinks to fewer calls,
    never below one, so a 1 s call still gets `repeats` separate samples."""

    warmup_ms: float
    rep_ms: float
    repeats: int
    min_iters: int
    max_iters: int
    budget_ms: float


TIMER_FULL = TimerSettings(warmup_ms=25, rep_ms=100, repeats=5, min_iters=3, max_iters=500, budget_ms=10_000)
TIMER_QUICK = TimerSettings(warmup_ms=10, rep_ms=30, repeats=3, min_iters=3, max_iters=200, budget_ms=1_500)
TIMER_CPU = TimerSettings(warmup_ms=0, rep_ms=2, repeats=3, min_iters=1, max_iters=20, budget_ms=1_000)

# Per (problem, provider) costs the time budget does not cover, from the GPU machine's profile (docs/design.md) rather
# than a measurement of this suite: Triton compiles each kernel variant once (forward and backward, ~2 s each),
# and the correctness check runs the problem once in float64 and once in the case's dtype.
COMPILE_S_PER_VARIANT = 4.0
CHECK_S_PER_PROBLEM = 1.0


def estimate_seconds(
    cases, providers: int, timer: TimerSettings, device: str, call_ms: float = 0.0, measurements: int | None = None
) -> float:
    """Estimated wall time of a run if every call took `call_ms`: each measurement spends its warm-up and time
    budget (3 untimed calls at least, then the repeats, capped by budget_ms); on CUDA every problem also pays its
    correctness checks and every kernel variant (dtype × options × telemetry) a compile. call_ms=0 gives the lower
    bound `--list` prints; benchmarks/README.md also works it out for slow calls. `measurements` (default: every
    case × provider) leaves out the pairs a provider skips."""
    if measurements is None:
        measurements = len(cases) * providers
    iters = max(timer.min_iters, math.ceil(timer.rep_ms / call_ms)) if call_ms > 0 else timer.min_iters
    timed_ms = min(timer.repeats * max(timer.rep_ms, iters * call_ms), max(timer.budget_ms, timer.repeats * call_ms))
    per_measurement_ms = max(timer.warmup_ms, call_ms) + 2 * call_ms + timed_ms
    seconds = measurements * per_measurement_ms / 1000
    if device == "cuda":
        problems = {c.problem for c in cases}
        variants = {(p.dtype, p.layers > 1, p.bidirectional, p.proj_size > 0, p.packed) for p in problems}
        seconds += len(problems) * CHECK_S_PER_PROBLEM + len(variants) * 2 * COMPILE_S_PER_VARIANT
    return seconds
