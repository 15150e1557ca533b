"""compare's final evaluation of one arm's run: `evaluate_arm(...) -> results` (cached in RUN/eval/compare.json).

    output loss on a sample of the training data and on test.jsonl, their gap   the trainer's own scores of final/
                                                                               (scored_in_training: its last
                                                                               evaluation of test.jsonl and of its
                                                                               fixed train sample), else
                                                                               imtune.evaluate.run.evaluate_run
                                                                               (--loss-samples N|all: N or every
                                                                               training example, scored here)
    memorisation BLEU, test exact match, benchmarks                             generation_scores, benchmarks
    best/ (selected on val.jsonl) scored on test.jsonl like final/; when best/ is the model of the last step it is
    final/ itself, and final/'s test score is its score (never loaded or scored twice)
Per-example output sums ride along (results["per_example"]) for the intervals (imtune.experiments.aggregate). Greedy
answers are
kept in RUN/eval/answers.json (imtune.evaluate.answers): evaluated again with other settings, the same weights are not
asked the same prompt twice (benchmarks included). results["time"]: this evaluation's seconds and peak memory per phase
(imtune.train.clock: startup = loading the model, final_scoring, generation); a cached evaluation returns them with
"reused": true."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from imtune import files
from imtune.config import TrainConfig
from imtune.console import say
from imtune.evaluate.answers import Answers
from imtune.evaluate.bleu import generation_rows, memorisation_bleu
from imtune.evaluate.exact import exact_match
from imtune.evaluate.run import DataSet, evaluate_run, scoring_as_trained
from imtune.experiments.arms import Arm, CompareSettings, file_digest, fmt, read_json
from imtune.experiments.data import fixed_sample
from imtune.model.generate import GenerationConfig
from imtune.model.models import load_model, load_tokenizer
from imtune.rundir.read import best_info, read_run
from imtune.tasks import JUDGED, headline, run_benchmark
from imtune.train.clock import Clock


def evaluate_arm(s: CompareSettings, arm: Arm, cfg: TrainConfig, data: dict, what: str) -> dict:
    """Output-token loss on (a sample of) the training data and on the test data, their gap, memorisation BLEU,
    test exact match and benchmarks of RUN/final; the test output loss of RUN/best (when kept). Per-example output
    losses ride along (results["per_example"], for the intervals). Cached in RUN/eval/compare.json per settings.
    The losses are imtune.evaluate.run.evaluate_run's, scored as the run was trained (template, system prompt,
    max length, truncation: the run's own config.yaml)."""
    run = read_run(cfg.output_dir)
    cache = run.path / "eval" / "compare.json"
    key = hashlib.sha256(json.dumps([s.eval_settings(), data["train_path"], data["test_path"],
                                     file_digest(data["train_path"]), file_digest(data["test_path"]),
                                     run.done_text()], sort_keys=True).encode()).hexdigest()[:16]
    cached = read_json(cache)
    if cached and cached.get("key") == key:
        say(f"{what}: already evaluated ({cache}); skipping")
        res = cached["results"]
        return {**res, "time": {**res["time"], "reused": True}} if "time" in res else res

    import torch

    t0, clock, bars = time.perf_counter(), Clock(), s.base.progress
    device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with clock.phase("startup"):
        tok = load_tokenizer(str(run.final))
        model = load_model(str(run.final)).to(device)
    say(f"{what}: evaluating {run.final} on {device}")
    test = DataSet(tuple(data["test"]))
    steps = json.loads(run.done_text())["steps"]
    with clock.phase("final_scoring"):
        trained = scored_in_training(run, data, steps)  # the trainer scored final/ on test.jsonl already
        # and, by default, its fixed sample of training examples (the same for every run) with the final model
        trained_train = scored_in_training(run, data, steps, "train") if s.loss_samples is None else None
        sample = None if s.loss_samples in (None, "all") else s.loss_samples
        ev = None if trained and trained_train else evaluate_run(
            run, model, tok, train=None if trained_train else DataSet(tuple(fixed_sample(data["train"], sample,
                                                                                         cfg.seed, 1))),
            heldout=None if trained else test, per_example=True, progress=bars)
    res: dict = {"per_example": {}}
    res["train"], res["per_example"]["train"] = trained_train or output_loss(ev.train.loss)
    res["heldout"], res["per_example"]["heldout"] = trained or output_loss(ev.heldout.loss)
    ho, tr = res["heldout"]["output_loss"], res["train"]["output_loss"]
    res["gap"] = None if ho is None or tr is None else ho - tr  # evaluate.loss.gap's output entry, either way scored
    with clock.phase("generation"):
        res.update(generation_scores(s, model, tok, scoring_as_trained(run).renderer(tok), run.path, cfg, data,
                                     Answers.of(run.path, model)))
    del model, ev  # before best/ is loaded: one model in memory at a time
    best, info = run.best, best_info(run.path)
    if info is not None:  # the checkpoint selected on val.jsonl, scored on test.jsonl like final/
        info = {k: v for k, v in info.items() if k != "same_as"}
        if best == run.final or info["step"] == steps:  # the last step's model: final/, already scored on test.jsonl
            trained = res["heldout"], res["per_example"]["heldout"]
        else:
            trained = scored_in_training(run, data, info["step"])
        if not trained:
            with clock.phase("startup"):
                model = load_model(str(best)).to(device)
            with clock.phase("final_scoring"):
                scored = evaluate_run(run, model, tok, train=None, heldout=test, per_example=True, progress=bars)
            trained = output_loss(scored.heldout.loss)
            del model, scored
        ho_best, res["per_example"]["best_heldout"] = trained
        res["best"] = {**info, "heldout": ho_best}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["time"] = clock.record()
    files.write_json(cache, {"key": key, "settings": s.eval_settings(), "results": res}, root=run.path)
    say(f"  train output loss {fmt(res['train']['output_loss'])}, test {fmt(res['heldout']['output_loss'])}, "
        f"gap {fmt(res['gap'])}"
        + (f", best checkpoint (step {res['best']['step']}) test {fmt(res['best']['heldout']['output_loss'])}"
           if "best" in res else "")
        + (f", BLEU-to-train {fmt(res['bleu']['corpus_bleu'], 2)}" if "bleu" in res else "")
        + (f", test exact match {res['exact_match']['accuracy']:.1%}" if "exact_match" in res else "")
        + f" ({res['seconds']:.0f}s)")
    return res


def generation_scores(s: CompareSettings, model, tok, renderer, run_dir: Path, cfg: TrainConfig, data: dict,
                      answers=None) -> dict:
    """Memorisation BLEU on a fixed sample of training prompts, test exact match, and the benchmarks of one model
    (answers greedily, rendered as the run was trained; `answers`: imtune.evaluate.answers.Answers of the model, whose
    greedy answers are reused and kept)."""
    res: dict = {}
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, batch_size=8)
    if s.bleu_samples:
        sample = fixed_sample(data["train"], s.bleu_samples, cfg.seed, 2)
        b = memorisation_bleu(model, tok, renderer, sample, gen_cfg=gen, progress=s.base.progress, answers=answers)
        words = [len(r["reference"].split()) for r in b["rows"]]
        res["bleu"] = {"n": b["n"], "corpus_bleu": b["corpus_bleu"], "sentence_bleu_mean": b["sentence_bleu_mean"],
                       "sentence_bleu": b["sentence_bleu"], "signature": b["signature"],
                       "reference_words_mean": sum(words) / max(len(words), 1)}
        files.write_jsonl(run_dir / "eval" / "compare-bleu.jsonl", b["rows"], run_dir)
    if s.exact_match:
        rows = generation_rows(model, tok, renderer, data["test"], gen, limit=s.exact_match, progress=s.base.progress,
                               answers=answers)
        correct = [bool(exact_match(r["output"], r["reference"])) for r in rows if r["reference"] is not None]
        res["exact_match"] = {"n": len(correct), "accuracy": sum(correct) / max(len(correct), 1),
                              "correct": correct}
        files.write_jsonl(run_dir / "eval" / "compare-exact-match.jsonl",
                          [{**r, "correct": exact_match(r["output"], r["reference"])} for r in rows], run_dir)
    if s.bench:
        res["bench"] = benchmarks(s, model, tok, renderer, run_dir, answers)
    return res


def benchmarks(s: CompareSettings, model, tok, renderer, run_dir: Path, answers=None) -> dict:
    """label -> {benchmark, metric, value, n, standard_error, scale, judge} for each --bench of one model (`answers`:
    imtune.evaluate.answers.Answers of the model, whose greedy answers are reused and kept)."""
    out = {}
    for name, path in s.bench:
        say(f"  benchmark {name} ({path}, limit {s.bench_limit or 'none'})")
        judged = name in JUDGED
        b = run_benchmark(name, model, tok, renderer, path, s.bench_limit,
                          out_dir=files.make_dirs(run_dir / "eval" / "bench", run_dir),
                          gen_cfg=GenerationConfig(max_new_tokens=s.bench_max_new_tokens)
                          if s.bench_max_new_tokens else None, progress=s.base.progress, answers=answers,
                          **(s.judge if judged else {}))
        metric, scale = headline(name)
        out[b.get("label", name)] = {
            "benchmark": name, "metric": metric, "value": b.get(metric) if metric else None, "n": b.get("n"),
            "standard_error": b.get("standard_error"), "scale": scale,
            "judge": s.judge.get("judge_model") if judged else None}
    return out


def scored_in_training(run, data: dict, step: int, part: str = "test") -> tuple[dict, dict] | None:
    """(summary, per-example output sums) of the model at `step` on the test data (part "test": the trainer's
    evaluation set `eval` is test.jsonl) or on the trainer's fixed sample of training examples (part "train": its
    set `train`, drawn from train.jsonl, the same sample for every run of a comparison: imtune.train.track), as the
    trainer scored it (metrics.jsonl "eval_examples", read as training reads data), or None when the run did not score
    that part at that step. The model evaluated then is the one saved as final/ (the last step) or best/ (its step),
    so scoring it again would repeat the same forward passes. Sources are named as evaluate_run names them (the
    records that the file holds, line by line), so the intervals pair the same examples however each run was scored."""
    name, path, records, given = {"test": ("eval", data["test_path"], data["test"], run.config.eval_data),
                                  "train": ("train", data["train_path"], data["train"], run.config.data)}[part]
    if given != str(path):
        return None
    at = [r["sets"].get(name) for r in run.metrics("eval_examples") if r["step"] == step]
    if not at or at[-1] is None:
        return None
    p, lines = dict(at[-1]), {f"{path}:{i}": str(c.source) for i, c in enumerate(records, 1)}
    if not all(x in lines for x in p["source"]):
        return None
    p["source"] = [lines[x] for x in p["source"]]
    tokens = sum(p["output_tokens"])
    return ({"n": len(p["source"]), "output_loss": math.fsum(p["output_nll"]) / tokens if tokens else None,
             "output_tokens": tokens, "instruction_loss": None, "scored": f"in training (step {step})"}, p)


def output_loss(r: dict) -> tuple[dict, dict]:
    """(summary, per-example output sums) of one evaluate_loss result (imtune.evaluate.loss, per_example=True)."""
    return ({"n": r["n"], "output_loss": r["output"]["nll"], "output_tokens": r["output"]["tokens"],
             "instruction_loss": r["instruction"]["nll"], "truncated": r["truncated"], "skipped": len(r["skipped"])},
            r["per_example"])
