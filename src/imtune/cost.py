"""What a comparison will cost, said before its first step: `estimate(settings, data, base, runs) -> Cost`.

Counts come from the data and the schedule compare will run (imtune.plan, through compare_data's step estimate):
examples, tokens, optimizer steps, evaluation points × held-out examples, final scoring, greedy generations, disk.
Time comes from this machine, not a constant: one training step of the real model on a row of the real length is
timed (after one warm-up step), and a few greedy tokens; forward-only passes are counted at a third of a training
step per token. It is an estimate (±50% is typical: data loading, saving and evaluation overheads vary), printed so
that a user can shrink a run before spending an afternoon on it (`--dry-run` stops there).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

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
    disk_bytes: int  # the models --keep keeps of every run (fp32 weights)
    seconds: float
    kept: str = "final/ and best/"  # what disk_bytes counts, in words
    save_every: int | None = None  # a checkpoint every N steps (weights + AdamW state: 3× the model in fp32)
    checkpoint_bytes: int = 0

    def text(self) -> str:
        lines = [f"plan: {self.runs} run(s) to train; each {self.examples:,} examples, {self.tokens:,} training "
                 f"tokens in {self.steps:,} optimizer steps; {self.evals} evaluation points × {self.eval_examples:,} "
                 f"examples; {self.generations} greedy answers of ≤ {self.max_new_tokens} tokens",
                 f"  estimated: {_duration(self.seconds)} on this machine (measured: {self.train_tokens_per_s:,.0f} "
                 f"training tokens/s, {self.gen_tokens_per_s:,.1f} generated tokens/s), {self.disk_bytes / 1e9:.1f} "
                 f"GB of disk ({self.kept} of each run)"]
        if self.save_every:
            each = (f"{self.checkpoint_bytes / 1e9:.1f} GB written each time (weights and optimizer state)"
                    if self.checkpoint_bytes else "the LoRA adapter each time")
            lines.append(f"  checkpoints every {self.save_every} step{'s' * (self.save_every != 1)}, so that Ctrl-C "
                         f"loses little (the same command resumes): {each}, the newest kept while a run trains")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            lines.append(f"  (the machine is busy now: load {load:.1f} on {cores} cores; on an idle machine it would "
                         "take less)")
        if self.seconds > SLOW:
            lines.append(f"  that is long for this machine: --limit {max(16, self.examples // 4)} or --max-steps "
                         f"{max(4, self.steps // 4)} brings it to about a quarter (--preset cpu-quick for a first "
                         "look); on a GPU the same comparison takes minutes")
        return "\n".join(lines)


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
    scored = (s.loss_samples or data["n_train"]) + data["n_test"]
    ev = s.eval_settings()
    gens = ev.get("exact_match", 0) + ev.get("bleu_samples", 0)
    new = ev.get("max_new_tokens") or 64
    train_tps, gen_tps, params = measure(base)
    keep = getattr(s, "keep", "both")  # --keep: the models left on disk once a run is evaluated
    kept, copies = {"both": ("final/ and best/", 2), "final": ("final/", 1), "best": ("best/", 1),
                    "none": ("no models", 0)}[keep]
    fwd_tps = 3 * train_tps  # a forward pass costs about a third of forward + backward
    per_run = (tokens / train_tps + evals * eval_examples * seq / fwd_tps + scored * seq / fwd_tps
               + gens * new / gen_tps)
    return Cost(runs=runs, examples=data["n_train"], tokens=tokens, steps=steps, evals=evals,
                eval_examples=eval_examples, generations=gens, max_new_tokens=new, train_tokens_per_s=train_tps,
                gen_tokens_per_s=gen_tps, disk_bytes=runs * copies * 4 * params, seconds=runs * per_run, kept=kept,
                save_every=base.save_every if runs else None, checkpoint_bytes=0 if base.lora else 3 * 4 * params)


def grid_text(costs: list[Cost], what: str) -> str:
    """One line adding up the plans of a grid's comparisons (a study's values): runs, time and disk in all."""
    runs, seconds, disk = (sum(getattr(c, k) for c in costs) for k in ("runs", "seconds", "disk_bytes"))
    line = (f"{what}: {runs} run(s) to train in {len(costs)} comparison(s); estimated {_duration(seconds)} on this "
            f"machine in all, {disk / 1e9:.1f} GB of disk")
    if seconds > SLOW:
        line += " (long for this machine: --budget STEPS caps every run; on a GPU it takes minutes)"
    return line


def measure(base) -> tuple[float, float, int]:
    """(training tokens/s, generated tokens/s, parameters) of base.model on this machine: one warm-up and one timed
    training step on a row of min(max_length, 256) tokens, then eight greedy tokens. Measured once per model and row
    length in a process (a study plans one comparison per value)."""
    return _measure(base.model, min(base.max_length, 256))


@functools.lru_cache(maxsize=4)
def _measure(spec: str, n: int) -> tuple[float, float, int]:
    import torch

    from .models import load_model, n_params

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
