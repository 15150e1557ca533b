"""What bounds the training step's share of the fp32 matmul peak: where a step's time goes, and how fast the model's own
matrix products run.

`python benchmarks/bench_step_profile.py [MODEL] [MAX_LENGTH] [BATCH] [STEPS]` (default random:smollm2-135m 256 2 7,
bench_train's 135M case): `imtune train` on the LIMA conversations that fit, under torch.profiler; the steps after the
first (which allocates AdamW's moments) are split by operator into matrix products, attention, the optimizer, gradient
clipping's norms and the rest (elementwise passes, softmax, copies). Then the products this model runs per step at that
many tokens (each linear layer's forward, input-gradient and weight-gradient mm, and the head's) are timed alone, best
of 5, against the 2048³ peak bench_train divides by. Prints JSON. The share of the peak a step can reach is about
(the products' share of its time) × (their rate / the peak).
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_peak import matmul_peak  # noqa: E402
from bench_train import subset  # noqa: E402
from common import child_main, scratch  # noqa: E402

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
          "optimizer": ("aten::_fused_adamw_",), "clipping norms": ("aten::linalg_vector_norm",)}


def profile_steps(model: str, max_length: int, batch: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import imtune.train.loop as loop
    from imtune import cli

    real_fit, got = loop.fit, {}

    def fit(run, *a, **k):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            out = real_fit(run, *a, **k)
        got["events"], got["tokens"] = p.events(), out
        return out

    for mod in list(sys.modules.values()):  # the trainer imported fit by name
        if getattr(mod, "fit", None) is real_fit:
            mod.fit = fit
    with scratch("imtune-step-profile-") as where:  # the run's 0.5 GB final/ goes once it has been profiled
        cli.main(["train", "--data", subset(max_length), "--model", model, "--max-length", str(max_length),
                  "--batch-size", str(batch), "--max-steps", str(steps), "--threads", str(torch.get_num_threads()),
                  "--output-dir", os.path.join(where, "run"), "--no-progress"])
    events = got["events"]
    first_step_end = min(e.time_range.end for e in events if e.name.startswith("Optimizer.step"))
    later = [e for e in events if e.time_range.start > first_step_end]
    total = sum(e.self_cpu_time_total for e in later)
    shares = {g: sum(e.self_cpu_time_total for e in later if e.name in names) / total for g, names in GROUPS.items()}
    shares["the rest"] = 1 - sum(shares.values())
    return {"profiled_seconds_after_step_1": total / 1e6, "shares": shares}


def shapes_rate(model: str, tokens: int, repeats: int = 5) -> dict:
    """GFLOP/s of this model's products at `tokens` rows, each timed alone (FLOP-weighted: all FLOPs / all time)."""
    import torch

    from imtune.model.models import model_shape

    s = model_shape(model)
    linears = [(s.hidden, s.hidden), (s.hidden, s.kv_dim), (s.hidden, s.kv_dim), (s.hidden, s.hidden),
               (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden)]
    flops = seconds = 0.0
    for (i, o), count in [*((shape, s.layers) for shape in linears), ((s.hidden, s.vocab), 1)]:
        x, w, g = torch.randn(tokens, i), torch.randn(o, i), torch.randn(tokens, o)
        for a, b in ((x, w.t()), (g, w), (g.t(), x)):  # forward, input gradient, weight gradient
            torch.mm(a, b)
            best = min(_timed(torch.mm, a, b) for _ in range(repeats))
            flops += count * 2 * tokens * i * o
            seconds += count * best
    return {"gflops": flops / seconds / 1e9, "peak_2048_gflops": matmul_peak()}


def _timed(f, *args) -> float:
    t = time.perf_counter()
    f(*args)
    return time.perf_counter() - t


def main(model: str = "random:smollm2-135m", max_length: int = 256, batch: int = 2, steps: int = 7) -> dict:
    out = {"model": model, "tokens_per_step": max_length * batch, **profile_steps(model, max_length, batch, steps),
           **shapes_rate(model, max_length * batch)}
    out["products_over_peak"] = out["gflops"] / out["peak_2048_gflops"]
    out["share_bound"] = out["shares"]["matmul"] * out["products_over_peak"]
    return out


if __name__ == "__main__":
    child_main(main)  # run by run.py (`--child JSON`); else the arguments below
    args = sys.argv[1:]
    print(json.dumps(main(*(args[:1]), *map(int, args[1:4])), indent=1))
