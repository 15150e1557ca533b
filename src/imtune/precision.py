"""`--precision auto`: the fastest precision this machine trains in, decided by measuring it.

On a GPU: bf16 (mixed: fp32 master weights, bf16 autocast) where the GPU has it, else fp32. On a CPU the answer
differs between machines of the same kind: on an Intel Xeon with AMX (`amx_bf16`) a bf16 matrix product ran 7.3×
faster than fp32 (2,537 vs 347 GFLOP/s, 2 cores), while on AMD EPYC builds bf16 was slower than fp32. CPU flags
alone do not say which (a bf16 flag without AMX can still be slower), so `auto` times one bf16 and one fp32 product
of the sizes training runs (1024 × 1024, a few ms each) and picks bf16 only when it is clearly faster (≥ 1.3×: the
casts autocast adds cost the rest). The choice, both figures and the CPU model are recorded in data_stats.json.

Several CPU processes (accelerate launch, torchrun) decide once: rank 0 measures and every rank receives its choice
(torch.distributed, over the process group accelerate sets up), so 1 and N processes on the same machine train in the
same precision; measured on each rank, they could choose differently. IMTUNE_CPU_PRECISION=fp32|bf16 in the
environment fixes what `auto` means on a CPU for reproducible runs across machines (the test suite sets fp32: its
equalities are fp32's). IMTUNE_CPU_PROBE="FP32,BF16" (GFLOP/s) stands in for the measurement, to test the decision
where the hardware cannot show it.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

BF16_MARGIN = 1.3  # bf16 must beat fp32 matmul by this much to pay for autocast's casts


@dataclass(frozen=True)
class Precision:
    asked: str  # auto | fp32 | bf16
    used: str  # fp32 | bf16
    why: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    def to_dict(self) -> dict:
        return {"asked": self.asked, "used": self.used, "why": self.why, "fp32_gflops": self.fp32_gflops,
                "bf16_gflops": self.bf16_gflops, "cpu": cpu_model()}


def resolve(asked: str) -> Precision:
    import torch

    if asked in ("fp32", "bf16"):
        return Precision(asked, asked, "asked for")
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return Precision(asked, "bf16" if ok else "fp32", f"GPU {'has' if ok else 'lacks'} bf16")
    fixed = os.environ.get("IMTUNE_CPU_PRECISION")
    if fixed in ("fp32", "bf16"):
        return Precision(asked, fixed, "IMTUNE_CPU_PRECISION")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return _agreed(asked, world)
    return _measured(asked)


def _measured(asked: str, note: str = "") -> Precision:
    fp32, bf16 = probe()
    used = "bf16" if bf16 >= BF16_MARGIN * fp32 else "fp32"
    return Precision(asked, used, f"CPU matmul: bf16 {bf16:.0f} vs fp32 {fp32:.0f} GFLOP/s "
                                  f"({bf16 / fp32:.2f}×; bf16 needs ≥ {BF16_MARGIN}×){note}", round(fp32, 1),
                     round(bf16, 1))


def _agreed(asked: str, world: int) -> Precision:
    """Rank 0 measures; every rank gets its Precision (accelerate's PartialState sets up the process group that the
    Accelerator built next reuses)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as imtune.build.make_accelerator will ask
    box = [_measured(asked, f"; measured on rank 0 for all {world} processes") if state.is_main_process else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


@functools.lru_cache(maxsize=1)
def probe(n: int = 1024, repeats: int = 3, small: int = 256) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s: the best of `repeats` n × n products each, after a warm-up, with the threads as set.
    bf16 is first timed on one small × small product: where it is 4× slower than fp32 there (AMD EPYC: ~1 vs ~66
    GFLOP/s, where one 1024³ bf16 product took ~4 s and the probe 11.6 s), no size makes up for it and that figure
    is returned without the large products."""
    import torch

    fake = os.environ.get("IMTUNE_CPU_PROBE")
    if fake:  # "FP32,BF16": the decision without the hardware (tests; a machine's known figures)
        fp32, bf16 = (float(x) for x in fake.split(","))
        return fp32, bf16
    fp32 = _gflops(torch.float32, n, repeats)
    bf16 = _gflops(torch.bfloat16, small, 1)
    return (fp32, bf16) if bf16 * 4 < fp32 else (fp32, _gflops(torch.bfloat16, n, repeats))


def _gflops(dtype, n: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None
