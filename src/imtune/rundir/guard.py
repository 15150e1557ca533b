"""A run directory has one writer and one set of settings.

One writer: `lock(run_dir, acc)` claims the directory (imtune.files.claim: created and marked as a run, or refused
when it is somebody else's) and takes an exclusive fcntl.flock on RUN/.lock before anything in it is read or
written, and train() holds it until it returns (`release()`). Under several processes only rank 0 takes it;
the outcome is broadcast, so a refusal stops every rank instead of leaving them waiting. The file names the holder
(pid, host, start time) for the refusal message; the kernel drops the lock when the holder exits or is killed, so a
crashed run never leaves a stale lock behind. (flock is per host: on a network filesystem shared by several hosts,
it guards each host only.)

One set of settings: `config_changes(run_dir, cfg)` lists the fields that differ between RUN/config.yaml and `cfg`,
leaving out HARMLESS ones (display, resources, where checkpoints go). Training again into a finished run with other
settings is refused; so is a `--resume` that changes the run, unless each change is allowed with `--allow-change`,
which is then recorded in RUN/changes.jsonl (and as comments at the top of config.yaml).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from imtune import files
from imtune.config import FIELD_NAMES
from imtune.rundir.read import read_config
from imtune.types import UsageError

# Fields that do not change what is trained: display, logging, resources, kernels, where and how often to save.
HARMLESS = ("progress", "tensorboard", "threads", "resume", "save_every", "save_every_minutes", "keep_checkpoints",
            "output_dir",
            "allow_change", "log_class_losses", "chunk_size", "gradient_checkpointing", "compile",
            "attn_implementation", "micro_batch_tokens", "memory_limit")
# Fields a checkpoint's weights depend on: no --allow-change can make a checkpoint fit another model.
FIXED = ("model", "lora", "lora_r", "lora_targets")

_held: list[int] = []  # descriptors of the locks this process holds
_made: list[tuple[Path, Path | None]] = []  # run directories this process created: (directory, outermost created)


# -- one writer ------------------------------------------------------------------------------------------------------
def lock(run_dir: Path, acc=None) -> None:
    """Take RUN/.lock for this process (rank 0 of `acc`), or raise UsageError naming the holder."""
    err = None
    if acc is None or acc.is_main_process:
        try:
            _take(Path(run_dir))
        except UsageError as e:
            err = str(e)
    if acc is not None and acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        err = broadcast_object_list([err])[0]
    if err:
        raise UsageError(err)


def _take(run_dir: Path) -> None:
    top = files.first_missing(run_dir)
    if files.claim(run_dir, "run"):  # refuses before leaving a .lock in somebody else's directory
        _made.append((run_dir, top))
    path = run_dir / ".lock"
    fd = files.open_fd(path, os.O_RDWR | os.O_CREAT, run_dir, 0o644)  # no O_TRUNC: a refusal keeps the holder's note
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        os.close(fd)
        raise UsageError(f"{run_dir} is in use by another imtune run ({_describe_holder(holder)}); wait for it to "
                         "end, or choose another --output-dir") from None
    except OSError as e:
        os.close(fd)
        raise UsageError(f"{path}: cannot lock the run directory ({e.strerror}); use a local --output-dir") from None
    note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
    _held.append(fd)


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def release(discard_unused: bool = False) -> None:
    """Drop every run-directory lock this process holds (closing the descriptor releases the flock); with
    discard_unused (the run failed), a directory this process created and wrote nothing into is removed again."""
    while _held:
        os.close(_held.pop())
    while _made:
        run_dir, top = _made.pop()
        if discard_unused:
            files.unclaim(run_dir, top)


# -- one set of settings ---------------------------------------------------------------------------------------------
def config_changes(run_dir: Path, cfg, ignore: tuple[str, ...] = HARMLESS) -> dict[str, tuple]:
    """{field: (was, now)} for the fields of `cfg` that differ from RUN/config.yaml, without `ignore`d ones;
    {} when the directory has no config.yaml. (The one comparison: `compare` uses it for its arms too.)"""
    config = read_config(run_dir)
    if config is None:
        return {}
    was, now = config.to_dict(), cfg.to_dict()
    return {k: (was.get(k), v) for k, v in now.items() if k not in ignore and was.get(k) != v}


def describe(changes: dict[str, tuple]) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def check_finished(run_dir: Path, cfg) -> None:
    """A finished run is only ever "already finished" for the settings it was trained with."""
    diff = config_changes(run_dir, cfg)
    if diff:
        raise UsageError(f"{run_dir} already finished with other settings ({describe(diff)}); its final/ is the model "
                         f"of those. To train with these settings choose another --output-dir (or delete {run_dir})")


def allowed(spec: str | None) -> set[str]:
    """The fields named by --allow-change (comma-separated; dashes or underscores)."""
    names = {s.strip().replace("-", "_") for s in (spec or "").split(",") if s.strip()}
    unknown = sorted(names - FIELD_NAMES)
    if unknown:
        raise UsageError(f"--allow-change {', '.join(unknown)}: not a setting; valid: {', '.join(sorted(FIELD_NAMES))}")
    fixed = sorted(names & set(FIXED))
    if fixed:
        raise UsageError(f"--allow-change {', '.join(fixed)}: a checkpoint holds the weights of one model and cannot "
                         "continue as another; start a new run (--model RUN/final continues from a finished one)")
    return names


def check_resume(run_dir: Path, resume_from: Path, cfg) -> dict[str, tuple]:
    """Refuse a resume whose settings differ from the run's, except the changes --allow-change names (returned, to be
    recorded). The run's settings: RUN/config.yaml, or the resumed checkpoint's own run's for a new directory."""
    ok = allowed(cfg.allow_change)
    source = Path(run_dir) if (Path(run_dir) / "config.yaml").exists() else Path(resume_from).parent.parent
    diff = config_changes(source, cfg)
    fixed = {k: v for k, v in diff.items() if k in FIXED}
    if fixed:
        raise UsageError(f"--resume cannot change {describe(fixed)}: {resume_from} holds weights that fit only the "
                         "model it was trained as. Resume with the same settings, or start a new run")
    refused = {k: v for k, v in diff.items() if k not in ok}
    if refused:
        raise UsageError(f"{source} was trained with other settings: {describe(refused)}. --resume continues the same "
                         f"run: give the same settings, allow deliberate changes with --allow-change "
                         f"{','.join(refused)}, or choose another --output-dir")
    return diff


def record_changes(run_dir: Path, resume_from: Path, step: int, changes: dict[str, tuple]) -> None:
    """Append allowed changes to RUN/changes.jsonl (write_run_files copies them into config.yaml as comments)."""
    if not changes:
        return
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "step": step, "resumed_from": str(resume_from),
             "changes": {k: list(v) for k, v in changes.items()}}
    with files.open_append(Path(run_dir) / "changes.jsonl", run_dir) as f:
        f.write(json.dumps(entry) + "\n")


def history(run_dir: Path) -> list[str]:
    """One line per recorded change, for config.yaml's header."""
    path = Path(run_dir) / "changes.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            e = json.loads(line)
            out.append(f"step {e['step']} ({e['time']}, --allow-change): "
                       + describe({k: tuple(v) for k, v in e["changes"].items()}))
    return out
