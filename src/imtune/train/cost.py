"""What a comparison will cost, said before its first step: `estimate(settings, data, base, runs) -> Cost`.

Counts come from the data and the schedule compare will run (imtune.train.plan, through compare_data's step estimate):
examples, tokens, optimizer steps, evaluation points × held-out examples, final scoring, greedy generations, disk.
Time comes from this machine, not a constant: one training step of the real model on a row of the real length is
timed (after one warm-up step), and a few greedy tokens; forward-only passes are counted at a third of a training
step per token. It is an estimate (±50% is typical: data loading, saving and evaluation overheads vary), printed so
that a user can shrink a run before spending an afternoon on it (`--dry-run` stops there).

`of_run(cfg, examples, sched, eval_sets, save_dtype)` is the same estimate for one `imtune train` run, from the
examples, schedule and evaluation sets train.setup computed (exact counts; the same measured step and formula).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

from imtune import files
from imtune.data.pack import lengths_of
from imtune.files import cache_dir
from imtune.model.memory import available_bytes, plan as memory_plan
from imtune.model.models import load_model, model_shape, n_params
from imtune.model.precision import cpu_model, resolve
from imtune.model.provenance import model_fingerprint
from imtune.train.saving import save_dtype
from imtune.types import UsageError

SLOW = 30 * 60  # seconds: above this, say so and show what brings it down


@dataclass(frozen=True)
class Cost:
    runs: int  # arm × seed runs to train now (finished ones are skipped)
    examples: int  # training examples per run
    tokens: int  # training tokens per run (all epochs)
    steps: int  # optimizer steps per run
    evals: int  # evaluation points per run (step 0, every --eval-every, the end)
    eval_examples: int  # examples scored at each evaluation point (validation + test + train sample)
    generations: int  # greedy answers per run (exact match + BLEU prompts)
    max_new_tokens: int
    train_tokens_per_s: float  # measured
    gen_tokens_per_s: float  # measured
    disk_bytes: int  # the models --keep keeps of every run (in the dtype they are saved in: weight_bytes)
    seconds: float
    kept: str = "final/ and best/"  # what disk_bytes counts, in words
    preset: str | None = None  # --preset given: the long-run hint does not offer the one already in use
    save_every: int | None = None  # a checkpoint every N steps (weights + AdamW state: 3× the model in fp32)
    save_minutes: float | None = None  # or once that many minutes of training have passed since the last one
    checkpoint_bytes: int = 0
    what: str = "comparison"  # or "run": one `imtune train` (of_run)
    epochs: float | None = None  # of a run: the epochs its steps span
    keep_checkpoints: int = 1  # of a run: how many checkpoints stay on disk (0: all)
    peak: object = None  # imtune.model.memory.Peak: the estimated peak memory of a run (None: the shape is unknown)

    def text(self) -> str:
        if self.what == "run":
            span = f" ({self.epochs:.2f} epochs)" if self.epochs is not None else ""
            head = (f"plan: {self.examples:,} examples, {self.tokens:,} training tokens in {self.steps:,} optimizer "
                    f"steps{span}; {self.evals} evaluation points × {self.eval_examples:,} examples")
        else:
            head = (f"plan: {self.runs} run(s) to train; each {self.examples:,} examples, {self.tokens:,} training "
                    f"tokens in {self.steps:,} optimizer steps; {self.evals} evaluation points × "
                    f"{self.eval_examples:,} examples; {self.generations} greedy answers of ≤ {self.max_new_tokens} "
                    "tokens")
        rates = f"{self.train_tokens_per_s:,.0f} training tokens/s" + (
            f", {self.gen_tokens_per_s:,.1f} generated tokens/s" if self.generations else "")
        each_run = "" if self.what == "run" else " of each run"
        lines = [head, f"  estimated: {_duration(self.seconds)} on this machine (measured: {rates}), "
                       f"{_size(self.disk_bytes)} of disk ({self.kept}{each_run})"]
        if self.peak is not None:
            lines.append(self.peak.text())
        if self.save_every:
            each = (f"{_size(self.checkpoint_bytes)} written each time (weights and optimizer state)"
                    if self.checkpoint_bytes else "the LoRA adapter each time")
            if self.what == "run":
                kept = "all kept" if not self.keep_checkpoints else f"the newest {self.keep_checkpoints} kept"
                lines.append(f"  checkpoints every {self.save_every} step{'s' * (self.save_every != 1)}: {each}, "
                             f"{kept}")
            else:
                lines.append(f"  checkpoints every {self.save_every} step{'s' * (self.save_every != 1)}, so that "
                             f"Ctrl-C loses little (the same command resumes): {each}, the newest kept while a run "
                             "trains")
        elif self.save_minutes is not None:
            each = (f"{_size(self.checkpoint_bytes)} each (weights and optimizer state)" if self.checkpoint_bytes
                    else "the LoRA adapter each")
            lines.append(f"  a checkpoint after every {self.save_minutes:g} minutes of a run's training, so that "
                         f"Ctrl-C loses at most that much (the same command resumes): {each}, the newest kept")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            lines.append(f"  (the machine is busy now: load {load:.1f} on {cores} cores; on an idle machine it would "
                         "take less)")
        if self.seconds > SLOW:
            lines.append(f"  that is long for this machine: --limit {max(16, self.examples // 4)} or --max-steps "
                         f"{max(4, self.steps // 4)} brings it to about a quarter"
                         f"{' (--preset cpu-quick for a first look)' if self.preset != 'cpu-quick' else ''}; on a "
                         f"GPU the same {self.what} takes minutes (docs/scaling.md)")
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _duration(s: float) -> str:
    return f"~{s / 3600:.1f} h" if s >= 5400 else f"~{max(1, round(s / 60))} min"


def estimate(s, data: dict, base, runs: int) -> Cost:
    """The cost of `runs` runs of `base` (the compare's settings `s`, its materialised `data`)."""
    seq = min((data["stats"].get("sequence_tokens") or {}).get("mean") or base.max_length, base.max_length)
    steps = data["steps"]
    row = base.max_length if base.packing else seq  # a packed row is (nearly) full; an unpacked one one example
    tokens = int(min(steps * base.batch_size * base.grad_accum * row,
                     seq * data["n_train"] * (base.epochs if base.max_steps is None else float("inf"))))
    every = base.eval_every or steps
    evals = 1 + steps // every + (1 if steps % every else 0)
    eval_examples = data["n_val"] + data["n_test"] + (base.eval_train_sample or 0)
    # scored after training: the train side of the gap unless the trainer's last evaluation scored it (its fixed
    # sample); test.jsonl is the trainer's own evaluation set, scored at the last step (imtune.experiments.score)
    scored = {None: 0 if base.eval_train_sample else data["n_train"], "all": data["n_train"]}.get(
        s.loss_samples, s.loss_samples)
    ev = s.eval_settings()
    gens = ev.get("exact_match", 0) + ev.get("bleu_samples", 0)
    new = ev.get("max_new_tokens") or 64
    train_tps, gen_tps, params = measure(base)
    keep = getattr(s, "keep", "both")  # --keep: the models left on disk once a run is evaluated
    kept, copies = {"both": ("final/ and best/", 2), "final": ("final/", 1), "best": ("best/", 1),
                    "none": ("no models", 0)}[keep]
    per_run = seconds(tokens, (evals * eval_examples + scored) * seq, gens * new, train_tps, gen_tps)
    return Cost(runs=runs, examples=data["n_train"], tokens=tokens, steps=steps, evals=evals,
                eval_examples=eval_examples, generations=gens, max_new_tokens=new, train_tokens_per_s=train_tps,
                gen_tokens_per_s=gen_tps, disk_bytes=runs * copies * weight_bytes(base) * params,
                seconds=runs * per_run, kept=kept, save_every=base.save_every if runs else None,
                save_minutes=base.save_every_minutes if runs else None,
                checkpoint_bytes=0 if base.lora else 3 * 4 * params, peak=peak(base), preset=base.preset)


def of_run(cfg, examples, sched, eval_sets: dict, save_dtype: str) -> Cost:
    """The cost of one `imtune train` run of `cfg`: its `examples` (imtune.types.Examples), Schedule and evaluation
    sets (track.eval_sets) as train.setup computed them; `save_dtype` (fp32|bf16) of final/ and best/. Evaluation
    points as fit makes them: step 0, every --eval-every before the end, and the end."""
    per_epoch = sum(lengths_of(examples))
    tokens = round(per_epoch * sched.total_steps / sched.steps_per_epoch)  # the last epoch may be partial
    steps = sched.total_steps
    every = cfg.eval_every or steps
    evals = (1 + steps // every + (1 if steps % every else 0)) if eval_sets else 0
    eval_tokens = sum(sum(lengths_of(ex)) for ex, _ in eval_sets.values())
    train_tps, gen_tps, params = measure(cfg)
    per_param = 2 if save_dtype == "bf16" else 4
    n_ckpt = (steps // cfg.save_every + (1 if steps % cfg.save_every else 0)) if cfg.save_every else 0
    n_ckpt = min(n_ckpt, cfg.keep_checkpoints or n_ckpt)
    ckpt = 0 if cfg.lora else 3 * 4 * params  # weights and AdamW's two moments, fp32
    return Cost(runs=1, examples=len(examples), tokens=tokens, steps=steps, evals=evals,
                eval_examples=sum(len(ex) for ex, _ in eval_sets.values()), generations=0, max_new_tokens=0,
                train_tokens_per_s=train_tps, gen_tokens_per_s=gen_tps,
                disk_bytes=(1 + cfg.keep_best) * per_param * params + n_ckpt * ckpt,
                seconds=seconds(tokens, evals * eval_tokens, 0, train_tps, gen_tps),
                kept=f"final/{' and best/' if cfg.keep_best else ''} in {save_dtype}"
                     + (f", {n_ckpt} checkpoint{'s' * (n_ckpt != 1)}" if n_ckpt else ""), preset=cfg.preset,
                save_every=cfg.save_every, save_minutes=cfg.save_every_minutes, checkpoint_bytes=ckpt, what="run",
                epochs=steps / sched.steps_per_epoch, keep_checkpoints=cfg.keep_checkpoints, peak=peak(cfg))


def weight_bytes(cfg) -> int:
    """Bytes per parameter of the final/ and best/ copies a run of `cfg` saves (imtune.train.saving.save_dtype)."""
    return 2 if save_dtype(cfg, resolve(cfg.precision).used) == "bf16" else 4


def seconds(train_tokens: float, forward_tokens: float, generated: float, train_tps: float, gen_tps: float) -> float:
    """The time of training, forward-only passes (evaluation, scoring) and greedy generation at the measured rates: a
    forward pass costs about a third of forward + backward."""
    return train_tokens / train_tps + forward_tokens / (3 * train_tps) + generated / gen_tps



def peak(cfg):
    """The estimated peak memory of training `cfg` (an imtune.model.memory.Peak: weights, gradients and AdamW moments,
    the --keep-best copy, one pass's activations, a loss chunk) as the run's memory plan will spend it
    (imtune.model.memory.plan: under --memory-limit); None where the model's shape cannot be read from its config."""
    import torch

    shape = model_shape(cfg.model)
    if shape is None:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return memory_plan(cfg, shape, device, available_bytes()).peak


def grid_text(costs: list[Cost], what: str) -> str:
    """One line adding up the plans of a grid's comparisons (a study's values): runs, time and disk in all."""
    runs, seconds, disk = (sum(getattr(c, k) for c in costs) for k in ("runs", "seconds", "disk_bytes"))
    line = (f"{what}: {runs} run(s) to train in {len(costs)} comparison(s); estimated {_duration(seconds)} on this "
            f"machine in all, {_size(disk)} of disk")
    if seconds > SLOW:
        line += " (long for this machine: --budget STEPS caps every run; on a GPU it takes minutes)"
    return line


def measure(base) -> tuple[float, float, int]:
    """(training tokens/s, generated tokens/s, parameters) of base.model on this machine: one warm-up and one timed
    training step on a row of min(max_length, 256) tokens, then eight greedy tokens. Measured once per model and row
    length in a process (a study plans one comparison per value), and kept MEASURE_HOURS (IMTUNE_MEASURE_HOURS) on
    disk for the same model (its fingerprint), row, threads, torch and CPU: a repeated compare does not load the
    model once more to plan (7 s of a 99 s default-model compare here). IMTUNE_NO_CACHE=1 measures every time."""
    return _measure(base.model, min(base.max_length, 256))


MEASURE_HOURS = 24.0  # IMTUNE_MEASURE_HOURS overrides it (0: measure every time; the test suite's setting)


def measure_hours() -> float:
    try:
        return max(0.0, float(os.environ.get("IMTUNE_MEASURE_HOURS", MEASURE_HOURS)))
    except ValueError:
        return MEASURE_HOURS


@functools.lru_cache(maxsize=4)
def _measure(spec: str, n: int) -> tuple[float, float, int]:
    key = _measure_key(spec, n)
    kept = _read_measure(key) if key else None
    if kept is not None:
        return kept
    rates = _measure_now(spec, n)
    if key:
        try:
            files.write_json(cache_dir() / "measure" / f"{key}.json", {"rates": list(rates), "at": time.time()})
        except (OSError, UsageError):  # a read-only or full cache directory, or a link planted in it: no plan stops
            pass
    return rates


def _measure_key(spec: str, n: int) -> str | None:
    """What the measurement depends on, hashed; None (not kept) for a model without a local fingerprint or with the
    cache off."""
    import platform

    import torch

    if not measure_hours() or os.environ.get("IMTUNE_NO_CACHE", "") not in ("", "0"):
        return None
    fp = model_fingerprint(spec).get("fingerprint")
    if not fp:
        return None
    what = [fp, spec, n, torch.__version__, torch.get_num_threads(), platform.machine(), cpu_model(),
            torch.cuda.is_available()]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


def _read_measure(key: str) -> tuple[float, float, int] | None:
    """A kept measurement, or None: absent, older than MEASURE_HOURS, a link, or not three positive finite numbers
    (the cache directory is not trusted)."""
    path = cache_dir() / "measure" / f"{key}.json"
    try:
        if path.is_symlink() or time.time() - path.stat().st_mtime > 3600 * measure_hours():
            return None
        d = json.loads(path.read_text(encoding="utf-8"))
        train_tps, gen_tps, params = d["rates"]
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
                 for x in (train_tps, gen_tps, params))
        return (float(train_tps), float(gen_tps), int(params)) if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _measure_now(spec: str, n: int) -> tuple[float, float, int]:
    import torch

    model = load_model(spec)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # steps nothing: only the time of a step is wanted
    for _ in range(2):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.zero_grad(set_to_none=True)
        took = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids[:, :32], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        gen = 8 / (time.perf_counter() - t0)
    return n / took, gen, n_params(model)
