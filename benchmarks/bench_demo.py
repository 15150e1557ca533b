"""`make demo`'s work, timed: `imtune demo --fresh` into a temporary directory (both arms trained from scratch,
evaluated, the report written), wall time from start to exit, with the load average before and after. The demo's
own comparison table (from compare.json) is kept so that BENCHMARKS.md can show what this run found."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import child_main, scratch  # noqa: E402


def main(out: str | None = None) -> dict:
    if out:
        return timed(out)
    with scratch("bench-demo-") as where:  # the demo's ~2.6 GB of runs go once its figures are read
        return timed(os.path.join(where, "demo"))  # a new folder: --fresh deletes only its own


def timed(out: str) -> dict:
    load0 = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imtune", "demo", "--fresh", "--no-progress", "--out", out],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"imtune demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    from imtune.report.runs import read_summary

    cmp = read_summary(out)
    arms = {a.name: {"gap": a.results.gap, "train_output_loss": a.results.train.output_loss,
                     "heldout_output_loss": a.results.heldout.output_loss,
                     "exact_match": a.results.exact_match.accuracy if a.results.exact_match else None}
            for a in cmp.arms}
    return {"wall_s": wall, "load_before": load0, "load_after": os.getloadavg(), "arms": arms,
            "verdict": cmp.verdict.text if cmp.verdict else None}


if __name__ == "__main__":
    child_main(main)
    print(json.dumps(main(*sys.argv[1:]), indent=1))
