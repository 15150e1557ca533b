"""`evaluate_run`: a run's train and held-out loss per token class, on data read exactly as training read it.

    RunDir (imtune.rundir.read) ─▶ Scoring + DataSet per side (as_trained) ─▶ evaluate_loss per side ─▶ RunEval (+ gap)

The run's TrainConfig says how its data became examples: format, field mapping, roles, on_invalid and limit (how
records became conversations), template, system prompt, max_length, truncation and special-token policy (how
conversations became tokens and classes). The training data is re-read with all of them, so the train loss is over
what the model trained on and the gap (held-out − train, the paper's overfitting measure) compares like with like;
the run's held-out data (eval_data) is read the same way. Scored any other way, a run trained with `--system-prompt
TEXT` would count its system tokens as template tokens, and one trained with `--field output=response` would not
read its own data at all.

`imtune eval` and `imtune compare` both call evaluate_run; the gap is computed once, by imtune.evaluate.loss.gap."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from imtune.data.prepare import load
from imtune.data.templates import Renderer
from imtune.evaluate.loss import evaluate_loss, gap
from imtune.model.models import load_model, load_tokenizer
from imtune.rundir.read import RunDir
from imtune.types import Conversation


@dataclass(frozen=True)
class DataSet:
    """Data to score and how its records become conversations (imtune.data.prepare.load's arguments)."""

    data: str | tuple[Conversation, ...]  # a path / hf: spec, or conversations given in code
    format: str = "auto"
    fields: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)
    on_invalid: str = "error"
    limit: int | None = None

    @property
    def label(self) -> str:
        return self.data if isinstance(self.data, str) else f"{len(self.data)} conversations"


@dataclass(frozen=True)
class Scoring:
    """How conversations become scored tokens: template, system prompt, max length, truncation, special tokens."""

    template: str | None = None  # None: the tokenizer's own chat template (a run's final/ holds the one trained with)
    system_prompt: str = "default"
    max_length: int | None = None
    truncation: str = "truncate"  # over-long examples: score their first max_length tokens, or "drop" them
    special_tokens_in_content: str = "split"

    def renderer(self, tokenizer):
        """The Renderer of this template and system prompt (also what generation for this run should use)."""
        return Renderer(self.template, tokenizer, self.system_prompt)


@dataclass(frozen=True)
class SetEval:
    """One scored data set: the conversations read, and evaluate_loss's result (None when loss was not asked)."""

    data: DataSet
    conversations: tuple[Conversation, ...]
    loss: dict | None  # {"n", "tokens", "output", "instruction", "all", "per_class", "truncated", "skipped", ...}


@dataclass(frozen=True)
class RunEval:
    """The train and held-out sides of an evaluation (either may be absent) and their gap."""

    scoring: Scoring
    template: str  # the renderer's name
    train: SetEval | None
    heldout: SetEval | None
    gap: dict | None  # held-out − train mean NLL per group and class (evaluate.loss.gap); None without both sides

    @property
    def output_gap(self) -> float | None:
        """Held-out minus train output-token loss: the overfitting measure `compare` reports."""
        return self.gap["output"] if self.gap else None


AS_TRAINED = "as-trained"  # evaluate_run's default for either side: the run's own data, read as training read it


def scoring_as_trained(run: RunDir) -> Scoring:
    c = run.config
    return Scoring(run.template, c.system_prompt, c.max_length, c.truncation, c.special_tokens_in_content)


def training_data(run: RunDir, limit: int | None = None) -> DataSet:
    """RUN's training data as training read it; `limit` can only shorten the run's own limit."""
    c = run.config
    limit = min([x for x in (limit, c.limit) if x] or [0]) or None
    return DataSet(run.data_path(c.data), c.format, dict(c.fields), dict(c.roles), c.on_invalid, limit)


def heldout_data(run: RunDir, limit: int | None = None) -> DataSet | None:
    """RUN's held-out data (eval_data), read with the run's format, fields and roles, as training read it."""
    c = run.config
    path = run.data_path(c.eval_data)
    return DataSet(path, c.format, dict(c.fields), dict(c.roles), c.on_invalid, limit) if path else None


def read_set(ds: DataSet) -> tuple[list[Conversation], list]:
    """(conversations, records skipped as invalid) of a data set."""
    if not isinstance(ds.data, str):
        convs = list(ds.data)
        return (convs[:ds.limit] if ds.limit else convs), []
    return load(ds.data, ds.format, ds.fields or None, ds.on_invalid, ds.limit, ds.roles or None)


def evaluate_run(run: RunDir | None, model=None, tokenizer=None, *, train: DataSet | str | None = AS_TRAINED,
                 heldout: DataSet | str | None = AS_TRAINED, scoring: Scoring | None = None, limit: int | None = None,
                 batch_size: int = 8, loss: bool = True, per_example: bool = False, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> RunEval:
    """Train and held-out loss per token class of a run's model (or of `model`), and their gap.

    train / heldout: AS_TRAINED (default) = the run's own data (config `data` / `eval_data`) read exactly as
    training read it (at most `limit` conversations); a DataSet = that data; None = that side is not scored.
    scoring: None = the run's (template, system prompt, max_length, truncation, special tokens).
    model / tokenizer: None = RUN/final's (loaded on the CPU: pass `model` placed elsewhere). loss=False only reads
    the data sets (for generation without loss).
    per_example=True adds each set's per-example output sums (loss["per_example"], for the intervals of compare)."""
    say = log or (lambda _msg: None)
    if run is not None:
        scoring = scoring or scoring_as_trained(run)
        train = training_data(run, limit) if train == AS_TRAINED else train
        heldout = heldout_data(run, limit) if heldout == AS_TRAINED else heldout
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(run.final))
        model = model if model is not None or not loss else load_model(str(run.final))
    scoring = scoring or Scoring()
    renderer = scoring.renderer(tokenizer)
    sides = {}
    for name, ds in (("train", train), ("held-out", heldout)):
        if ds is None or ds == AS_TRAINED:
            sides[name] = None
            continue
        convs, skipped = read_set(ds)
        if skipped:
            say(f"{len(skipped)} invalid records of {ds.label} skipped (--on-invalid skip)")
        res = None
        if loss:
            say(f"loss on {ds.label} ({len(convs)} conversations)")
            res = evaluate_loss(model, tokenizer, renderer, convs, scoring.max_length, batch_size,
                                truncation=scoring.truncation, progress=progress, per_example=per_example,
                                special_tokens_in_content=scoring.special_tokens_in_content)
            res["skipped"] = [str(p) for p in skipped] + res["skipped"]
            if res["truncated"] or res["skipped"]:
                say(f"  {res['truncated']} truncated to {scoring.max_length} tokens, {len(res['skipped'])} left out")
        sides[name] = SetEval(ds, tuple(convs), res)
    tr, ho = sides["train"], sides["held-out"]
    both = tr is not None and ho is not None and tr.loss is not None and ho.loss is not None
    return RunEval(scoring, renderer.name, tr, ho, gap(tr.loss, ho.loss) if both else None)
