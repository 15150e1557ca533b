"""Training throughput on this CPU: real (non-padding) tokens per second, imtune vs TRL's SFTTrainer.

Both sides train the same randomly initialised llama (imtune.model.models.load_model, same seed, sdpa attention) in the
same precision, the one imtune's `--precision auto` picks on this machine (recorded as "precision"), on
the same LIMA conversations (those whose rendering with the default template fits in max_length tokens, so neither
side truncates or drops anything), with the same loss (assistant content + <|im_end|>: imtune `it`, TRL
assistant_only_loss with the same template marked by {% generation %}), the same rows per micro-batch, accumulation,
max length and optimizer (AdamW, lr 2e-5, linear schedule).

All sides live in ONE process and take turns, window by window, so that every repeat measures them seconds apart
under the same machine load, and setup (imports, model init, data preparation) is paid once:
  - TRL runs its own, unmodified `trainer.train()`; a TrainerCallback times each optimizer step (on_step_begin ->
    on_step_end) and, at the end of each TRL window, runs the other sides' windows before TRL continues.
  - imtune runs its own loop, `imtune.train.loop.fit(run)`, one window at a time (a copy of the frozen Run whose
    start_step/total_steps are the window's), timed around the call.
  - other imtune sides (optional, `variants`): imtune with some of benchmarks/bench_variants.py's variants in force
    (the code as it was before issue 7, or changes proposed to the trainer's owner), measured the same way.
Order per repeat: sides in turn, reversed every other repeat. Each side's first window is a warm-up (not measured).
Right before each measured window the matmul peak of that precision is measured (best of 3 torch.mm 2048³), so each
window's FLOP share uses the peak of the same moment. Real tokens are counted from each side's own batches: imtune
from the examples in its micro-batches, TRL by wrapping its data collator.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_peak import matmul_peak  # noqa: E402
from common import GENERATION_TEMPLATE, child_main, fresh_tokenizer, lima_subset  # noqa: E402


def subset(max_length: int) -> str:
    """A JSONL of the LIMA conversations whose rendering fits in max_length tokens (written once per length)."""
    return lima_subset(f"imtune-bench-lima-le{max_length}.jsonl", max_length,
                       lambda examples: {e.source.index for e in examples})


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops_per_token(cfg, n_param: int, attended: float) -> float:
    """Training FLOPs per token: 6·N (forward 2N, backward 4N; with tied embeddings N counts the head matmul once) plus
    causal attention, 6·layers·hidden·T (QK^T and AV: 2·T·hidden each in forward, x3 with backward), T = the mean
    number of positions a token attends to (half its example's length)."""
    return 6.0 * n_param + 6.0 * cfg.num_hidden_layers * cfg.hidden_size * attended


class ImtuneSide:
    def __init__(self, name: str, cfg, variants: list | None = None):
        from imtune.data.pack import padding_fraction
        from imtune.train.loop import setup

        self.variants = list(variants or [])
        if _bench_variants_loaded():
            import bench_variants as P

            P.use(self.variants)
        self.name, self.run, self.done = name, setup(cfg), 0
        # Each epoch's micro-batches computed once, outside the timed windows; epoch 0 now: later monkeypatching of
        # make_batches cannot change it.
        self.batches_of = functools.lru_cache(maxsize=None)(self.run.epoch_batches)
        self.padding = padding_fraction(self.run.examples, self.batches_of(0), cfg.packing, cfg.max_length)
        self.windows: list[dict] = []

    def window(self, steps: int, measured: bool, peak: float | None) -> None:
        from imtune.train.loop import fit

        if _bench_variants_loaded():
            import bench_variants as P

            P.use(self.variants)  # the loss dispatches on this (optimizer and batches were fixed at setup)
        from dataclasses import replace

        run = replace(self.run, start_step=self.done,
                      schedule=replace(self.run.schedule, total_steps=self.done + steps))
        tokens = 0
        for s in range(self.done, self.done + steps):
            epoch, part = run.schedule.step_slice(s)
            tokens += sum(run.lengths[i] for mb in self.batches_of(epoch)[part] for i in mb)
        sync()
        t = time.perf_counter()
        fit(run, self.batches_of)
        sync()
        dt = time.perf_counter() - t
        self.done += steps
        if measured:
            self.windows.append({"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "peak_gflops": peak})


def sync() -> None:
    """Wait for the GPU (if any) so that a wall-clock interval covers the work queued in it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bench_variants_loaded() -> bool:
    return "bench_variants" in sys.modules


def main(model: str, max_length: int, batch_size: int, grad_accum: int, repeats: int, window: int, threads: int,
         warmup: int = 1, trl: dict | None = None, variants: dict | None = None, loss: str = "it",
         device: str = "cpu", imtune: dict | None = None, trl_only: bool = False) -> dict:
    """variants: extra imtune sides, name -> list of benchmarks/bench_variants.py variants (e.g. {"before": [...]}).
    device "cuda": both sides train with bf16 autocast over fp32 master weights (imtune --precision bf16, TRL
    bf16=True) and the peak is the bf16 matrix-multiply peak of 8192³ products on the GPU.
    trl_only: TRL alone in this process (for a GPU too small to hold both sides' models and optimizer states)."""
    gpu = device != "cpu"
    extra = dict(imtune or {})  # more TrainConfig fields for the imtune sides, e.g. {"compile": true}
    import torch

    torch.set_num_threads(threads)
    from imtune.model.precision import resolve

    # Both sides train in the precision imtune's --precision auto picks here (bf16 on a GPU; on a CPU whichever its
    # probe finds faster: fp32 on the AMD EPYC builds), and the peak is that precision's.
    prec = resolve("bf16") if gpu else resolve("auto", model, max_length)
    bf16 = prec.used == "bf16"
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from imtune.config import TrainConfig
    from imtune.model.models import load_model

    datasets.disable_progress_bars()
    data = subset(max_length)
    total = warmup + repeats * window
    mk = lambda tag: TrainConfig(model=model, data=data, max_length=max_length, batch_size=batch_size,  # noqa: E731
                                 grad_accum=grad_accum, max_steps=total, packing=True, loss=loss, lr=2e-5,
                                 lr_schedule="linear", seed=42, output_dir=tempfile.mkdtemp(prefix=f"bench-{tag}-"),
                                 progress=False, threads=threads, precision=prec.used, **extra)
    if variants:
        import bench_variants as P

        P.install()
    sides = {} if trl_only else {"imtune": ImtuneSide("imtune", mk("imtune"))}
    for name, names in (variants or {}).items():
        sides[name] = ImtuneSide(name, mk(name), names)

    # -- TRL: its own trainer and loop
    trl = {"packing": True, **(trl or {})}
    records = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in records])
    net = load_model(model, dtype=torch.float32, seed=42, attn_implementation="sdpa")
    net.config.use_cache = False
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=total,
                     per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                     max_length=trl.pop("max_length", max_length), assistant_only_loss=True, learning_rate=2e-5,
                     lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=not gpu, bf16=bf16, fp16=False, seed=42, data_seed=42,
                     dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, **trl)
    trainer = SFTTrainer(model=net, args=args, train_dataset=ds, processing_class=fresh_tokenizer(GENERATION_TEMPLATE))
    counts: list[tuple[int, int]] = []  # (real tokens, positions computed) per micro-batch, in fetch order
    collate = trainer.data_collator

    def counting(examples):
        b = collate(examples)
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        counts.append((real, b["input_ids"].numel()))
        return b

    trainer.data_collator = counting

    # -- the schedule: warm-up windows, then repeats with the order reversed every other repeat
    names = [*sides, "trl"]
    plan = [(n, warmup, False) for n in names]
    for r in range(repeats):
        plan += [(n, window, True) for n in (names if r % 2 == 0 else names[::-1])]
    trl_windows: list[dict] = []
    state = {"pos": 0, "trl_left": 0, "step": 0, "t0": 0.0, "measured": False, "acc": None}

    def advance() -> None:
        """Run the plan's non-TRL windows up to the next TRL window, then arm it."""
        while state["pos"] < len(plan):
            name, steps, measured = plan[state["pos"]]
            state["pos"] += 1
            peak = None if not measured else matmul_peak(8192, device=device) if gpu else \
                matmul_peak(precision=prec.used)
            if name == "trl":
                state.update(trl_left=steps, measured=measured,
                             acc={"tokens": 0, "seconds": 0.0, "peak_gflops": peak})
                return
            sides[name].window(steps, measured, peak)

    class Driver(TrainerCallback):
        def on_train_begin(self, args, st, control, **kw):
            advance()

        def on_step_begin(self, args, st, control, **kw):
            sync()
            state["t0"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            sync()
            dt = time.perf_counter() - state["t0"]
            k = state["step"]
            state["step"] += 1
            acc = state["acc"]
            acc["seconds"] += dt
            acc["tokens"] += sum(c[0] for c in counts[k * grad_accum:(k + 1) * grad_accum])
            state["trl_left"] -= 1
            if state["trl_left"] == 0:
                if state["measured"]:
                    acc["tokens_per_s"] = acc["tokens"] / acc["seconds"]
                    trl_windows.append(acc)
                advance()

    trainer.add_callback(Driver())
    trainer.train()
    advance()  # whatever follows the last TRL window

    # Padding over TRL's whole epoch (every micro-batch its dataloader gives, collated by its own collator).
    counts.clear()
    for _ in trainer.get_train_dataloader():
        pass
    trl_pad = 1.0 - sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts))
    if trl_only:
        from imtune.data.prepare import prepare_examples
        from imtune.data.weights import loss_spec

        examples = prepare_examples(data, fresh_tokenizer(), loss_spec(loss), max_length=max_length).examples
        lengths, cfg, nparam = [len(e) for e in examples], net.config, n_params(net)
    else:
        run = sides["imtune"].run
        examples, lengths, cfg, nparam = run.examples, run.lengths, run.model.config, n_params(run.model)
    attended = sum(n * n for n in lengths) / (2 * sum(lengths))  # token-weighted mean of half the example length
    out = {"model": model, "params": nparam, "flops_per_token": model_flops_per_token(cfg, nparam, attended),
           "n_examples": len(examples), "imtune_settings": extra, "threads": torch.get_num_threads(), "plan": plan,
           "device": device, "precision": prec.to_dict(),
           "gpu": torch.cuda.get_device_name() if gpu else None,
           "trl": {"windows": trl_windows, "padding": trl_pad, "rows": len(trainer.train_dataset),
                   "settings": {**trl, "padding_free": trainer.padding_free, "optim": args.optim,
                                "torch_compile": args.torch_compile, "attn": net.config._attn_implementation}}}
    for name, s in sides.items():
        out[name] = {"windows": s.windows, "padding": s.padding, "variants": s.variants}
    return out


if __name__ == "__main__":
    child_main(main)
    a = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    print(json.dumps(main(**a), indent=1))
