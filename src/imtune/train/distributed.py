"""Sharded training (FSDP2) beside accelerate: the parts accelerate leaves to us.

- FSDP on CPU. accelerate only turns FSDP on for accelerator devices: on a CPU machine `accelerate launch` with an
  FSDP config gives a plain multi-CPU (DDP) run. When the launcher asked for FSDP (ACCELERATE_USE_FSDP=true, set by
  `accelerate launch --config_file configs/accelerate/fsdp-cpu.yaml`) and accelerate fell back to MULTI_CPU, imtune
  applies torch's FSDP2 itself (`fully_shard` on every decoder layer, then on the root), on a gloo CPU mesh: the same
  wrapping accelerate's FSDP2 plugin does on GPUs (TRANSFORMER_BASED_WRAP from the model's `_no_split_modules`).
- Exact resume under FSDP. The weights and the AdamW state are gathered into full (unsharded) state dicts keyed by
  parameter name (torch.distributed.checkpoint.state_dict), so `optimizer.pt` of a sharded run holds the same
  moments a single-process run would, and a resume re-shards them onto any number of processes.
- DeepSpeed keeps its optimizer state inside its engine; imtune does not gather it, so `--resume` under DeepSpeed is
  refused rather than continued with fresh moments (callers check `resume_supported`).
"""
from __future__ import annotations

import contextlib
import os

from imtune.types import UsageError


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config sets this for every process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def needs_cpu_fsdp(acc) -> bool:
    """FSDP was asked for, but accelerate runs a plain multi-CPU job: imtune shards the model itself."""
    from accelerate.utils import DistributedType

    return fsdp_requested() and acc.distributed_type == DistributedType.MULTI_CPU


def shard_on_cpu(objective, acc) -> None:
    """fully_shard every decoder layer (the model's `_no_split_modules` classes), then the root, in place, on a 1-D
    CPU mesh over all processes (gloo). Parameters become DTensor shards: build the optimizer afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (acc.num_processes,))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")
    names = set(getattr(objective, "_no_split_modules", None) or [])
    layers = [m for m in objective.modules() if type(m).__name__ in names]
    if not layers:
        raise UsageError(f"FSDP: {type(objective.model).__name__} names no decoder layer class (_no_split_modules) "
                         "to shard; use DDP (configs/accelerate/ddp.yaml) for this model")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(objective, mesh=mesh, reshard_after_forward=reshard)


def is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) or isinstance(getattr(module, "module", None), FSDPModule)


def _fsdp_module(module):
    from torch.distributed.fsdp import FSDPModule

    return module if isinstance(module, FSDPModule) else module.module


@contextlib.contextmanager
def gradient_sync(acc, objective, sync: bool):
    """Reduce gradients across processes only on the last backward of an optimizer step. FSDP2 modules are told
    directly (reduce-scatter skipped, unsharded gradients accumulated); DDP skips its all-reduce inside no_sync;
    DeepSpeed, which reduces and steps inside backward(), is told where the step's boundary is."""
    if is_fsdp(objective):
        _fsdp_module(objective).set_requires_gradient_sync(sync)
        yield
        return
    if acc.state.deepspeed_plugin is not None:
        acc.gradient_state._set_sync_gradients(sync)
    with contextlib.nullcontext() if sync else acc.no_sync(objective):
        yield


def full_tensor(t):
    """A DTensor (FSDP2 gradient norm, parameter) as the plain full tensor; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_model_state(objective) -> dict:
    """The full weights of an FSDP2-sharded Objective, gathered (every rank must call; rank 0 gets the tensors),
    keyed as the causal LM's own state_dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = _fsdp_module(objective)
    full = get_model_state_dict(module, options=StateDictOptions(**_FULL))
    # Tied weights (lm_head = embeddings) are one Parameter under two names: keep the first, as save_pretrained does.
    seen, tied = set(), set()
    for k, v in module.state_dict(keep_vars=True).items():
        (tied.add(k) if id(v) in seen else seen.add(id(v)))
    return {k.removeprefix("model."): v for k, v in full.items() if k not in tied}


class FullStateOptimizer:
    """The optimizer of an FSDP2 run as the checkpoint code sees it: `state_dict()` gathers the AdamW state into one
    full state dict keyed by parameter name (a collective: every rank calls it), `load_state_dict(full)` re-shards
    such a dict onto this run's processes (any number of them)."""

    def __init__(self, objective, optimizer):
        self.module, self.optimizer = _fsdp_module(objective), _inner(optimizer)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=StateDictOptions(**_FULL))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def resume_supported(acc) -> bool:
    return acc.state.deepspeed_plugin is None
