"""The performance model's report: every routed kernel variant compiled for sm_90, read (kernels/analysis.py) and
estimated per time step at the benchmark shapes, next to the nearest published nn.LSTM (cuDNN) figure.

    python -m fastlstm.kernels.model [--out benchmarks/results] [--quick]      (also: fastlstm aot --model)

writes model-sm90-triton<X.Y>.json and .md. Every time in them is modelled, not measured: the JSON keeps a
`measured` slot per case, keyed like `fastlstm bench` problems, which `fastlstm bench --gpu-check` fills.
Compilation runs in fresh processes with TRITON_INTERPRET=0, so the model also works inside a test session that
runs the interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from .hardware import H200, SOURCES
from .model_report import LABEL, markdown, summary_table, write_json
from .variant import compile_kernel, plan_variant

SCHEMA = "fastlstm.model/1"

# The shapes of the GPU check (fastlstm bench --gpu-check runs the same list): bf16 at every width and batch the
# targets name, T = 1024, plus two exact-fp32 shapes.
SEQ = 1024
BF16_SHAPES = tuple((h, b) for h in (256, 512, 768, 1024) for b in (1, 16, 64))
FP32_SHAPES = ((512, 16), (1024, 64))


@dataclass(frozen=True)
class Shape:
    hidden: int
    batch: int
    seq: int
    dtype: str  # "bf16" | "fp32" (exact: TF32 off) | "fp16" | "tf32"

    @property
    def key(self) -> str:
        """The name `fastlstm bench` gives the same problem (fastlstm.bench.cases.Problem.name)."""
        return f"h{self.hidden}-b{self.batch}-t{self.seq}-{self.dtype}"


def model_shapes(quick: bool = False) -> list[Shape]:
    shapes = [Shape(h, b, SEQ, "bf16") for h, b in BF16_SHAPES] + [Shape(h, b, SEQ, "fp32") for h, b in FP32_SHAPES]
    if quick:
        shapes = [s for s in shapes if s.dtype == "bf16" and s.batch == 16 and s.hidden in (256, 1024)]
    return shapes


# ------------------------------------------------------------------------------------------- routed variants


@dataclass(frozen=True)
class Route:
    """One way the launcher can run a layer: a forward and a backward kernel variant and the grid it launches.
    `routed` marks what backend="auto" takes on CUDA today; `resident_weights` marks kernels meant to keep W_hh
    on chip (tests/test_model.py fails if the SASS of such a kernel loads W_hh inside its time loop)."""

    label: str
    routed: bool
    forward: object  # variant.Variant
    backward: object
    programs: dict  # per launch, by pass ("forward" | "backward": the passes plan their tiles apart)
    resident_weights: bool = False
    launches: dict | None = None  # by pass: the split kernels' slices of batch groups, run one after another

    def variant(self, name: str):
        return self.forward if name == "forward" else self.backward


def routes(shape: Shape) -> list[Route]:
    """What the launcher (kernels/planning.py, plan_for) runs for a single-layer, unidirectional, unprojected layer
    with telemetry on and no lengths on an H200 (its SM count bounds a cooperative grid; sm_90 takes the Gluon split
    kernels), and, for comparison, the split kernels' tl twins and the streaming kernels FASTLSTM_KERNELS=streaming
    forces."""
    import torch

    from . import planning

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[shape.dtype]
    storage = "fp32" if shape.dtype in ("fp32", "tf32") else shape.dtype
    precision = "tf32" if shape.dtype == "tf32" else "ieee"

    def plans(gluon: bool) -> dict:
        return {
            stage: planning.plan_for(
                shape.hidden,
                shape.hidden,
                shape.batch,
                dtype,
                max_programs=H200.sms.value,
                gluon=gluon,
                precision=precision,
                stage=stage,
                shared_bytes=planning.SHARED_BYTES["sm_90"],
            )
            for stage in PASSES
        }

    routed = plans(gluon=True)
    candidates = [routed]
    if routed["forward"].implementation == "gluon":  # the tl twins, as the launcher plans them (FASTLSTM_KERNELS=tl)
        candidates.append(plans(gluon=False))
    if routed["forward"].kind != "streaming":
        candidates.append(dict.fromkeys(PASSES, planning.Plan("streaming", planning.STREAMING)))
    out = []
    for chosen in candidates:
        kind = chosen["forward"].kind
        switches = {"telemetry"} | ({"exchange"} if kind == "split" else set())
        forward, backward = (plan_variant(chosen[stage], stage, storage, precision, switches) for stage in PASSES)
        out.append(
            Route(
                forward.family,
                chosen is routed,
                forward,
                backward,
                {stage: planning.programs_of(chosen[stage], shape.batch) for stage in PASSES},
                resident_weights=kind in ("single", "split"),
                launches={stage: chosen[stage].config.launches if kind == "split" else 1 for stage in PASSES},
            )
        )
    return out


PASSES = ("forward", "backward")


def resident_weight_variants() -> list:
    """Every (route label, pass, variant) that claims to keep its weights on chip, over the model's shapes."""
    found = {}
    for shape in model_shapes():
        for route in routes(shape):
            if route.resident_weights:
                for name, variant in (("forward", route.forward), ("backward", route.backward)):
                    found[variant] = (route.label, name, variant)
    return list(found.values())


# --------------------------------------------------------------------------------------- isolated analysis


def _jit_process() -> None:
    # The kernels must be real JIT functions for triton.compile (aot.py does the same for its matrix).
    os.environ["TRITON_INTERPRET"] = "0"


def run_isolated(fn, items, jobs: int = 2) -> list:
    """map(fn, items) in fresh spawned processes, where the kernels are compiled JIT functions."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, initializer=_jit_process) as pool:
        return list(pool.map(fn, items))


def scalars(shape: Shape) -> dict:
    """The kernel's runtime integer arguments for a whole-sequence launch of this shape."""
    t, h = shape.seq, shape.hidden
    return {
        "T": t,
        "B": shape.batch,
        "H": h,
        "P": h,
        "step_begin": 0,
        "step_end": t,
        "capacity": t,
        "order": 0,
        "batch_group_base": 0,
    }


def profile_variant(task) -> dict:
    """Compile one variant and profile it at every (shape, programs): {"weights_every_step", "profiles"}."""
    variant, launches = task
    from .analysis import analyse

    compiled = compile_kernel(variant, 90)
    analysis = analyse(compiled.kernel, compiled.fn, name=variant.name)
    profiles = {key: analysis.per_step(scalars(shape), programs).to_dict() for key, shape, programs in launches}
    return {
        "variant": variant.name,
        "weights_every_step": bool(analysis.weight_loads_in_time_loop()),
        "shared_bytes": analysis.shared_bytes,
        "num_warps": analysis.num_warps,
        "profiles": profiles,
    }


# ----------------------------------------------------------------------------------------- the estimate


def gemm_us_per_step(shape: Shape, backward: bool) -> float:
    """The cuBLAS GEMMs around the recurrence, spread over the steps: the input projection x @ W_ihᵀ (forward;
    2·B·I·4H FLOP per step, I = H here), and dx, dW_ih, dW_hh (backward; 3 × 2·B·4H·H)."""
    h, b = shape.hidden, shape.batch
    flops = (3 if backward else 1) * 2 * b * h * 4 * h
    clock = H200.clock_ghz.value * 1e9
    if shape.dtype == "fp32":
        rate = H200.fp32_flops_per_clock_per_sm.value * H200.sms.value * clock
    else:
        rate = (
            H200.dense_16bit_flops_per_clock_per_sm.value * H200.sms.value * clock / (2 if shape.dtype == "tf32" else 1)
        )
    return flops / (rate * H200.gemm_efficiency.value) * 1e6


def estimate(shape: Shape, forward: dict, backward: dict, launches: dict | None = None) -> dict:
    """µs per step of one route; a pass launched in `launches[pass]` slices of the batch, one after another, pays
    its recurrence step once per slice."""
    launches = launches or dict.fromkeys(PASSES, 1)
    forward_step = launches["forward"] * forward["step_us"]
    backward_step = launches["backward"] * backward["step_us"]
    fwd = forward_step + gemm_us_per_step(shape, backward=False)
    bwd = backward_step + gemm_us_per_step(shape, backward=True)
    return {
        "forward_us_per_step": fwd,
        "forward_backward_us_per_step": fwd + bwd,
        "forward_ms": fwd * shape.seq / 1e3,
        "forward_backward_ms": (fwd + bwd) * shape.seq / 1e3,
        "recurrence_us_per_step": {"forward": forward_step, "backward": backward_step},
        "launches": launches,
        "gemm_us_per_step": {"forward": gemm_us_per_step(shape, False), "backward": gemm_us_per_step(shape, True)},
    }


# -------------------------------------------------------------------------------- published nn.LSTM figures

# nn.LSTM / cuDNN LSTM timings that were published, one layer, one direction: (source, hardware, dtype, H, B, T,
# forward ms, forward+backward ms). DeepBench's forward+backward is its "Total Time" (forward, backward wrt inputs,
# backward wrt weights). FlashRNN's figures are read off a bar chart, so approximate.
DEEPBENCH = (
    "DeepBench training results, results/train/DeepBench_NV_V100.xlsx (github.com/baidu-research/DeepBench),"
    " cuDNN 7.6.2, CUDA 10.1, V100 (DGX-1)"
)
FLASHRNN = "FlashRNN (Pöppel et al., arXiv:2412.07752), head-dimension experiment, nn.LSTM (cuDNN)"
PUBLISHED = (
    (FLASHRNN, "H100 SXM", "fp16", 768, 16, 1024, 2.0, 5.2),
    (DEEPBENCH, "V100", "fp16 inputs, fp32 math", 256, 16, 150, 4.072, 9.165),
    (DEEPBENCH, "V100", "fp16 inputs, fp32 math", 256, 64, 150, 4.450, 10.120),
    (DEEPBENCH, "V100", "fp16 inputs, fp32 math", 512, 16, 25, 0.441, 1.411),
    (DEEPBENCH, "V100", "fp16 inputs, fp32 math", 512, 64, 25, 0.790, 1.956),
    (DEEPBENCH, "V100", "fp16 inputs, fp32 math", 1024, 16, 25, 1.235, 2.815),
    (DEEPBENCH, "V100", "fp16 inputs, fp32 math", 1024, 64, 25, 1.391, 3.299),
    (DEEPBENCH, "V100", "fp32", 256, 16, 150, 4.542, 9.836),
    (DEEPBENCH, "V100", "fp32", 512, 16, 25, 1.095, 2.197),
    (DEEPBENCH, "V100", "fp32", 512, 64, 25, 1.341, 3.034),
    (DEEPBENCH, "V100", "fp32", 1024, 16, 25, 1.923, 4.025),
    (DEEPBENCH, "V100", "fp32", 1024, 64, 25, 2.205, 5.407),
)


def nearest_published(shape: Shape) -> dict:
    """The published figure closest in width and batch (log scale; a matching precision class and a Hopper part
    break ties), as µs per step."""
    wants_fp32 = shape.dtype in ("fp32", "tf32")

    def distance(row):
        _, hw, dtype, h, b, _, _, _ = row
        gap = abs(math.log2(h / shape.hidden)) + 0.5 * abs(math.log2(b / shape.batch))
        return gap, (dtype == "fp32") != wants_fp32, "H100" not in hw

    source, hw, dtype, h, b, t, fwd, total = min(PUBLISHED, key=distance)
    return {
        "source": source,
        "hardware": hw,
        "dtype": dtype,
        "hidden": h,
        "batch": b,
        "seq": t,
        "forward_us_per_step": fwd * 1e3 / t,
        "forward_backward_us_per_step": total * 1e3 / t,
        "same_shape": (h, b) == (shape.hidden, shape.batch),
    }


# ----------------------------------------------------------------------------------------------- the run


def build(shapes: list[Shape], jobs: int = 2) -> dict:
    plan: dict = {}  # variant -> (pass, [(key, shape, programs)])
    for shape in shapes:
        for route in routes(shape):
            for stage in PASSES:
                plan.setdefault(route.variant(stage), []).append((shape.key, shape, route.programs[stage]))
    results = dict(zip(plan, run_isolated(profile_variant, list(plan.items()), jobs)))
    cases = {}
    for shape in shapes:
        kernels = {}
        for route in routes(shape):
            fwd, bwd = results[route.forward], results[route.backward]
            kernels[route.label] = {
                "routed": route.routed,
                "programs": route.programs,
                "resident_weights_claimed": route.resident_weights,
                "forward": {
                    "variant": fwd["variant"],
                    "weights_every_step": fwd["weights_every_step"],
                    **fwd["profiles"][shape.key],
                },
                "backward": {
                    "variant": bwd["variant"],
                    "weights_every_step": bwd["weights_every_step"],
                    **bwd["profiles"][shape.key],
                },
                LABEL: estimate(shape, fwd["profiles"][shape.key], bwd["profiles"][shape.key], route.launches),
            }
        routed = next((label for label, k in kernels.items() if k["routed"]), None)
        cases[shape.key] = {
            "problem": {
                "hidden": shape.hidden,
                "batch": shape.batch,
                "seq": shape.seq,
                "dtype": shape.dtype,
                "input_size": shape.hidden,
                "layers": 1,
                "bidirectional": False,
            },
            "routed": routed,
            LABEL: dict(kernels[routed][LABEL]) if routed else None,
            "kernels": kernels,
            "nn_lstm_published": nearest_published(shape),
            "measured": None,  # filled by `fastlstm bench --gpu-check`: {"forward": ms, "forward_backward": ms, ...}
        }
    return {
        "schema": SCHEMA,
        "label": f"{LABEL}: every time in this file is an estimate from compiled code, not a measurement",
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arch": "sm_90",
        "triton": _triton_version(),
        "hardware": H200.name,
        "constants": H200.table(),
        "sources": SOURCES,
        "cases": cases,
    }


def _triton_version() -> str:
    import triton

    return triton.__version__


def file_stem(triton_version: str) -> str:
    major_minor = ".".join(triton_version.split(".")[:2])
    return f"model-sm90-triton{major_minor}"


def write(doc: dict, folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, file_stem(doc["triton"]))
    write_json(doc, stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(markdown(doc))
    return [stem + ".json", stem + ".md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastlstm.kernels.model", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="bf16, B=16, H in {256, 1024} only")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    args = parser.parse_args(argv)
    doc = build(model_shapes(args.quick), jobs=args.jobs)
    paths = write(doc, args.out)
    print(summary_table(doc))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
