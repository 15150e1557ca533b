"""What `train.setup` builds to train with: the accelerator, the model (LoRA, gradient checkpointing, compile, the KL
reference), the objective and AdamW prepared by accelerate (DDP / FSDP / DeepSpeed), and the lr schedule.

Every function here is called once per run by train.setup; none reads the data."""
from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path

from imtune.config import TrainConfig
from imtune.model.models import load_model, resolve
from imtune.model.objective import Objective
from imtune.train.distributed import needs_cpu_fsdp, shard_on_cpu
from imtune.types import UsageError


def make_accelerator(cfg: TrainConfig, precision):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    AcceleratorState._reset_state()  # train() may run several times in one process (compare); precision may differ
    cuda = torch.cuda.is_available()
    bf16 = precision.used == "bf16"
    # broadcast_buffers=False: no collective inside forward, so ranks may run stand-in passes independently.
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    ds = acc.state.deepspeed_plugin
    if ds is not None:  # imtune accumulates itself (grad_sync) and feeds no DataLoader to accelerate
        ds.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=1,
                                   gradient_clipping=cfg.max_grad_norm)
    return acc


def set_threads(cfg: TrainConfig, acc) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif acc.device.type == "cpu" and acc.num_processes > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def build_model(cfg: TrainConfig, acc):
    """(model to train, frozen reference or None, base model directory for a LoRA adapter or None)."""

    import torch

    model = load_model(cfg.model, dtype=torch.float32, seed=cfg.seed,  # fp32 master weights; bf16 via autocast
                       attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    src = resolve(cfg.model)
    base_dir = None if src.kind == "random" else str(Path(src.path).resolve()) if src.kind != "hub" else src.path
    ref = None
    if cfg.kl_coef and not cfg.lora:
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        if acc.mixed_precision == "bf16":
            ref = ref.to(torch.bfloat16)
        ref = ref.to(acc.device)
    if cfg.gradient_checkpointing:  # transformers >= 5.2x renamed it; keep the old name for older 5.x
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if cfg.compile:
        compile_layers(model)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        from peft.utils.error import NoMatchingPeftModuleError

        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        try:
            model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                     lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
        except NoMatchingPeftModuleError:  # a flag value only the model can refuse: said for a person
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
            raise UsageError(f"--lora-targets {cfg.lora_targets}: no such module in {cfg.model}; its linear modules: "
                             f"{', '.join(linear)} (or all-linear)") from None
    return model, ref, base_dir


def compile_layers(model) -> None:
    """torch.compile every decoder layer in place (torchtune's per-layer habit: the layers share one compiled graph,
    so the compile is paid once, and the loss code that calls the decoder directly still runs compiled layers)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise UsageError(f"--compile: {type(model).__name__} has no model.layers to compile")
    for layer in layers:
        layer.compile(dynamic=False)


def build_optimizer(cfg: TrainConfig, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on biases / norms
    # fused: one kernel for the whole update (CPU and GPU); 7.7x faster than the default foreach step on this CPU
    # (BENCHMARKS.md, "Loss head and optimizer"). Same arithmetic, rounding may differ in the last bits.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.peak_lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=True)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then linear/cosine/constant.
    Never 0 at a step that is taken (the first warm-up step already moves, the last decay step still does)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    import torch

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=warmup, total=total_steps, kind=cfg.lr_schedule))


def build_training(cfg: TrainConfig, acc, model, ref, total_steps: int) -> tuple:
    """(objective, optimizer, lr scheduler) for `model`: the Objective and AdamW prepared by accelerate (the objective
    DDP/FSDP-wrapped, the optimizer over its parameters or shards); fit steps the scheduler once per optimizer step."""
    objective = Objective(model, cfg.chunk_size, cfg.neftune_alpha, ref)
    # accelerate runs FSDP on accelerators only: on CPU imtune shards (imtune.train.distributed)
    if needs_cpu_fsdp(acc):
        shard_on_cpu(objective, acc)
        optimizer = build_optimizer(cfg, model)  # over the DTensor shards
        prepared = objective, acc.prepare(optimizer)
    else:
        optimizer = build_optimizer(cfg, model)
        prepared = acc.prepare(objective, optimizer)
    return (*prepared, build_scheduler(cfg, optimizer, total_steps))
