"""Training configuration: one dataclass, whose fields are at once the YAML keys and the `imtune train` flags.

Precedence, lowest first: field defaults < `--preset` < CONFIG.yaml < flags given on the command line. The resolved
config (what was asked + defaults) is printed at the start of a run and saved as RUN/config.yaml, which is itself a
valid CONFIG.yaml: `imtune train RUN/config.yaml` repeats the run.

    cfg = TrainConfig(data="lima.jsonl", loss="im", max_steps=100)     # Python
    cfg = TrainConfig.from_yaml("configs/lima-im.yaml")                 # YAML
    cfg = TrainConfig.from_args(args)                                   # CLI (imtune.commands.train)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from imtune.data.formats import parse_roles
from imtune.data.load import check_fields, parse_fields
from imtune.data.weights import LOSS_MODES, loss_spec
from imtune.types import UsageError


def _f(default, help: str, type=None, choices=None, **flag):
    """A config field. `help` is its one description: the YAML key's and the flag's (`imtune train --help`, and the
    other commands that share the flag take it from here: imtune.commands.common). `type` is needed where the
    default is None; `flag`: argparse extras where the flag is not simply --the-field-name (name, dest, metavar,
    action)."""
    meta = dict(help=help, type=type or default.__class__, choices=choices, flag=flag)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # -- model ---------------------------------------------------------------------------------------------------
    model: str = _f("default", "hub id, local directory, run directory, 'default' (embedded SmolLM2-135M-Instruct) "
                               "or 'random:<size>' (tiny, small, smollm2-135m, 1b)")
    template: str | None = _f(None, "tulu (the paper's), chatml, alpaca, model (the tokenizer's own) or a .jinja file; "
                                    "default: the tokenizer's own chat template when it has one, else tulu", str)
    system_prompt: str = _f("default", "default: as the template renders (the model's own may inject a default system "
                                       "prompt, e.g. SmolLM2's); none: without it (an empty system message where the "
                                       "template would inject one); TEXT: this system message. Records' own system "
                                       "messages always win; the template saved with a run makes the same choice "
                                       "when serving", metavar="none|default|TEXT")
    lora: bool = _f(False, "train a LoRA adapter (peft) instead of every weight")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA path")
    lora_targets: str = _f("all-linear", "modules to adapt: all-linear or a comma-separated list of module names")
    merge_lora: bool = _f(False, "merge the adapter into the weights of final/ (else final/ holds the adapter)")
    precision: str = _f("auto", "auto (bf16 on a GPU that has it; on a CPU bf16 only where a few timed "
                                "training steps of a model shaped like this one run ≥1.3× faster in it, else "
                                "fp32), fp32 or bf16 (mixed: fp32 master weights, bf16 autocast)",
                        choices=["auto", "fp32", "bf16"])
    save_dtype: str = _f("auto", "dtype of the final/ and best/ weights: auto = the precision trained in (bf16 "
                                 "autocast: bf16 copies, half the disk), fp32 or bf16; checkpoints stay fp32 (exact "
                                 "resume); a run's bf16 final/ still loads in fp32 for evaluation",
                         choices=["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, ~30%% slower)")
    attn_implementation: str | None = _f(None, "attention kernel passed to transformers: sdpa (its default), "
                                         "flash_attention_2 (needs flash-attn), flex_attention or eager", str)
    compile: bool = _f(False, "torch.compile each decoder layer (one compiled layer reused by all; pays a compile "
                              "at the first steps)")
    # -- data ----------------------------------------------------------------------------------------------------
    data: str = _f("", "training data: JSONL/JSON/Parquet/CSV file or hf:owner/name[:split]")
    format: str = _f("auto", "auto, messages, alpaca, prompt_completion or sharegpt")
    # YAML: fields: {output: response} or {output: [output, response]} (the first a record has); roles: {bot: assistant}
    fields: dict = _f({}, "read canonical field NAME from record key KEY, e.g. --field output=response; ordered "
                          "alternatives, the first a record has: --field output=output|response (repeatable)",
                      name="--field", dest="field", action="append", metavar="NAME=KEY[|KEY2]")
    roles: dict = _f({}, "map a role spelling of the data to user/assistant/system, e.g. --role bot=assistant "
                         "(ShareGPT's human and gpt are known already; repeatable)",
                     name="--role", dest="role", action="append", metavar="NAME=ROLE,...")
    on_invalid: str = _f("error", "bad records: stop and list them, or skip them and say how many and why",
                         choices=["error", "skip"])
    max_length: int = _f(1024, "maximum tokens per example (and per packed row when training)")
    truncation: str = _f("drop", "over-long examples: drop them (counted) or keep their first --max-length tokens",
                         choices=["drop", "truncate"])
    special_tokens_in_content: str = _f("split", "content that spells a control token (a user message holding "
                                                 "'<|im_end|>'): split = tokenize it as plain text (the template's "
                                                 "own control tokens stay special), keep = as the control token, "
                                                 "error = refuse the record (path:line)",
                                        choices=["split", "keep", "error"])
    packing: bool = _f(True, "pack several examples into each row (attention never crosses examples); "
                             "--no-packing gives one right-padded row per example")
    limit: int | None = _f(None, "use only the first N records of --data", int)
    # -- loss ----------------------------------------------------------------------------------------------------
    loss: str = _f("it", "it: output tokens only; im: instruction + output (not template); all: every token; "
                         "weighted: instruction tokens at --prompt-weight")  # choices: weights.LOSS_MODES
    prompt_weight: float | None = _f(None, "λ for --loss weighted", float)
    weights: str | None = _f(None, "override class weights, e.g. user=0.1,system=0,template=0 (classes: template, "
                                   "system, user, assistant, eot)", str, metavar="CLASS=W,...")
    last_turn_only: bool = _f(False, "only the last assistant turn is output; earlier turns get the prompt weight",
                              action="store_true")
    normalize: str = _f("tokens", "tokens: Σw·nll / Σw over the whole optimizer step (every weighted token counts "
                                  "the same); sequences: each example's weighted mean, averaged over examples; "
                                  "nonzero: Σw·nll / the number of tokens with w > 0 in the step (Weighted "
                                  "Instruction Tuning's convention)",
                        choices=["tokens", "sequences", "nonzero"])
    neftune_alpha: float = _f(0.0, "NEFTune: add uniform noise of scale alpha/sqrt(L·d) to the input embeddings "
                                   "while training (L = the example's own length); 0 = off (the paper used 5)")
    kl_coef: float = _f(0.0, "λ of the KL(p_model ‖ p_start) regulariser on weighted positions; 0 = off")
    chunk_size: int = _f(1024, "positions per chunk of the chunked cross-entropy (memory knob)")
    memory_limit: float | None = _f(None, "GB of memory a run may hold at its peak, on a CPU (default: 80%% of the "
                                          "memory available when it starts). A run estimated above it is planned "
                                          "for less, at some speed (imtune.model.memory.plan): best/ written at "
                                          "once instead of held, a smaller loss chunk, gradient checkpointing, "
                                          "passes of fewer tokens, freed memory given back at once",
                                    float, metavar="GB")
    # -- optimisation --------------------------------------------------------------------------------------------
    epochs: float = _f(2.0, "passes over the data (ignored when --max-steps is given)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (the schedule spans them)", int)
    batch_size: int = _f(4, "micro-batch per process: packed rows (packing) or examples (--no-packing)")
    grad_accum: int = _f(1, "micro-batches per process per optimizer step")
    effective_batch: int | None = _f(None, "rows per optimizer step over all processes; sets --grad-accum to "
                                           "effective_batch / (batch_size × processes)", int)
    micro_batch_tokens: str = _f("auto", "run each micro-batch as forward/backward passes of at most N positions "
                                         "(rows × the longest row; a row is never cut): less activation memory, "
                                         "the same optimizer step (the loss is normalised over the whole step). "
                                         "auto: on a CPU as many as ~1.5 GiB of activations hold (SmolLM2-135M: "
                                         "one row of 1,024 per pass), no cap on a GPU; none: one pass per "
                                         "micro-batch", metavar="N|auto|none")
    lr: float | None = _f(None, "peak learning rate (default: 2e-5, or 2e-4 with --lora)", float)
    lr_schedule: str = _f("linear", "decay after warm-up", choices=["linear", "cosine", "constant"])
    warmup_ratio: float = _f(0.03, "share of the steps spent warming up linearly")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only, never biases or norms)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0 = no clipping")
    seed: int = _f(42, "seed for initialisation (random:* models), data order, dropout and noise")
    # -- run -----------------------------------------------------------------------------------------------------
    output_dir: str | None = _f(None, "run directory (default: runs/<data>-<loss>-<time>)", str)
    save_every: int | None = _f(None, "write a checkpoint every N optimizer steps (and at the end)", int)
    save_every_minutes: float | None = _f(None, "write a checkpoint after the optimizer step that ends M minutes of "
                                                "training since the last one (0: after every step; none at the end, "
                                                "where final/ is written)", float)
    keep_checkpoints: int = _f(2, "keep only the newest N checkpoints (0: keep all)")
    resume: str | None = _f(None, "continue from the newest complete checkpoint in --output-dir (bare --resume), "
                                  "or from a given checkpoint directory", str)
    allow_change: str | None = _f(None, "with --resume: settings that may differ from the run's, comma-separated "
                                        "(e.g. max_steps,lr); recorded in RUN/changes.jsonl. Other changes are "
                                        "refused", str)
    eval_data: str | None = _f(None, "held-out data: output-token (IT) loss is logged on it", str)
    val_data: str | None = _f(None, "validation data: output-token loss logged as val_output_loss; --keep-best "
                                    "selects on it (never on --eval-data when both are given)", str)
    keep_best: bool = _f(False, "keep the model of the evaluation point with the lowest held-out output loss in "
                                "RUN/best/ (same format as final/; on --val-data if given, else --eval-data; "
                                "best.json alone when it is the last step's, final/'s, model)")
    eval_every: int | None = _f(None, "evaluate every N steps (also at the start and the end)", int)
    eval_train_sample: int = _f(64, "training examples in the fixed sample whose output loss is tracked (the same "
                                    "sample for every seed)")
    log_class_losses: bool = _f(True, "log loss_output / loss_instruction every step (costs an extra "
                                      "forward-only pass over untrained positions)")
    tensorboard: bool = _f(False, "also write TensorBoard events to RUN/tensorboard")
    progress: bool = _f(True, "show a progress bar on stderr")
    threads: int | None = _f(None, "torch CPU threads per process (default: torch's, split among local processes)",
                             int)
    preset: str | None = _f(None, "start from a named recipe: paper (the IM paper's), cpu-quick (a first look on a "
                                  "laptop CPU)", str,
                            choices=["paper", "cpu-quick"])

    # -- building ------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Fields from a mapping (YAML, flags); unknown keys are an error that lists the valid ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            guesses = {k: difflib.get_close_matches(k, list(known), n=1, cutoff=0.6) for k in unknown}
            meant = "; ".join(f"did you mean {g[0]!r} for {k!r}?" for k, g in guesses.items() if g)
            raise UsageError(f"unknown config key(s) {', '.join(unknown)}{'; ' + meant if meant else ''}; valid: "
                             f"{', '.join(known)}")
        if d.get("fields"):  # `fields: {output: [output, response]}` or `output|response`: one form (imtune.data.load)
            d = {**d, "fields": check_fields(d["fields"]) if isinstance(d["fields"], dict) else d["fields"]}
        return cls(**{k: _coerce(known[k], v) for k, v in d.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> TrainConfig:
        base = read_yaml(path)
        preset = (overrides or {}).get("preset", base.get("preset"))
        return cls.from_dict({**preset_fields(preset), **base, **(overrides or {})})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config `imtune train` asked for: flags given > CONFIG.yaml > --preset > defaults.

        With a bare --resume and no CONFIG.yaml, the run directory's own config.yaml is the base."""
        given = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
        if "field" in vars(args):
            given["fields"] = parse_fields(args.field)
        if "role" in vars(args):
            given["roles"] = parse_roles(args.role)
        base: dict = {}
        positional = getattr(args, "config", None)
        if positional and Path(positional).suffix.lower() not in (".yaml", ".yml"):  # `imtune compare my.json`
            if "data" in given:
                raise UsageError(f"{positional}: a data file given twice (positionally and as --data "
                                 f"{given['data']}); a positional CONFIG must end in .yaml or .yml")
            given["data"], positional = positional, None
        if positional:
            base = read_yaml(positional)
        elif given.get("resume") and given.get("output_dir") and (Path(given["output_dir"]) / "config.yaml").exists():
            base = read_yaml(Path(given["output_dir"]) / "config.yaml")
        preset = given.get("preset", base.get("preset"))
        return cls.from_dict({**preset_fields(preset), **base, **given})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # -- checking ------------------------------------------------------------------------------------------------
    def check(self) -> TrainConfig:
        """Raise UsageError for values that cannot work; return self."""
        if not self.data:
            raise UsageError("no training data: give --data FILE (or `data:` in the config file)")
        for name in ("batch_size", "grad_accum", "max_length", "chunk_size", "lora_r"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} must be >= 1, not {getattr(self, name)}")
        for name in ("max_steps", "save_every", "eval_every", "effective_batch", "threads", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} must be >= 1 when given, not {getattr(self, name)}")
        for name in ("neftune_alpha", "kl_coef", "weight_decay", "max_grad_norm", "warmup_ratio", "lora_dropout",
                     "epochs", "eval_train_sample", "keep_checkpoints"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise UsageError(f"--{_flag(name)} must be a finite number >= 0, not {v}")
        if self.save_every_minutes is not None and not (math.isfinite(self.save_every_minutes)
                                                        and self.save_every_minutes >= 0):
            raise UsageError(f"--save-every-minutes must be a finite number >= 0, not {self.save_every_minutes}")
        if self.memory_limit is not None and not (math.isfinite(self.memory_limit) and self.memory_limit > 0):
            raise UsageError(f"--memory-limit must be a number of GB > 0, not {self.memory_limit}")
        mbt = str(self.micro_batch_tokens)
        if mbt not in ("auto", "none") and not (mbt.isdigit() and int(mbt) >= 1):
            raise UsageError(f"--micro-batch-tokens must be auto, none or a number of tokens >= 1, not {mbt!r}")
        if self.warmup_ratio >= 1:
            raise UsageError(f"--warmup-ratio must be < 1, not {self.warmup_ratio}")
        if self.max_steps is None and self.epochs <= 0:
            raise UsageError("--epochs must be > 0 (or give --max-steps)")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a finite number > 0, not {self.lr}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise UsageError(f"--{_flag(f.name)} {getattr(self, f.name)!r}: valid: {', '.join(choices)}")
        if self.keep_best and not (self.val_data or self.eval_data):
            raise UsageError("--keep-best needs held-out data to select on: give --val-data (or --eval-data)")
        if self.merge_lora and not self.lora:
            raise UsageError("--merge-lora needs --lora")
        loss_spec(self.loss, self.prompt_weight, self.weights, self.last_turn_only)  # raises on a bad loss
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 2e-5)


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))

# Named recipes: field values applied before CONFIG.yaml and flags (so both can still change them).
PRESETS: dict[str, dict] = {
    # Instruction Modelling (Shi et al. 2024), following Open-Instruct: AdamW at 2e-5 decaying linearly after 3%
    # warm-up, no weight decay, 2 epochs, 2,048 tokens, 128 examples per optimizer step (via accumulation: padded
    # batches, so a row is an example), bf16 where the hardware has it.
    "paper": dict(lr=2e-5, lr_schedule="linear", warmup_ratio=0.03, weight_decay=0.0, epochs=2.0, max_length=2048,
                  effective_batch=128, packing=False, precision="auto", template="tulu"),
    # A first look on a laptop CPU: the first 256 records, rows of 512 tokens, at most 40 optimizer steps, evaluations
    # every 10 steps on a train sample of 16. Minutes, not hours; it decides little (the verdict says so).
    "cpu-quick": dict(limit=256, max_length=512, max_steps=40, eval_every=10, eval_train_sample=16, lr=1e-4),
}


def preset_fields(name: str | None) -> dict:
    if name is None:
        return {}
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return {**PRESETS[name], "preset": name}


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: config file not found")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise UsageError(f"{p}: a config file must be a mapping of field: value")
    return d


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field, v):
    """YAML and flags give strings for some numbers (PyYAML reads `2e-5` as a string): convert to the field's type."""
    kind = f.metadata["type"]
    if v is None or isinstance(v, kind) and not (kind is int and isinstance(v, bool)):
        return v
    try:
        if kind is bool:
            if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
                return v.lower() in ("true", "yes", "1")
            raise ValueError
        if kind is int and isinstance(v, float) and v.is_integer():
            return int(v)
        if kind in (int, float, str):
            return kind(v)
    except (TypeError, ValueError):
        pass
    raise UsageError(f"{f.name}: expected {kind.__name__}, got {v!r}")


# -- flags ----------------------------------------------------------------------------------------------------------
ALIASES = {"lr": ["--learning-rate"], "grad_accum": ["--gradient-accumulation-steps"]}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag, its help the field's. Defaults are SUPPRESSed so that from_args sees only
    what was typed (and CONFIG.yaml / --preset values are not overridden)."""
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG.yaml|DATA",
                   help="CONFIG.yaml (fields as below; flags override it), or the training data file itself (any "
                        "name not ending in .yaml/.yml is taken as --data)")
    for f in dataclasses.fields(TrainConfig):
        meta, extra = f.metadata, dict(f.metadata["flag"])
        names = [extra.pop("name", f"--{_flag(f.name)}"), *ALIASES.get(f.name, [])]
        kw = {"dest": f.name, "help": meta["help"], **extra}
        if "action" in kw:
            pass
        elif meta["type"] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "resume":
            kw.update(nargs="?", const="auto", metavar="CHECKPOINT")
        else:
            choices = list(LOSS_MODES) if f.name == "loss" else meta.get("choices")
            kw.update(type=str.lower if choices and meta["type"] is str else meta["type"], choices=choices)
        p.add_argument(*names, **kw)
    defaults = TrainConfig()
    for action in p._actions:
        if action.dest in ("help", "config"):
            continue
        d = getattr(defaults, {"field": "fields", "role": "roles"}.get(action.dest, action.dest), None)
        if action.help and "default" not in action.help and d not in (None, {}, ""):
            action.help += f" (default: {d})"
        action.default = argparse.SUPPRESS


def field_help(name: str) -> str:
    """The help of TrainConfig field `name`: what the commands that share its flag print (imtune.commands.common)."""
    return TRAIN_FIELDS[name].metadata["help"]


TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
