"""RunDir: the one reader of run directories.

A run directory describes itself (imtune.train.loop writes it): RUN/config.yaml is the resolved TrainConfig, RUN/final/
the trained model (with its tokenizer and chat template), RUN/DONE the summary written last, RUN/metrics.jsonl one
line per step and evaluation. Everything that asks "is this a run, and how was it trained" asks here:

    read_run(RUN) -> RunDir(path, config: TrainConfig)       .final, .best, .finished, .done_text(), .metrics(kind)
    find_run(SPEC) -> RunDir | None                          a model spec that names a run (RUN or RUN/final)
    model_dir(DIR) -> DIR/final for a run directory          what `--model RUN` loads (imtune.model.models.resolve);
                      RUN/final for a RUN/best that is final  (RUN/best/best.json "same_as": "final")
    best_info(RUN), best_model(RUN)                          --keep-best's selection and the model it stands for
    read_config(RUN) -> TrainConfig | None                   the comparison of settings (imtune.rundir.guard)
    config_text(RUN), metrics(RUN, kind)                     for reports of runs that may be incomplete

A run directory with a symbolic link among its entries (config.yaml, metrics.jsonl, final/, eval/, checkpoints/...,
two levels down) is refused here, before anything in it is read or written: imtune makes no links, so one came with
a directory from elsewhere and could point a later write anywhere (imtune.files.refuse_links).

Nothing here imports torch: commands that only look at a run start fast."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imtune.config import TrainConfig, read_yaml
from imtune.files import refuse_links
from imtune.rundir.checkpoint import is_finished
from imtune.types import UsageError

CONFIG = "config.yaml"
FINAL = "final"
BEST = "best"  # --keep-best: RUN/best/best.json, with the weights unless they are final/'s (best.json "same_as")
DONE = "DONE"  # imtune.rundir.checkpoint.DONE: written last, after final/
TEMPLATE = "chat_template.jinja"


@dataclass(frozen=True)
class RunDir:
    """A run directory and the TrainConfig it was trained with."""

    path: Path
    config: TrainConfig

    @property
    def final(self) -> Path:
        """The trained model: loads with AutoModelForCausalLM.from_pretrained (tokenizer and template inside)."""
        return self.path / FINAL

    @property
    def best(self) -> Path | None:
        """The model --keep-best selected (best_model): RUN/best, or RUN/final when that is the same model."""
        return best_model(self.path)

    @property
    def finished(self) -> bool:
        """Training ended: final/ written, then DONE (imtune.rundir.checkpoint writes them in that order)."""
        return is_finished(self.path)

    def done_text(self) -> str:
        """RUN/DONE as written (a JSON summary of the finished run; "" while unfinished)."""
        p = _own_file(self.path / DONE)
        return p.read_text(encoding="utf-8") if p.exists() else ""

    def metrics(self, kind: str | None = "train") -> list[dict]:
        """The records of RUN/metrics.jsonl of one type ("train", "eval"; None: all)."""
        return metrics(self.path, kind)

    def data_path(self, value: str | None) -> str | None:
        """A data path of the config as it can be opened from here: as written when it exists (or is a hub spec),
        else relative to the run directory when it exists there (a run moved with its data beside it)."""
        if not value or Path(value).exists() or not (self.path / value).exists():
            return value or None
        return str(self.path / value)

    @property
    def template(self) -> str | None:
        """The template to render with: the config's (None: the final tokenizer's own, which is the one trained
        with); a template file that is no longer where training found it is replaced by the run's saved copy."""
        t = self.config.template
        if t and t.endswith((".jinja", ".j2", ".jinja2")) and not Path(t).is_file():
            return str(self.path / TEMPLATE)
        return t


def is_run(path: str | Path) -> bool:
    """A directory `imtune train` wrote: it holds config.yaml."""
    return (Path(path) / CONFIG).is_file()


def read_config(path: str | Path) -> TrainConfig | None:
    """RUN/config.yaml as a TrainConfig; None when the directory has none (a new or foreign directory)."""
    p = _own_file(Path(path) / CONFIG)
    if not p.is_file():
        return None
    try:
        return TrainConfig.from_dict(read_yaml(p))
    except UsageError as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None


def read_run(path: str | Path) -> RunDir:
    """The run directory at `path` (RUN, or RUN/final), or a UsageError saying why it is not one."""
    p = Path(path).expanduser()
    if p.name == FINAL and is_run(p.parent):
        p = p.parent
    if not p.exists():
        raise UsageError(f"no such run directory or model: {path} (not a directory here)")
    if not p.is_dir() or not is_run(p):
        raise UsageError(f"{path}: not an imtune run directory (no {CONFIG}); give the directory `imtune train` "
                         "wrote (--output-dir)")
    refuse_links(p)
    return RunDir(p, read_config(p))


def find_run(spec: str | None) -> RunDir | None:
    """The run a model spec names (RUN or RUN/final of a run with a final model), or None for any other model."""
    if not spec:
        return None
    p = Path(spec).expanduser()
    if p.name == FINAL and p.is_dir() and is_run(p.parent):
        return read_run(p.parent)
    if (p / FINAL).is_dir() and is_run(p):
        return read_run(p)
    return None


def model_dir(path: str | Path) -> Path:
    """The model directory `--model DIR` loads: DIR/final for a run directory (a directory with final/ and no model
    files of its own), RUN/final for a RUN/best that says it is final/'s model, else DIR."""
    p = Path(path)
    if (p / FINAL).is_dir() and not (p / "config.json").exists() and not (p / "tokenizer.json").exists():
        return p / FINAL
    if p.name == BEST and is_run(p.parent):
        return best_model(p.parent) or p
    return p


def best_info(path: str | Path) -> dict | None:
    """RUN/best/best.json: {"step", "loss", "selected_on"}, and "same_as": "final" when the best evaluation point was
    the last step (best/ then holds no weights: they are final/'s); None when the run has no best/."""
    f = _own_file(Path(path) / BEST / "best.json")
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def best_model(path: str | Path) -> Path | None:
    """The directory holding the weights of a run's best/: RUN/best, or RUN/final when best.json says they are the
    same (never a link: imtune.files refuses them); None when the run has no best/."""
    info = best_info(path)
    if info is None:
        return None
    return Path(path) / (FINAL if info.get("same_as") == FINAL else BEST)


def metrics(path: str | Path, kind: str | None = "train") -> list[dict]:
    """RUN/metrics.jsonl's records of one type ("train", "eval"; None: all); [] before the first step."""
    path = Path(path) / "metrics.jsonl"
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link: imtune reads a run's metrics only from the run itself")
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("type", "train") == kind]


def config_text(path: str | Path) -> str | None:
    """RUN/config.yaml as written (comments included), for reports; None when absent."""
    p = _own_file(Path(path) / CONFIG)
    return p.read_text(encoding="utf-8") if p.exists() else None


def _own_file(p: Path) -> Path:
    """`p`, unless it is a symbolic link (refused: a run's files are its own)."""
    if p.is_symlink():
        raise UsageError(f"{p} is a symbolic link: imtune reads a run's files only from the run itself")
    return p
