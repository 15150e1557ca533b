"""Train a grid of runs (compare's arms × seeds, sweep's λ × seeds, study's values × arms × seeds) on a Ray cluster:
`train_on_ray(jobs, RayPlan, say)`, every run one Ray task.

Each task asks Ray for `cpus_per_run` CPUs and `gpus_per_run` GPUs; Ray places it on a node that has them and sets
CUDA_VISIBLE_DEVICES to the GPUs it gave (so two runs never share GPU 0). A task runs in a fresh worker process
(`max_calls=1`: no torch state carried between runs), trains its config with imtune.train.loop, and writes its run
directory where the config says: under `--out`, which must therefore be on storage every node sees (a shared file
system: NFS, Lustre, a mounted bucket). The driver then evaluates and reports from those run directories exactly as
the local path does, so compare.json / sweep.json / study.json are the same. Each run's output goes to RUN/train.log.

A run that fails (an error, a killed worker, a lost node) is reported with its log and does not stop the others; the
command then fails naming every failed run, and re-running the same command trains only the runs without DONE
(compare skips finished ones). Ctrl-C cancels every task of the grid. `--ray-address auto` joins a running cluster
(`ray start --head` on one node, `ray start --address HEAD:6379` on the others, or Ray on Slurm); without an address a
local Ray instance is started on 127.0.0.1 with this machine's CPUs.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from imtune import files
from imtune.config import TrainConfig
from imtune.train.loop import train
from imtune.types import UsageError


@dataclass(frozen=True)
class RayPlan:
    address: str | None = None  # None: a local Ray instance; "auto" or HOST:PORT: a running cluster
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0


def train_on_ray(jobs: list, plan: RayPlan, say) -> None:
    """Train every job (imtune.experiments.jobs.Job) as a Ray task; raise a UsageError naming the failed runs' logs."""
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'imtune[ray]' (or pip install ray)") from None
    if plan.cpus_per_run <= 0 or plan.gpus_per_run < 0:
        raise UsageError("--cpus-per-run must be > 0 and --gpus-per-run >= 0")
    started = not ray.is_initialized()
    if started:
        local = {} if plan.address else dict(num_cpus=os.cpu_count() or 1, object_store_memory=200 * 2**20,
                                            include_dashboard=False)
        ray.init(address=plan.address, log_to_driver=False, configure_logging=False, **local)
    task = ray.remote(num_cpus=plan.cpus_per_run, num_gpus=plan.gpus_per_run, max_calls=1, max_retries=0)(_train)
    refs = {}
    for job in jobs:
        log = Path(job.cfg.output_dir) / "train.log"
        threads = job.cfg.threads or max(1, int(plan.cpus_per_run))
        refs[task.remote(job.cfg.replace(progress=False, threads=threads).to_dict(), str(log))] = (job, log)
        say(f"{job.label}: submitted to Ray ({plan.cpus_per_run:g} CPU, {plan.gpus_per_run:g} GPU; log {log})")
    failed, pending = [], list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            job, log = refs[done[0]]
            try:
                ray.get(done[0])
                say(f"{job.label}: trained on Ray")
            except (ray.exceptions.RayError, UsageError) as e:  # the run failed; the others go on
                failed.append((job, log))
                say(f"{job.label}: FAILED on Ray ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}); "
                    f"log {log}")
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        say(f"imtune: interrupted: {len(pending)} Ray task(s) cancelled; finished runs are kept, re-run the same "
            "command to train the rest")
        raise
    finally:
        if started:
            ray.shutdown()
    if failed:
        raise UsageError(f"{len(failed)} of {len(jobs)} runs failed on Ray (the others are kept; re-running the same "
                         "command trains only the missing ones): "
                         + "; ".join(f"{job.label}: log {log}" for job, log in failed))


def _train(cfg: dict, log: str) -> None:
    """In a Ray worker: everything the run prints goes to its log; torch uses the threads the config names."""
    import torch

    files.make_dirs(Path(log).parent)  # claimed by the driver (imtune.experiments.jobs.train_all) before submitting
    fd = files.open_fd(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, mode=0o644)  # never through a link
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(fd, 1), os.dup2(fd, 2)
    c = TrainConfig.from_dict(cfg)
    torch.set_num_threads(c.threads or 1)
    try:
        train(c)
    except UsageError as e:
        print(f"imtune: {e}", file=sys.stderr, flush=True)
        raise RuntimeError(str(e)) from None
