"""This machine's fp32 matrix-multiply peak: the best of a few timed torch.mm, with the threads as set.

bench_train.py measures it right before every measured training window (same moment, same load, same threads);
`python benchmarks/bench_peak.py [THREADS]` prints it for 2048³ and 4096³."""
from __future__ import annotations

import sys
import time


def matmul_peak(n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of the best of `repeats` fp32 torch.mm of two n × n matrices (after one warm-up)."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best / 1e9


if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    for n in (2048, 4096):
        print(f"{n}³ fp32: {matmul_peak(n):.0f} GFLOP/s ({torch.get_num_threads()} threads)")
