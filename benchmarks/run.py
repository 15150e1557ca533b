"""`make bench`: imtune against TRL's SFTTrainer on this machine -> BENCHMARKS.md (+ benchmarks/results.json).

Each measurement runs in a fresh process (benchmarks/bench_*.py). Every figure against the peer is a ratio of two
measurements of the same repeat, taken one after the other, the order flipping every repeat; min/median/max over
the repeats. The fp32 matmul peak is measured right before each training measurement.

    python benchmarks/run.py [--quick] [--only prep,train,memory] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import ROOT, load, machine, run_child, versions  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))

# Training workloads: model, max length, rows per micro-batch, accumulation, measured optimizer steps per window
TRAIN = [
    dict(model="random:small", max_length=512, batch_size=4, grad_accum=1, window=2),
    dict(model="random:smollm2-135m", max_length=256, batch_size=2, grad_accum=1, window=2),
]
TRL_BEST = dict(packing=True, optim="adamw_torch_fused")  # TRL's fastest CPU settings here (BENCHMARKS.md)
# Extra imtune side (benchmarks/bench_variants.py): the code before issue 7's changes to loss.py, pack.py and the
# optimizer.
VARIANTS = {"before": ["before_loss", "before_batches", "before_adamw"]}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} load {load()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def bench_prep(repeats: int) -> dict:
    log("data preparation (LIMA)")
    return run_child("bench_prep.py", {"repeats": repeats}, env={"TOKENIZERS_PARALLELISM": "true"}, timeout=900)


def bench_train(repeats: int, workloads: list[dict], variants: dict | None = None) -> list[dict]:
    """One process per workload; inside it the sides take turns (bench_train.py)."""
    out = []
    for w in workloads:
        log(f"train {w['model']}: {repeats} repeats x {w['window']} steps per side, sides alternating")
        out.append({"workload": w, **run_child("bench_train.py", {**w, "repeats": repeats, "threads": THREADS,
                                                                  "trl": TRL_BEST,
                                                                  "variants": VARIANTS if variants is None
                                                                  else variants},
                                               timeout=1800)})
    return out


TRL_SETTINGS = [  # the TRL configurations tried for "TRL at its best settings on CPU"
    dict(packing=True),  # bfd packing, which turns padding_free on
    dict(packing=True, optim="adamw_torch_fused"),
    dict(packing=False),  # one right-padded row per example
    dict(packing=False, padding_free=True, max_length=None),  # examples laid end to end in one row (pre-filtered)
]


def bench_trl_settings(workload: dict, repeats: int) -> list[dict]:
    """Each TRL configuration against imtune as it is (same process, alternating)."""
    out = []
    for extra in TRL_SETTINGS:
        log(f"TRL settings {extra}")
        out.append({"settings": extra, **run_child("bench_train.py", {**workload, "repeats": repeats,
                                                                       "threads": THREADS, "trl": extra},
                                                   timeout=1800)})
    return out


def bench_memory(repeats: int, model: str = "random:small", max_length: int = 2048) -> dict:
    from bench_memory import one_row

    data = one_row(max_length)
    rows = {"imtune": [], "trl": []}
    for r in range(repeats):
        for side in (["imtune", "trl"] if r % 2 == 0 else ["trl", "imtune"]):
            log(f"memory {model} @ {max_length} repeat {r + 1}/{repeats}: {side}")
            rows[side].append(run_child("bench_memory.py", {"side": side, "model": model, "data": data,
                                                            "max_length": max_length, "threads": THREADS}))
    return {"model": model, "max_length": max_length, **rows}


RESULTS = ROOT / "benchmarks" / "results.json"
SWEEP = ROOT / "benchmarks" / "trl_settings.json"


def _sweep() -> dict | None:
    return json.loads(SWEEP.read_text()) if SWEEP.exists() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repeat, the small model only (a smoke test)")
    p.add_argument("--only", default="prep,train,memory,step,loss,demo",
                   help="comma-separated parts: prep, train, memory, step (where a 135M step's time goes), loss, "
                        "demo (make demo's work, timed); "
                        "and trl_settings, not run by default: "
                        "TRL's CPU configurations against imtune, written to benchmarks/trl_settings.json and "
                        "shown in BENCHMARKS.md by later runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--report-only", action="store_true", help="only rewrite --out from benchmarks/results.json")
    a = p.parse_args()
    from report import write_report

    if a.report_only:
        Path(a.out).write_text(write_report(json.loads(RESULTS.read_text()), _sweep()), encoding="utf-8")
        return
    repeats = 1 if a.quick else a.repeats
    parts = set(a.only.split(","))
    t0 = time.time()
    res = {"command": "make bench  (python benchmarks/run.py" + (" --quick" if a.quick else "") + ")",
           "machine": machine(), "versions": versions(), "threads": THREADS, "load_start": load(), "repeats": repeats}
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    if "prep" in parts:
        res["prep"] = bench_prep(repeats)
    if "train" in parts:
        res["train"] = bench_train(repeats, TRAIN[:1] if a.quick else TRAIN)
    if "memory" in parts:
        res["memory"] = bench_memory(repeats)
    if "trl_settings" in parts:  # kept in a file of its own: a separate, longer run (see --help)
        sweep = {"command": "python benchmarks/run.py --only trl_settings", "machine": machine(),
                 "load_start": load(), "workload": TRAIN[0], "repeats": repeats,
                 "runs": bench_trl_settings(TRAIN[0], repeats), "load_end": load()}
        SWEEP.write_text(json.dumps(sweep, indent=1))
        if parts == {"trl_settings"}:
            return
    if "step" in parts:
        log("where a 135M training step's time goes (torch.profiler) and its products' own rate")
        res["step"] = run_child("bench_step_profile.py", {}, timeout=900)
    if "loss" in parts:
        log("loss head and optimizer micro-benchmarks")
        res["loss"] = run_child("bench_loss.py", {"threads": THREADS, "repeats": repeats})
    if "demo" in parts:  # last: its 6-minute budget is measured on the machine as the other parts leave it
        log("make demo's work (imtune demo --fresh), timed")
        res["demo"] = run_child("bench_demo.py", {}, timeout=1200, env={"TOKENIZERS_PARALLELISM": "true"})
    res["load_end"] = load()
    res["wall_s"] = time.time() - t0
    RESULTS.write_text(json.dumps(res, indent=1))
    Path(a.out).write_text(write_report(res, _sweep()), encoding="utf-8")
    log(f"wrote {a.out} in {res['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
