"""Checkpoints (atomic, resumable) and the final model directory.

A checkpoint is RUN/checkpoints/step-N/ holding
    model.safetensors + config.json        full fine-tuning (transformers' save_pretrained layout)
 or adapter_model.safetensors + adapter_config.json   LoRA (peft's layout)
    optimizer.pt  scheduler.pt             torch state dicts (no optimizer.pt under FSDP/DeepSpeed: not gathered)
    trainer_state.json                     step, tokens seen, data fingerprint, batch geometry, RNG scheme
    COMPLETE                               written last: the manifest, {"files": {name: {"bytes", "sha256"}}, ...}
It is written under checkpoints/.tmp-step-N, every file fsync'ed, then renamed into place and the parent directory
fsync'ed: a directory named step-N with COMPLETE inside was whole when written, anything else is ignored by resume.
Whether it is still whole (no file missing, truncated or with flipped bits) is checked against the manifest
(imtune.rundir.integrity.verify) before a checkpoint is resumed from or called good; resume falls back to the newest
intact one.
Pruning renames a checkpoint out of the step-N namespace before deleting its files, so a half-deleted checkpoint is
never listed.

RNG and data order are functions of (seed, step, rank), not stored streams: the trainer reseeds torch at the start
of every optimizer step and the micro-batches of step N are a pure function of (examples, seed, epoch). So the step
number in trainer_state.json *is* the RNG and data-order state, and it is the same for every rank.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from imtune import files
from imtune.rundir.integrity import (
    checkpoints,
    fsync_dir,
    last_good,
    latest_checkpoint,
    newest_intact,
    publish,
    read_manifest,
    verify,
    write_manifest,
)
from imtune.types import UsageError

DONE = "DONE"


# -- write failures (disk full, I/O errors) --------------------------------------------------------------------------
class WriteFailed(UsageError):
    """A file of the run directory could not be written: said for a person (partial files already removed)."""

    def __init__(self, where, reason: str, free_mb: float, tail: str):
        self.where, self.reason, self.free_mb, self.tail = where, reason, free_mb, tail
        super().__init__(f"cannot write {where}: {reason} ({free_mb:,.0f} MB free); {tail}")

    def with_tail(self, tail: str) -> WriteFailed:
        return WriteFailed(self.where, self.reason, self.free_mb, tail)


# torch.save reports a full disk as a RuntimeError from its C++ writer, without an errno
_IO_WORDS = ("iostream", "file write failed", "unexpected pos", "no space", "pytorchstreamwriter", "i/o error")


def write_failure(err: BaseException, path: Path, run_dir: Path | None, cleanup: Path | None = None) -> WriteFailed:
    """The WriteFailed to raise for `err`, caught while writing `path` (after removing `cleanup`, a partial temporary
    directory). Errors that are not about writing (our bugs) are re-raised as they are."""

    free = _free_bytes(path)
    code = getattr(err, "errno", None)
    if not (isinstance(err, OSError) or free < 1 << 20 or any(w in str(err).lower() for w in _IO_WORDS)):
        raise err
    named = getattr(err, "filename", None)
    inside = Path(os.path.abspath(run_dir if run_dir is not None else Path(path).parent))
    if named and not Path(os.path.abspath(named)).is_relative_to(inside):
        raise err  # a file outside the run directory (say, a library's own file): not a failure to write ours
    if cleanup is not None:
        _discard(cleanup, run_dir)
    nospace = (code in (errno.ENOSPC, errno.EDQUOT) or free < 1 << 20
               or any(w in str(err).lower() for w in ("no space left", "os error 28", "quota exceeded")))
    reason = ("no space left on device" if nospace else os.strerror(code) if code else str(err).strip().splitlines()[0])
    where = getattr(err, "filename", None) or path
    good = last_good(run_dir) if run_dir is not None else None
    tail = (f"last good checkpoint: {good}; free some space and continue with --resume" if good else
            "last good checkpoint: none; free some space and run again")
    return WriteFailed(where, reason, _free_bytes(path) / 1e6, tail)


def _discard(path: Path, run_dir: Path | None) -> None:
    """Remove a partial temporary directory after a failed write (best effort: the failure is what gets reported)."""
    try:
        files.remove(path, run_dir)
    except (OSError, UsageError):
        pass


def _write_errors() -> tuple[type, ...]:
    """What the writers raise on a full disk: OSError (Python, transformers), RuntimeError (torch.save),
    SafetensorError (safetensors)."""
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `path` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def _rel(p: Path, run_dir: Path) -> str:
    try:
        return str(Path(p).relative_to(run_dir))
    except ValueError:
        return str(p)


def is_finished(run_dir: str | Path) -> bool:
    """A run directory whose training finished (final/ written, then DONE). `compare` skips these."""
    return (Path(run_dir) / DONE).exists() and (Path(run_dir) / "final").is_dir()


def save_checkpoint(run_dir: Path, step: int, model, state_dict: dict | None, optimizer, scheduler,
                    trainer_state: dict, keep: int,
                    optimizer_note: str = "sharded run: the optimizer state is not gathered") -> Path:
    """Write checkpoints/step-<step> atomically (see the module docstring); keep the newest `keep` (0: all).
    `optimizer=None` leaves optimizer.pt out; `optimizer_note` (kept in the manifest) says why."""
    import torch

    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    try:
        files.fresh_dir(tmp, run_dir)
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if optimizer is not None:  # torch.save into the directory fresh_dir has just made
            torch.save(optimizer.state_dict(), files.check_target(tmp / "optimizer.pt", run_dir))
        torch.save(scheduler.state_dict(), files.check_target(tmp / "scheduler.pt", run_dir))
        files.write_json(tmp / "trainer_state.json", {**trainer_state, "saved_at": time.time()}, root=run_dir)
        write_manifest(tmp, None if optimizer is not None else optimizer_note)
        publish(tmp, final, run_dir)
    except _write_errors() as e:  # a full disk: no partial checkpoint is left to fill it further
        raise write_failure(e, final, run_dir, cleanup=tmp) from None
    if keep:
        for _, old in checkpoints(run_dir)[:-keep]:
            remove_checkpoint(old)
    return final


def remove_checkpoint(d: Path) -> None:
    """Rename out of the step-N namespace first (atomic: never listed again), then delete the files."""
    run_dir = d.parent.parent
    gone = d.with_name(f".del-{d.name}")
    files.remove(gone, run_dir)
    files.rename(d, gone, run_dir)
    fsync_dir(d.parent)
    files.remove(gone, run_dir)


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what an interrupted writer left behind (temporary and half-deleted directories). Only the holder of
    the run directory's lock may call this."""
    run_dir = Path(run_dir)
    found = [*(run_dir / "checkpoints").glob(".tmp-step-*"), *(run_dir / "checkpoints").glob(".del-step-*"),
             *(run_dir / "checkpoints").glob(".old-*"), *run_dir.glob(".tmp-*"), *run_dir.glob(".old-*")]
    for p in found:
        if p.name != ".lock":
            files.remove(p, run_dir)  # a link planted under one of these names is refused, never followed
    return found


def read_trainer_state(ckpt: Path) -> dict:
    read_manifest(ckpt)  # raises unless complete
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def load_weights(model, ckpt: Path, lora: bool) -> None:
    """Put a checkpoint's weights (or adapter) into `model`, exactly (tied weights stay tied)."""
    if lora:
        from peft import set_peft_model_state_dict

        try:
            res = set_peft_model_state_dict(model, _read_safetensors(Path(ckpt) / "adapter_model.safetensors"))
        except RuntimeError as e:  # shapes differ: another base model or rank
            raise UsageError(f"{ckpt}: the adapter does not fit this model ({str(e).splitlines()[-1].strip()}); "
                             "resume with the --model and --lora-r it was trained with") from None
        if getattr(res, "unexpected_keys", None):
            raise UsageError(f"{ckpt}: adapter keys that the model lacks: {res.unexpected_keys[:5]}")
        return
    state: dict = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):  # one file, or save_pretrained's shards
        state.update(_read_safetensors(f))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: the checkpoint is of another model
        raise UsageError(f"{ckpt}: the weights do not fit this model ({_first_mismatch(e)}); resume with the --model "
                         "the checkpoint was trained from") from None
    tied = set(_tied_keys(model))
    if unexpected or set(missing) - tied:
        raise UsageError(f"{ckpt}: checkpoint does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {unexpected[:5]}; resume with the --model it was trained from")


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path}: cannot read the weights ({e}); the checkpoint is damaged: resume from another "
                         "one") from None


def _first_mismatch(e: RuntimeError) -> str:
    lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
    return lines[0] if lines else str(e).splitlines()[0]


def _tied_keys(model) -> list[str]:
    """State-dict keys that share storage with an earlier key (save_pretrained leaves them out)."""
    seen, out = set(), []
    for k, v in model.state_dict(keep_vars=True).items():
        ptr = v.data_ptr()
        if ptr in seen:
            out.append(k)
        seen.add(ptr)
    return out


def load_optimizer(optimizer, scheduler, ckpt: Path) -> bool:
    """Restore optimizer and scheduler state; False when the checkpoint was written without optimizer state (its
    manifest says so and why: optimizer_note). A listed optimizer.pt that is gone is damage, caught by verify()."""
    import torch

    found = "optimizer.pt" in read_manifest(ckpt)["files"]
    if found:
        optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(Path(ckpt) / "scheduler.pt", map_location="cpu", weights_only=True))
    return found


def optimizer_note(ckpt: Path) -> str:
    """Why a checkpoint holds no optimizer state (from its manifest)."""
    return read_manifest(ckpt).get("optimizer") or "no optimizer state"


HOW_TO_LOAD = """# A LoRA adapter trained with imtune

Plain transformers (peft installed) loads base + adapter in one call:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("{final}")
    tokenizer = AutoTokenizer.from_pretrained("{final}")  # carries the chat template used for training

The base model is {base}. To get one merged model directory instead, train with --merge-lora, or:

    from peft import AutoPeftModelForCausalLM
    AutoPeftModelForCausalLM.from_pretrained("{final}").merge_and_unload().save_pretrained("merged")
"""


def save_final(run_dir: Path, model, state_dict: dict | None, tokenizer, chat_template: str, stop_ids: list[int],
               lora: bool, merge_lora: bool, base_dir: str | None, name: str = "final",
               info: dict | None = None, dtype: str = "fp32") -> Path:
    """RUN/final/: loads with AutoModelForCausalLM.from_pretrained (+ AutoTokenizer, with the training template).

    Full fine-tuning: the model. LoRA: the adapter and HOW_TO_LOAD.md, or (merge_lora) the merged model.
    `base_dir`: where the adapter's base model lives; None for a base with no directory (random:*), which is then
    saved into RUN/base/ so the adapter stays loadable. name="best" writes RUN/best/ the same way (mid-training:
    --merge-lora is not applied there, it would fold the adapter into the model being trained), with `info` as
    best/best.json. dtype="bf16": the model's weights are written in bf16 (config.json says so; tied weights stay
    one tensor), half the disk of fp32; a LoRA adapter (small) and RUN/base/ keep their own dtype."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-{name}"
    merge_lora = merge_lora and name == "final"
    try:
        return _save_final(run_dir, tmp, model, state_dict, tokenizer, chat_template, stop_ids, lora, merge_lora,
                           base_dir, name, info, dtype)
    except _write_errors() as e:
        _discard(run_dir / ".tmp-base", run_dir)
        raise write_failure(e, run_dir / name, run_dir, cleanup=tmp) from None


def _save_final(run_dir: Path, tmp: Path, model, state_dict, tokenizer, chat_template, stop_ids, lora, merge_lora,
                base_dir, name: str, info: dict | None, dtype: str = "fp32") -> Path:
    files.fresh_dir(tmp, run_dir)
    if lora and merge_lora:
        model = model.merge_and_unload()  # the adapter is folded into the weights: a plain model from here on
        state_dict, lora = None, False
    base_model = model.get_base_model() if lora else model
    base_model.config.use_cache = True  # training turned it off; generation wants it
    base_model.generation_config.eos_token_id = stop_ids or base_model.generation_config.eos_token_id
    if lora:
        if base_dir is None:
            base = run_dir / "base"
            if not (base / "config.json").exists():
                clean = copy.deepcopy(model).unload()  # a copy without the LoRA layers: the untouched base
                clean.save_pretrained(files.fresh_dir(base.with_name(".tmp-base"), run_dir), safe_serialization=True)
                publish(base.with_name(".tmp-base"), base, run_dir)
            base_dir = str(base.resolve())
        model.peft_config["default"].base_model_name_or_path = base_dir
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        files.write_text(tmp / "HOW_TO_LOAD.md", HOW_TO_LOAD.format(final=run_dir / name, base=base_dir), run_dir)
        base_model.generation_config.save_pretrained(tmp)
    elif dtype == "bf16":
        import torch

        model.save_pretrained(tmp, state_dict=converted(state_dict or model.state_dict(), dtype=torch.bfloat16),
                              safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))  # transformers wrote the model's
        files.write_json(tmp / "config.json", {**config, "dtype": "bfloat16"}, root=run_dir)  # fp32: say bf16
    else:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    shared = tokenizer.chat_template  # the tokenizer is cached per process: it leaves as it came (a deepcopy took
    tokenizer.chat_template = chat_template  # ~0.3 s per save)
    try:
        tokenizer.save_pretrained(tmp)
    finally:
        tokenizer.chat_template = shared
    if info is not None:
        files.write_json(tmp / "best.json", info, root=run_dir)
    final = run_dir / name
    publish(tmp, final, run_dir)
    return final


def converted(state: dict, dtype=None, device=None) -> dict:
    """Copies of a state dict's tensors (floating ones in `dtype`, all on `device`; None: as they are), detached;
    tensors that share storage (a tied lm_head) stay one tensor, so save_pretrained drops the alias as it does for
    the model's own state dict."""
    import torch

    view = lambda t: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())  # noqa: E731
    unique = {view(t): t for t in state.values() if isinstance(t, torch.Tensor)}
    copies = {k: t.detach().to(device=device or t.device, dtype=dtype if dtype and t.is_floating_point() else t.dtype,
                               copy=True) for k, t in unique.items()}
    return {name: copies[view(t)] if isinstance(t, torch.Tensor) else t for name, t in state.items()}


def save_same_as(run_dir: Path, name: str, info: dict, same_as: str = "final") -> Path:
    """RUN/<name>/ holding only best.json (`info` + "same_as"): the model is RUN/<same_as>'s, not written twice (the
    best evaluation point was the last step). Readers follow it through imtune.rundir.read.best_model; never a link."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-{name}"
    try:
        files.fresh_dir(tmp, run_dir)
        files.write_json(tmp / "best.json", {**info, "same_as": same_as}, root=run_dir)
        publish(tmp, run_dir / name, run_dir)
    except _write_errors() as e:
        raise write_failure(e, run_dir / name, run_dir, cleanup=tmp) from None
    return run_dir / name


def rescue_weights(run_dir: Path, failed: WriteFailed, step: int, save) -> WriteFailed:
    """final/ could not be written: make sure the trained weights survive, and return the error to raise, saying
    where they are and how to finish. `save(root)` writes a checkpoint of the last step under root/checkpoints/
    (raising WriteFailed); it is tried in the run directory, then in the system temporary directory when that is on
    another filesystem."""

    run_dir = Path(run_dir)
    good = last_good(run_dir)
    finish = f"imtune train --output-dir {run_dir} --resume"
    if good is not None and read_trainer_state(good)["step"] == step:
        return failed.with_tail(f"the trained weights are safe in {good}: free some space, then `{finish}` "
                                "writes final/")
    roots = [run_dir]
    tmp_root = Path(tempfile.gettempdir())
    if tmp_root.stat().st_dev != run_dir.stat().st_dev:
        roots.append(tmp_root)
    for root in roots:
        try:
            where = save(root if root == run_dir else files.temp_dir(root, prefix="imtune-rescue-"))
        except (WriteFailed, OSError):
            continue
        return failed.with_tail(f"the trained weights (step {step}) were saved to {where} instead: free some space, "
                                f"then `{finish}{'' if where.parent.parent == run_dir else ' ' + str(where)}` "
                                "writes final/")
    return failed.with_tail(f"no checkpoint of the last step could be written either (the weights are lost); "
                            f"last good checkpoint: {good or 'none'}")


def mark_done(run_dir: Path, summary: dict) -> None:
    p = Path(run_dir) / DONE
    try:
        files.write_json(p, {**summary, "finished_at": time.time()}, root=run_dir, durable=True)
    except OSError as e:  # final/ is written: the model is safe, only the marker is missing
        raise write_failure(e, p, run_dir).with_tail(f"the model is safe: {Path(run_dir) / 'final'} is complete "
                                                      "and loads; only the run's DONE marker is missing") from None


# -- resume decisions ------------------------------------------------------------------------------------------------
def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (resume: None, "auto" = newest in run_dir, or a checkpoint / run directory).
    Refuses to silently train over existing checkpoints."""
    if resume and resume != "auto":
        p = Path(resume)
        if (p / "checkpoints").is_dir():
            return _intact_or_refuse(p)
        problem = verify(p)
        if problem is not None:
            good = last_good(p.parent.parent) if p.parent.name == "checkpoints" else None
            raise UsageError(f"{p} is damaged ({problem}); " + (f"resume from {good} instead" if good else
                                                               "resume from another checkpoint"))
        return p
    latest = latest_checkpoint(run_dir)
    if resume == "auto":
        if latest is None:
            print(f"{run_dir}: no complete checkpoint yet; starting from step 0", file=sys.stderr)
            return None
        return _intact_or_refuse(run_dir)
    if latest is not None:
        raise UsageError(f"{run_dir} already has checkpoints (newest: {latest.name}); add --resume to continue it, "
                         "or choose another --output-dir")
    return None  # whose directory it is was settled by imtune.rundir.guard.lock (imtune.files.claim)


def _intact_or_refuse(run_dir: Path) -> Path:
    """The newest intact checkpoint of a run, saying which newer ones are damaged; UsageError when none is intact."""
    good, damaged = newest_intact(run_dir)
    bad = "; ".join(f"{_rel(d, run_dir)} is damaged ({why})" for d, why in damaged)
    if good is None:
        raise UsageError(f"{bad}; no intact checkpoint is left in {run_dir} to resume from: start again without "
                         "--resume in another --output-dir (or delete the damaged checkpoints)")
    if damaged:
        print(f"imtune: {bad}; resuming from {_rel(good, run_dir)}", file=sys.stderr, flush=True)
    return good


def check_resumable(saved: dict, now: dict, total_steps: int, path: Path) -> None:
    """An exact resume needs the same data, seed and batch geometry (they fix the data order and the sums)."""
    for key in ("data_fingerprint", "processes", "grad_accum", "batch_size", "packing", "seed"):
        if saved.get(key) != now[key]:
            raise UsageError(f"{path}: cannot resume exactly: {key} was {saved.get(key)!r}, now {now[key]!r} "
                             "(same data, seed and batch geometry are needed)")
    if saved["step"] > total_steps:
        raise UsageError(f"{path} is at step {saved['step']}, past this run's {total_steps} steps")
