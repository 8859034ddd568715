"""The constants of the latency model (kernels/analysis.py, kernels/replay.py) for an H200 SXM (an H100 die with
HBM3e), each with the public source it comes from, or marked as an assumption with the reason for the value.

Every figure the model prints derives from this table; docs/performance-model.md reproduces it. Replace an
assumption by a measurement (`fastlstm bench --gpu-check` records the machine) rather than by another guess.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# Sources, cited once here and by key below.
SOURCES = {
    "h200-datasheet": (
        "NVIDIA H200 Tensor Core GPU product page/datasheet (https://www.nvidia.com/en-us/data-center/h200/):"
        " 4.8 TB/s HBM3e, dense BF16 989 TFLOP/s (1,979 with sparsity), 132 SMs (same GH100 die as H100 SXM)"
    ),
    "hopper-whitepaper": "NVIDIA H100 Tensor Core GPU Architecture whitepaper"
    " (https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper): 4 SM sub-partitions with one warp"
    " scheduler each (one warp instruction per clock), 256 KB combined L1/shared memory per SM",
    "dewing-latency": "markdewing/AI_kernels, latency/README.md and latency/data/h100sxm.dat (GitHub), pointer chase on"
    " an H100 SXM: L1 39.6 cycles, L2 291 cycles up to ~24 MB, main memory ~700 cycles",
    "rrze-latency": "RRZE-HPC/te42kyfo gpu-benches, gpu-latency/h100_pcie.txt (GitHub), pointer chase on an H100 PCIe"
    " at 1755 MHz: L1 34 cycles, L2 265 cycles to ~20 MB, ~475 cycles for 35-50 MB (lines homed in the far L2"
    " partition), DRAM ~650 cycles",
    "rrze-l2-h200": (
        "te42kyfo gpu-benches, gpu-l2-cache/h200.txt (GitHub): all SMs reading a shared data set on an H200,"
        " 13.5 TB/s at 1.5 MB, 9.5-10.6 TB/s from 4 to 40 MB, 3.89 TB/s once it spills to HBM"
    ),
    "cuda-guide-banks": (
        "CUDA C++ Programming Guide, shared memory: 32 banks of 4 bytes, each serving one access per clock"
    ),
    "jia-volta": "Jia et al., Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking (arXiv:1804.06826):"
    " dependent FFMA/IADD latency 4 cycles",
    "luo-hopper": "Luo et al., Benchmarking and Dissecting the Nvidia Hopper GPU Architecture (arXiv:2402.13499) and"
    " Dissecting the NVIDIA Hopper Architecture through Microbenchmarking (arXiv:2501.12084)",
}


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str  # a SOURCES key, or "assumption: <why>"

    @property
    def assumed(self) -> bool:
        return self.source.startswith("assumption")


@dataclass(frozen=True)
class Hardware:
    name: str
    clock_ghz: Constant
    sms: Constant
    warp_schedulers_per_sm: Constant
    l1_latency: Constant
    l2_latency: Constant
    l2_far_latency: Constant
    hbm_latency: Constant
    shared_latency: Constant
    alu_latency: Constant
    mufu_latency: Constant
    special_register_latency: Constant
    mma_latency: Constant
    barrier_cycles: Constant
    cctl_cycles: Constant
    poll_release_wait: Constant
    l1_bytes: Constant
    l2_bytes_per_clock_per_sm: Constant
    l2_bandwidth: Constant
    hbm_bandwidth: Constant
    shared_bytes_per_clock: Constant
    dense_16bit_flops_per_clock_per_sm: Constant
    fp32_flops_per_clock_per_sm: Constant
    mma_sync_fraction: Constant
    gemm_efficiency: Constant

    def cycles_to_us(self, cycles: float) -> float:
        return cycles / (self.clock_ghz.value * 1e3)

    def table(self) -> list[dict]:
        """Every constant as {name, value, unit, source, assumed}: the table the report and the docs print."""
        rows = []
        for f in fields(self):
            c = getattr(self, f.name)
            if isinstance(c, Constant):
                key, _, rest = c.source.partition(" ")
                source = SOURCES[key] + (" " + rest if rest else "") if key in SOURCES else c.source
                rows.append({"name": f.name, "value": c.value, "unit": c.unit, "source": source, "assumed": c.assumed})
        return rows


H200 = Hardware(
    name="NVIDIA H200 SXM (sm_90)",
    clock_ghz=Constant(
        1.83,
        "GHz",
        "assumption: the clock at which the datasheet's dense BF16 rate (989.4 TFLOP/s)"
        " equals 132 SMs x 4096 FLOP/clock; SXM parts boost up to 1.98 GHz, power limits pull them"
        " lower under load (h200-datasheet)",
    ),
    sms=Constant(132, "SMs", "h200-datasheet"),
    warp_schedulers_per_sm=Constant(4, "issue slots/clock", "hopper-whitepaper"),
    l1_latency=Constant(40, "cycles", "dewing-latency"),
    l2_latency=Constant(291, "cycles", "dewing-latency"),
    l2_far_latency=Constant(475, "cycles", "rrze-latency"),
    hbm_latency=Constant(700, "cycles", "dewing-latency"),
    shared_latency=Constant(
        30,
        "cycles",
        "assumption: published Volta-to-Hopper shared-memory load latencies lie"
        " between about 20 and 33 cycles (jia-volta, luo-hopper)",
    ),
    alu_latency=Constant(4, "cycles", "jia-volta"),
    mufu_latency=Constant(
        18,
        "cycles",
        "assumption: special-function unit (ex2, rcp) results take several times an"
        " FFMA's latency; 18 is in the range reported for Volta and later (jia-volta)",
    ),
    special_register_latency=Constant(
        20,
        "cycles",
        "assumption: S2R reads (thread and block ids) are off the main"
        " datapath; only paid outside the time loop in practice",
    ),
    mma_latency=Constant(
        33,
        "cycles",
        "assumption: dependent mma.sync m16n8k16 accumulate latency, about 32 cycles"
        " on Ampere and Hopper in the microbenchmark literature (luo-hopper)",
    ),
    barrier_cycles=Constant(24, "cycles", "assumption: bar.sync of 8 warps that arrive together, about 20-25 cycles"),
    cctl_cycles=Constant(
        20,
        "cycles",
        "assumption: CCTL.IVALL invalidates L1 tags without a memory round trip; its"
        " cost is the later misses, which the model charges as L2 latency",
    ),
    poll_release_wait=Constant(
        0.5,
        "far-L2 trips",
        "assumption: a strong load polling a flag that another SM releases waits, besides its own trip, for the"
        " release to reach L2; the release was issued some time before the poll, so half a far-L2 trip on average",
    ),
    l1_bytes=Constant(256 * 1024, "bytes", "hopper-whitepaper"),
    l2_bytes_per_clock_per_sm=Constant(
        64,
        "bytes/clock",
        "assumption: one SM alone streams from L2 at about 64 B per"
        " clock (the L1 fill width); when every SM streams, rrze-l2-h200's aggregate"
        " caps each at about 40 B per clock",
    ),
    l2_bandwidth=Constant(9.7e12, "bytes/s", "rrze-l2-h200"),
    hbm_bandwidth=Constant(3.9e12, "bytes/s", "rrze-l2-h200 (the datasheet's 4.8 TB/s is the pin rate)"),
    shared_bytes_per_clock=Constant(128, "bytes/clock", "cuda-guide-banks"),
    dense_16bit_flops_per_clock_per_sm=Constant(
        4096, "FLOP/clock", "h200-datasheet (989.4 TFLOP/s / 132 SMs / 1.83 GHz)"
    ),
    fp32_flops_per_clock_per_sm=Constant(
        256, "FLOP/clock", "hopper-whitepaper (128 FP32 lanes per SM, one FMA each per clock)"
    ),
    mma_sync_fraction=Constant(
        0.5,
        "of dense rate",
        "assumption: only wgmma (HGMMA) reaches Hopper's dense rate;"
        " the older mma.sync (HMMA) that triton emits for small dots reaches about half"
        " (luo-hopper)",
    ),
    gemm_efficiency=Constant(
        0.8,
        "of dense rate",
        "assumption: large cuBLAS bf16 GEMMs (the input projection and"
        " weight gradients) run at about 80% of the dense rate",
    ),
)
