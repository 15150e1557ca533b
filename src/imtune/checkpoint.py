"""Checkpoints (atomic, resumable) and the final model directory.

A checkpoint is RUN/checkpoints/step-N/ holding
    model.safetensors + config.json        full fine-tuning (transformers' save_pretrained layout)
 or adapter_model.safetensors + adapter_config.json   LoRA (peft's layout)
    optimizer.pt  scheduler.pt             torch state dicts (no optimizer.pt under FSDP/DeepSpeed: not gathered)
    trainer_state.json                     step, tokens seen, data fingerprint, batch geometry, RNG scheme
    COMPLETE                               written last
It is written under checkpoints/.tmp-step-N, every file fsync'ed, then renamed into place and the parent directory
fsync'ed: a directory named step-N with COMPLETE inside is whole, anything else is ignored by resume.

RNG and data order are functions of (seed, step, rank), not stored streams: the trainer reseeds torch at the start
of every optimizer step and the micro-batches of step N are a pure function of (examples, seed, epoch). So the step
number in trainer_state.json *is* the RNG and data-order state, and it is the same for every rank.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

COMPLETE = "COMPLETE"
DONE = "DONE"


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory (bottom-up), so a rename after it publishes whole files."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Atomically make `tmp` (a finished directory) appear as `final`, replacing an older one."""
    fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    out = []
    for d in (Path(run_dir) / "checkpoints").glob("step-*"):
        if (d / COMPLETE).exists() and d.name[5:].isdigit():
            out.append((int(d.name[5:]), d))
    return sorted(out)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def is_finished(run_dir: str | Path) -> bool:
    """A run directory whose training finished (final/ written, then DONE). `compare` skips these."""
    return (Path(run_dir) / DONE).exists() and (Path(run_dir) / "final").is_dir()


def save_checkpoint(run_dir: Path, step: int, model, state_dict: dict | None, optimizer, scheduler,
                    trainer_state: dict, keep: int) -> Path:
    """Write checkpoints/step-<step> atomically (see the module docstring); keep the newest `keep` (0: all)."""
    import torch

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "saved_at": time.time()}, indent=1))
    (tmp / COMPLETE).write_text("")
    final = root / f"step-{step}"
    publish(tmp, final)
    if keep:
        for _, old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    if not (Path(ckpt) / COMPLETE).exists():
        from .types import UsageError

        raise UsageError(f"{ckpt}: not a complete checkpoint (no {COMPLETE} marker); resume from another one")
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def load_weights(model, ckpt: Path, lora: bool) -> None:
    """Put a checkpoint's weights (or adapter) into `model`, exactly (tied weights stay tied)."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, load_file(Path(ckpt) / "adapter_model.safetensors"))
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"{ckpt}: adapter keys that the model lacks: {res.unexpected_keys[:5]}")
        return
    state: dict = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):  # one file, or save_pretrained's shards
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(_tied_keys(model))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {unexpected[:5]}")


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
    """Restore optimizer and scheduler state; False when the checkpoint has no optimizer state (FSDP/DeepSpeed)."""
    import torch

    found = (Path(ckpt) / "optimizer.pt").exists()
    if found:
        optimizer.load_state_dict(torch.load(Path(ckpt) / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(Path(ckpt) / "scheduler.pt", map_location="cpu", weights_only=True))
    return found


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
               info: dict | None = None) -> Path:
    """RUN/final/: loads with AutoModelForCausalLM.from_pretrained (+ AutoTokenizer, with the training template).

    Full fine-tuning: the model. LoRA: the adapter and HOW_TO_LOAD.md, or (merge_lora) the merged model.
    `base_dir`: where the adapter's base model lives; None for a base with no directory (random:*), which is then
    saved into RUN/base/ so the adapter stays loadable. name="best" writes RUN/best/ the same way (mid-training:
    --merge-lora is not applied there, it would fold the adapter into the model being trained), with `info` as
    best/best.json."""
    import copy

    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-{name}"
    merge_lora = merge_lora and name == "final"
    shutil.rmtree(tmp, ignore_errors=True)
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
                clean.save_pretrained(base.with_name(".tmp-base"), safe_serialization=True)
                publish(base.with_name(".tmp-base"), base)
            base_dir = str(base.resolve())
        model.peft_config["default"].base_model_name_or_path = base_dir
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        (tmp / "HOW_TO_LOAD.md").write_text(HOW_TO_LOAD.format(final=run_dir / name, base=base_dir))
        base_model.generation_config.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tok = copy.deepcopy(tokenizer)  # the tokenizer is cached per process: never mutate the shared one
    tok.chat_template = chat_template
    tok.save_pretrained(tmp)
    if info is not None:
        (tmp / "best.json").write_text(json.dumps(info, indent=1) + "\n")
    final = run_dir / name
    publish(tmp, final)
    return final


def mark_done(run_dir: Path, summary: dict) -> None:
    p = Path(run_dir) / DONE
    tmp = p.with_name(".tmp-DONE")
    tmp.write_text(json.dumps({**summary, "finished_at": time.time()}, indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, p)
    _fsync_dir(p.parent)


# -- resume decisions ------------------------------------------------------------------------------------------------
def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (resume: None, "auto" = newest in run_dir, or a checkpoint / run directory).
    Refuses to silently train over existing checkpoints."""
    from .types import UsageError

    if resume and resume != "auto":
        p = Path(resume)
        if (p / "checkpoints").is_dir():
            p = latest_checkpoint(p) or p
        read_trainer_state(p)  # raises unless complete
        return p
    latest = latest_checkpoint(run_dir)
    if resume == "auto":
        if latest is None:
            print(f"{run_dir}: no complete checkpoint yet; starting from step 0", file=sys.stderr)
        return latest
    if latest is not None:
        raise UsageError(f"{run_dir} already has checkpoints (newest: {latest.name}); add --resume to continue it, "
                         "or choose another --output-dir")
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "config.yaml").exists():
        raise UsageError(f"{run_dir} exists and is not an imtune run directory; choose another --output-dir")
    return None


def check_resumable(saved: dict, now: dict, total_steps: int, path: Path) -> None:
    """An exact resume needs the same data, seed and batch geometry (they fix the data order and the sums)."""
    from .types import UsageError

    for key in ("data_fingerprint", "processes", "grad_accum", "batch_size", "packing", "seed"):
        if saved.get(key) != now[key]:
            raise UsageError(f"{path}: cannot resume exactly: {key} was {saved.get(key)!r}, now {now[key]!r} "
                             "(same data, seed and batch geometry are needed)")
    if saved["step"] > total_steps:
        raise UsageError(f"{path} is at step {saved['step']}, past this run's {total_steps} steps")
