"""This machine's fp32 matrix-multiply peak: the best of a few timed torch.mm, with the threads as set.

bench_train.py measures it right before every measured training window (same moment, same load, same threads);
`python benchmarks/bench_peak.py [THREADS]` prints it for 2048³ and 4096³."""
from __future__ import annotations

import sys
import time


def matmul_peak(n: int = 2048, repeats: int = 3, device: str = "cpu", precision: str | None = None) -> float:
    """GFLOP/s of the best of `repeats` torch.mm of two n × n matrices (after one warm-up) in `precision` (fp32 |
    bf16: the precision training's matrix products run in); default fp32 on the CPU, bf16 on a GPU."""
    import torch

    precision = precision or ("fp32" if device == "cpu" else "bf16")
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    inner = 1 if device == "cpu" else 20  # one GPU product is too short to time alone
    torch.mm(a, b, out=c)
    sync()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync()
        best = max(best, inner * 2 * n ** 3 / (time.perf_counter() - t))
    return best / 1e9


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    for n in (2048, 4096):
        print(f"{n}³ fp32: {matmul_peak(n):.0f} GFLOP/s ({torch.get_num_threads()} threads)")
