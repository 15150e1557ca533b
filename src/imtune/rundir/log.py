"""What a person (and evaluation code) sees of a run: config.yaml, chat_template.jinja, data_stats.json,
RUN/metrics.jsonl, optional TensorBoard, a progress bar.

metrics.jsonl has one JSON object a line:
    {"type": "train", "step": 12, "epoch": 0.4, "loss": 2.31, "loss_output": 2.5, "loss_instruction": 3.1,
     "lr": 1.9e-05, "grad_norm": 1.7, "tokens_per_s": 5400.0, "tokens": 98304, "time": 31.2}     every optimizer step
    {"type": "eval", "step": 12, "epoch": 0.4, "train_output_loss": 2.2, "eval_output_loss": 2.6, ...}
    {"type": "eval_examples", "step": 12, "sets": {"eval": {"source": [...], "output_nll": [...],
     "output_tokens": [...]}, ...}}            beside each eval line: per-example output-token NLL sums and counts
    {"type": "stopped", "step": 13, "reason": "..."}                                  a run stopped on a bad loss
    {"type": "timing", "step": 40, "seconds": {"startup": 9.1, "train_steps": 61.0, "train_eval": 8.2,
     "saving": 3.3}, "peak_rss_mb": {"startup": 1210.5, ...}}      last, once final/ is written (imtune.train.clock)
`loss` is the training objective's Σw·nll / Σw of that step (the KL term, when on, is logged apart as `kl`);
`loss_output` / `loss_instruction` are unweighted mean nll over assistant+eot / user+system label tokens.
Only rank 0 writes; the other ranks hold a RunLog(None) that does nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from imtune import files
from imtune.rundir.checkpoint import write_failure
from imtune.rundir.guard import history
from imtune.types import CLASSES, Examples


class RunLog:
    def __init__(self, run_dir: Path | None, total_steps: int = 0, start_step: int = 0, tensorboard: bool = False,
                 progress: bool = True):
        self.active = run_dir is not None
        self.file = self.tb = self.bar = None
        if not self.active:
            return
        path = self.path = Path(run_dir) / "metrics.jsonl"
        trim_metrics(path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.file = files.open_append(path, run_dir)  # O_NOFOLLOW: a planted link is refused, never appended to
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            board = files.make_dirs(Path(run_dir) / "tensorboard", run_dir)  # checked: TensorBoard writes in it
            self.tb = SummaryWriter(str(board), purge_step=start_step + 1)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True,
                            desc="train")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full: a message, not a traceback
            raise write_failure(e, self.path, self.path.parent) from None
        if self.tb is not None:
            kind = record.get("type", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "type"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])
        if self.bar is not None and record.get("type") == "train":
            self.bar.update(record["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def subtask(self, total: int, desc: str, unit: str = "batch"):
        """A progress bar under the training bar for work between steps (an evaluation), or None without
        progress bars (--no-progress, or not rank 0). Close it when done; it leaves no line behind."""
        if self.bar is None:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)

    def note(self, msg: str) -> None:
        """A line for the person watching, printed above the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                try:
                    h.close()
                except OSError:  # a full disk already reported by write()
                    pass
        self.file = self.tb = self.bar = None


def changed_config(cfg) -> str:
    """The fields of a TrainConfig that differ from their defaults, as YAML (the whole config is RUN/config.yaml):
    ~10 lines a run instead of ~60, which made most of the output of a several-arm compare."""

    import yaml

    default = type(cfg)()
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(default, f.name)}
    body = yaml.safe_dump(changed, sort_keys=False, allow_unicode=True) if changed else "{}\n"
    return f"# config: the fields set (everything else default; all of it in config.yaml)\n{body}"


def trim_metrics(path: Path, keep_through_step: int) -> None:
    """Drop metric lines of steps after `keep_through_step` (0: start afresh)."""
    if not path.exists() and not path.is_symlink():
        return
    if keep_through_step == 0:
        files.remove(path, path.parent)
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= keep_through_step:
                keep.append(line)
        except ValueError:  # blank, or the half-written last line of a killed run
            continue
    _write_text(path, "".join(line + "\n" for line in keep))


def write_run_files(run_dir: Path, cfg, prep, examples: list, ex_weight: list[float], extra: dict) -> None:
    """config.yaml (its non-default fields printed), chat_template.jinja and data_stats.json: the run directory
    describes itself."""
    import numpy as np

    files.make_dirs(run_dir / "checkpoints", run_dir)  # part of the layout; empty without --save-every
    changed = "".join(f"# changed at {line}\n" for line in history(run_dir))  # comments: still a valid CONFIG.yaml
    text = changed + cfg.replace(allow_change=None).to_yaml()  # a permission for one resume, not for the next
    _write_text(run_dir / "config.yaml", text)
    _write_text(run_dir / "chat_template.jinja", prep.renderer.jinja)
    examples = Examples.of(examples)
    lengths = examples.lengths.tolist()
    # Predicted tokens per class: every token but each example's first (never predicted). Counted class by class
    # (one bool temporary at a time): a bincount would copy every token's class to int64 first (0.36 GB at 1M records).
    first = np.bincount(examples.classes[examples.bounds[:-1][examples.lengths > 0]], minlength=len(CLASSES))
    by_class = [int(np.count_nonzero(examples.classes == c)) - int(first[c]) for c in range(len(CLASSES))]
    stats = {
        "data": cfg.data, "template": prep.renderer.name, "loss": cfg.loss,
        "records_loaded": prep.records_loaded, "records_skipped": [str(p) for p in prep.load_skipped],
        "tokenize": prep.report.as_dict(), "examples": len(examples), "tokens": sum(lengths),
        "predicted_tokens_by_class": dict(zip(CLASSES, by_class)), "weight_sum": math.fsum(ex_weight),
        "length": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}, **extra,
        "data_format": prep.understood.as_dict() if getattr(prep, "understood", None) else None,
        "system_prompt": prep.system_note() if hasattr(prep, "system_note") else None,
    }
    _write_text(run_dir / "data_stats.json", json.dumps(stats, indent=1) + "\n")
    print(f"# imtune train -> {run_dir}\n{changed}{changed_config(cfg)}".rstrip(), file=sys.stderr, flush=True)
    for line in (prep.notes() if hasattr(prep, "notes") else []):
        print(line, file=sys.stderr, flush=True)


def _write_text(path: Path, text: str) -> None:
    try:
        files.write_text(path, text, path.parent)
    except OSError as e:  # disk full: a message, not a traceback
        raise write_failure(e, path, path.parent) from None
