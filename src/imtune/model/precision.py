"""`--precision auto`: the fastest precision this machine trains in, decided by measuring it.

On a GPU: bf16 (mixed: fp32 master weights, bf16 autocast) where the GPU has it, else fp32. On a CPU the answer
differs between machines of the same kind: on an Intel Xeon with AMX (`amx_bf16`) a bf16 matrix product ran 7.3×
faster than fp32 (2,537 vs 347 GFLOP/s, 2 cores), while on AMD EPYC builds bf16 was ~70× slower. A fast product
does not make a fast training step (autocast casts weights every pass; norms, softmax and the optimizer stay fp32),
so `auto` times what it decides about: a few training steps (forward, backward, fused AdamW step) of a small model
shaped like the one to train — its hidden and intermediate sizes and heads, PROBE_LAYERS layers and the same share
of its vocabulary head (vocab × PROBE_LAYERS / layers rows), on one row of min(max_length, 256) tokens — in fp32 and
under bf16 autocast, each after a warm-up step, and picks bf16 only when it is ≥ BF16_MARGIN× faster end to end.
First a 256³ product in both precisions on one thread (milliseconds) rules bf16 out where it is hopeless (≥ 4×
slower than fp32: no step can make that up, and timing bf16 steps there would cost tens of seconds; this AMD EPYC:
~1.5 vs ~78 GFLOP/s), and then the steps are not timed. On this machine the steps themselves, timed once by hand
(2 layers shaped like SmolLM2-135M, 64 tokens, one thread): bf16 58 vs fp32 840 tokens/s, 0.07×. The choice, the
figures and the CPU model are recorded in data_stats.json; the probe runs once per process for each (model shape,
row length): a compare's runs share it.

Several CPU processes (accelerate launch, torchrun) decide once: rank 0 measures and every rank receives its choice
(torch.distributed, over the process group accelerate sets up), so 1 and N processes on the same machine train in the
same precision; measured on each rank, they could choose differently. IMTUNE_CPU_PRECISION=fp32|bf16 in the
environment fixes what `auto` means on a CPU for reproducible runs across machines (the test suite sets fp32: its
equalities are fp32's). IMTUNE_CPU_PROBE="FP32,BF16" (training-step tokens/s) stands in for the measurement, to test
the decision where the hardware cannot show it.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass

from imtune.model.models import Shape, model_shape, random_config

BF16_MARGIN = 1.3  # bf16 must train this much faster than fp32 to be chosen
HOPELESS = 4.0  # bf16 products this many times slower than fp32: the training steps are not timed
PROBE_LAYERS = 2
PROBE_ROW = 256  # tokens of the probe's row (at most; max_length if shorter)


@dataclass(frozen=True)
class Probe:
    """What `auto` measured on a CPU."""

    fp32_gflops: float | None = None  # the 256³ product
    bf16_gflops: float | None = None
    fp32_tokens_per_s: float | None = None  # the training steps (None: not timed, bf16's product was hopeless)
    bf16_tokens_per_s: float | None = None
    trained: str | None = None  # what the step probe trained

    @property
    def bf16_speedup(self) -> float:
        """bf16's speed / fp32's: of the training steps where they were timed, else of the products."""
        if self.bf16_tokens_per_s is not None:
            return self.bf16_tokens_per_s / self.fp32_tokens_per_s
        return self.bf16_gflops / self.fp32_gflops


@dataclass(frozen=True)
class Precision:
    asked: str  # auto | fp32 | bf16
    used: str  # fp32 | bf16
    why: str
    probe: Probe | None = None  # auto on a CPU: what it decided from

    def to_dict(self) -> dict:
        p = self.probe or Probe()
        return {"asked": self.asked, "used": self.used, "why": self.why, "fp32_gflops": p.fp32_gflops,
                "bf16_gflops": p.bf16_gflops, "fp32_tokens_per_s": p.fp32_tokens_per_s,
                "bf16_tokens_per_s": p.bf16_tokens_per_s, "probe": p.trained,
                "bf16_speedup": round(p.bf16_speedup, 3) if self.probe else None, "cpu": cpu_model()}


def resolve(asked: str, model: str | None = "default", max_length: int = PROBE_ROW) -> Precision:
    """What `asked` means here for training `model` on rows of up to `max_length` tokens."""
    import torch

    if asked in ("fp32", "bf16"):
        return Precision(asked, asked, "asked for")
    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return Precision(asked, "bf16" if ok else "fp32", f"GPU {'has' if ok else 'lacks'} bf16")
    fixed = os.environ.get("IMTUNE_CPU_PRECISION")
    if fixed in ("fp32", "bf16"):
        return Precision(asked, fixed, "IMTUNE_CPU_PRECISION")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return _agreed(asked, world, model, max_length)
    return _measured(asked, model, max_length)


def _measured(asked: str, model: str | None, max_length: int, note: str = "") -> Precision:
    shape = model_shape(model)
    if shape is None:  # no config to read: probe the default model's shape (the model load says what is wrong)
        shape, note = Shape.of(random_config("smollm2-135m", 49152, None)), f"; SmolLM2-135M's shape{note}"
    p = probe(shape, min(max_length, PROBE_ROW))
    speedup = p.bf16_speedup
    used = "bf16" if speedup >= BF16_MARGIN else "fp32"
    if p.bf16_tokens_per_s is None:
        why = (f"CPU matmul: bf16 {p.bf16_gflops:.3g} vs fp32 {p.fp32_gflops:.3g} GFLOP/s ({speedup:.2f}×): no "
               f"training step makes that up, steps not timed")
    else:
        why = (f"CPU training step: bf16 {p.bf16_tokens_per_s:,.0f} vs fp32 {p.fp32_tokens_per_s:,.0f} tokens/s "
               f"({speedup:.2f}×; bf16 needs ≥ {BF16_MARGIN}×) on {p.trained}")
    return Precision(asked, used, why + note, p)


def _agreed(asked: str, world: int, model: str | None, max_length: int) -> Precision:
    """Rank 0 measures; every rank gets its Precision (accelerate's PartialState sets up the process group that the
    Accelerator built next reuses)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as imtune.train.build.make_accelerator will ask
    box = [_measured(asked, model, max_length, f"; measured on rank 0 for all {world} processes")
           if state.is_main_process else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def probe(shape, n: int) -> Probe:
    """What `auto` decides from, for a model of `shape` (imtune.model.models.Shape) trained on rows of `n` tokens."""
    fake = os.environ.get("IMTUNE_CPU_PROBE")
    if fake:  # "FP32,BF16" tokens/s: the decision without the hardware (tests; a machine's known figures)
        fp32, bf16 = (float(x) for x in fake.split(","))
        return Probe(fp32_tokens_per_s=fp32, bf16_tokens_per_s=bf16, trained="IMTUNE_CPU_PROBE")
    return _probe(shape, n)


@functools.lru_cache(maxsize=8)
def _probe(shape, n: int) -> Probe:
    """Measured once per process for each (shape, n): the product, then (unless bf16's is hopeless) the steps."""
    fp32_mm, bf16_mm = matmul_speeds()
    if bf16_mm * HOPELESS < fp32_mm:
        return Probe(round(fp32_mm, 1), round(bf16_mm, 1))
    layers = min(PROBE_LAYERS, shape.layers)
    vocab = min(shape.vocab, max(256, round(shape.vocab * layers / shape.layers)))
    fp32, bf16 = step_speeds(shape, n, layers, vocab)
    what = (f"{layers} layers shaped like the model (hidden {shape.hidden}, intermediate {shape.intermediate}, "
            f"{shape.heads} heads), a {vocab:,}-row head, {n} tokens")
    return Probe(round(fp32_mm, 1), round(bf16_mm, 1), round(fp32, 1), round(bf16, 1), what)


def step_speeds(shape, n: int, layers: int, vocab: int, steps: int = 2) -> tuple[float, float]:
    """(fp32, bf16 autocast) training tokens/s of a llama with `shape`'s sizes, `layers` layers and a `vocab`-row
    head on one row of `n` tokens: forward, backward and a fused AdamW step, the best of `steps` after a warm-up."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                      vocab_size=vocab, max_position_embeddings=max(n, 128), tie_word_embeddings=True)
    speeds = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (1, n))
        for bf16 in (False, True):
            model = LlamaForCausalLM(cfg).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as imtune.train.build trains
            best = float("inf")
            for i in range(steps + 1):  # the first is the warm-up
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i:
                    best = min(best, time.perf_counter() - t)
            speeds.append(n / max(best, 1e-9))
            del model, opt
    return speeds[0], speeds[1]


def matmul_speeds(n: int = 256) -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of an n × n product on one thread, each the best of several after a warm-up: the
    pre-check that rules bf16 out in milliseconds where it is far slower (AMD EPYC: ~1.5 vs ~78 GFLOP/s). One thread:
    on a busy machine a product this small on two threads waits at the threads' barrier for the other process's time
    slice (fp32 2.8 GFLOP/s on 2 threads against 78 on one, measured here under load), which would let a hopeless
    bf16 through to the step probe."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gflops(torch.float32, n, 10), _gflops(torch.bfloat16, n, 3)
    finally:
        torch.set_num_threads(threads)


def _gflops(dtype, n: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or None
