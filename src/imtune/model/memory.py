"""What training holds in memory, estimated from the model's shape (imtune.model.models.Shape): the activations per
token, the pass cap `--micro-batch-tokens auto` derives from them (`pass_tokens`), and a run's peak (`peak_bytes`).

Activations dominate a full fine-tune's memory on a CPU. Measured with saved-tensor hooks on models shaped like
SmolLM2-135M (hidden 576, intermediate 1536, 30 layers, fp32): training keeps ~50.5 KB per token per layer, so the
default micro-batch of 4 packed rows × 1024 tokens holds ~5.9 GiB of activations, against ~2.2 GB for the weights,
gradients and AdamW's two moments. The estimate below (per token per layer 4 B × (8·hidden + 4·kv_dim +
5·intermediate) for the saved inputs of the linear layers, norms, rotary and SwiGLU, plus 4 B × max_length for
attention's block-diagonal mask row) gives 52.7 KB there at 128 tokens, where the same hooks count 48.2 KB (both
grow by ~4 B per token of row length): a slight overestimate, as a cap should be (tests/test_memory.py measures it).

Splitting is free of statistical effect: the trainer divides Σw·nll by the weight sum W of the whole optimizer step
(imtune.model.loss), so a micro-batch run as several passes of fewer rows gives the same update (tests/test_train.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from imtune.model.models import Shape

# --micro-batch-tokens auto on a CPU: a pass holds at most this many bytes of activations as estimated. SmolLM2-135M at
# max_length 1024: a cap of 953 tokens, so one packed row per pass (a row is never cut), ~1.6 GiB estimated and
# ~1.45 GiB measured; a 1B llama (hidden 2048, 16 layers): 416 tokens, again one row per pass.
ACTIVATION_BUDGET = 1.5 * 2 ** 30


def activation_bytes(shape: Shape, max_length: int, checkpointing: bool = False) -> int:
    """Bytes of activations a training pass keeps per token (fp32; see the module docstring). With gradient
    checkpointing: each layer's input, plus the layer being recomputed: its activations, their gradients and the
    temporaries of both, ~5 layers' worth (measured, SmolLM2-135M, fp32, passes of 512 and 2,048 tokens: peak RSS
    rose by ~345 KB a token, where the layer inputs alone are 69 KB)."""
    per_layer = 4 * (8 * shape.hidden + 4 * shape.kv_dim + 5 * shape.intermediate) + 4 * max_length
    if checkpointing:
        return shape.layers * 4 * shape.hidden + 5 * per_layer
    return shape.layers * per_layer


def pass_tokens(asked: str | int, shape: Shape | None, max_length: int, device: str,
                checkpointing: bool = False) -> int | None:
    """--micro-batch-tokens as positions per forward/backward pass, or None (no cap: one pass per micro-batch).
    auto: none on an accelerator; on a CPU as many as ACTIVATION_BUDGET holds for a model of `shape` (none where the
    shape is unknown: imtune.model.models.model_shape could not read it)."""
    asked = str(asked)
    if asked == "none" or (asked == "auto" and (device != "cpu" or shape is None)):
        return None
    if asked != "auto":
        return int(asked)
    return max(1, int(ACTIVATION_BUDGET // activation_bytes(shape, max_length, checkpointing)))


def pass_size(cap: int | None, batch_size: int, max_length: int) -> int:
    """Positions in the largest pass of a micro-batch of `batch_size` rows of up to `max_length` tokens. split_passes
    joins rows while rows × the longest row stays within `cap`, so shorter rows share a pass up to `cap` positions
    (two rows of ~490 tokens under a cap of 989: measured, the default model's peak rose ~650 MiB with that pass); a
    row is never cut, so one of max_length is a pass alone."""
    return batch_size * max_length if cap is None else min(batch_size * max_length, max(cap, max_length))


@dataclass(frozen=True)
class Peak:
    """A run's estimated peak memory, in bytes, by what holds it."""

    training_state: int  # weights, gradients, AdamW's two moments (fp32; of the trained parameters under LoRA)
    best_copy: int  # --keep-best's copy of the best weights so far
    activations: int  # of the largest pass
    loss_chunk: int  # one chunk of logits and their gradient in the loss head
    tokens_per_pass: int
    lora: bool = False  # the weights are frozen: no gradients or moments of theirs

    @property
    def total(self) -> int:
        return self.training_state + self.best_copy + self.activations + self.loss_chunk

    def text(self) -> str:
        """The plan's line (imtune.train.cost)."""
        parts = [f"{'frozen weights' if self.lora else 'weights, gradients and AdamW moments'} "
                 f"{_gb(self.training_state)}"]
        if self.best_copy:
            parts.append(f"best/ copy {_gb(self.best_copy)}")
        parts += [f"activations of a pass of {self.tokens_per_pass:,} tokens {_gb(self.activations)}",
                  f"a loss chunk {_gb(self.loss_chunk)}"]
        return (f"  peak memory: ~{_gb(self.total)} per run, estimated ({'; '.join(parts)}; fewer tokens a pass: "
                "--micro-batch-tokens)")


def peak_bytes(shape: Shape, params: int, cap: int | None, batch_size: int, max_length: int, chunk_size: int,
               keep_best: bool = False, lora: bool = False, checkpointing: bool = False) -> Peak:
    """Peak memory of training `params` parameters of `shape` in passes of at most `cap` positions."""
    tokens = pass_size(cap, batch_size, max_length)
    return Peak(training_state=(4 * params if lora else 16 * params),  # LoRA: frozen weights only (adapter ≪)
                best_copy=4 * params if keep_best and not lora else 0,
                activations=tokens * activation_bytes(shape, max_length, checkpointing),
                loss_chunk=2 * 4 * min(chunk_size, tokens) * shape.vocab, tokens_per_pass=tokens, lora=lora)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


# What a training process holds besides the run's tensors: Python with torch, transformers and the tokenizer, the
# data and the evaluation sets (measured: ~250 MB after the imports, ~470 MB once SmolLM2-135M's run is set up).
PROCESS_BYTES = 450 * 10 ** 6
LIMIT_SHARE = 0.8  # the default --memory-limit: this share of the memory available when a run starts
LOW_CHUNK = 128  # the loss chunk of a run planned for less memory: [128, vocab] logits and their gradient
SYSTEM_THRESHOLD = 2 ** 20  # a run planned for less memory takes buffers of 1 MiB or more from the system (from_system)


@dataclass(frozen=True)
class Plan:
    """How a run spends memory (imtune.model.memory.plan): what setup builds and fit does."""

    checkpointing: bool  # gradient checkpointing
    pass_tokens: int | None  # positions per forward/backward pass (None: no cap)
    chunk_size: int  # the loss head's chunk
    hold_best: bool  # --keep-best may hold the best weights in memory (else best/ is written at each improvement)
    peak: Peak | None  # estimated, of the run's tensors (None: the model's shape is unknown)
    limit: int | None = None  # bytes the whole process may hold (None: no limit applies)
    changed: tuple[str, ...] = ()  # what was given up to come under the limit

    @property
    def trim(self) -> bool:
        """Give freed memory back to the system after every pass (release()): a run planned for less does."""
        return bool(self.changed)

    def text(self) -> str:
        """The line setup prints when the plan differs from what was asked."""
        if not self.changed:
            return ""
        total = PROCESS_BYTES + self.peak.total
        return (f"memory: planned for the limit of {_gb(self.limit)} (--memory-limit; the default is "
                f"{LIMIT_SHARE:.0%} of the memory available): {', '.join(self.changed)}; estimated peak "
                f"~{_gb(total)}" + ("" if total <= self.limit else " — still above the limit: --lora, a smaller "
                                    "--max-length or a smaller model would fit"))


def plan(cfg, shape: Shape | None, device: str, available: int, processes: int = 1) -> Plan:
    """The memory plan of a run of `cfg` (a TrainConfig) on `device`, `available` bytes free (0: unknown), shared by
    `processes` processes on this machine. On a CPU, a run whose estimated peak is above --memory-limit (default:
    LIMIT_SHARE of `available`) gives up, in this order and only as far as it must: holding best/ in memory (written at
    each improvement instead: ~0.5 GB for SmolLM2-135M), the loss chunk (LOW_CHUNK), activations (gradient
    checkpointing: 20-35% slower steps there), then tokens per pass (down to one row of max_length; only with
    --micro-batch-tokens auto), and gives freed memory back: after every pass (release), and buffers of a MiB or more
    at once (from_system). (In one fp32 process every run's loss head adds its weight's gradient straight into
    .grad: imtune.train.loop.Run.head_grad_direct.) Measured on issue 27's compare (SmolLM2-135M, fp32, passes of 512
    tokens, BENCHMARKS.md): peak RSS 5.0 → 2.7 GiB of the process, at ~25% more wall time."""
    cap = pass_tokens(cfg.micro_batch_tokens, shape, cfg.max_length, device, cfg.gradient_checkpointing)

    def peak_of(ckpt: bool, cap_: int | None, chunk: int, hold: bool) -> Peak | None:
        if shape is None:
            return None
        return peak_bytes(shape, shape.params, cap_, cfg.batch_size, cfg.max_length, chunk, cfg.keep_best and hold,
                          cfg.lora, ckpt)

    limit = (int(cfg.memory_limit * 1e9) if cfg.memory_limit else int(LIMIT_SHARE * available / max(1, processes))
             if available else None)
    asked = Plan(cfg.gradient_checkpointing, cap, cfg.chunk_size, True,
                 peak_of(cfg.gradient_checkpointing, cap, cfg.chunk_size, True), limit)
    if device != "cpu" or limit is None or shape is None or PROCESS_BYTES + asked.peak.total <= limit:
        return asked
    ckpt, chunk, hold, changed = cfg.gradient_checkpointing, cfg.chunk_size, True, []
    fits = lambda: PROCESS_BYTES + peak_of(ckpt, cap, chunk, hold).total <= limit  # noqa: E731
    if cfg.keep_best and not cfg.lora:
        hold = False
        changed.append("best/ written at each improvement, not held")
    if not fits() and chunk > LOW_CHUNK:
        chunk = LOW_CHUNK
        changed.append(f"loss chunks of {chunk} positions")
    if not fits() and not ckpt:
        ckpt = True
        cap = pass_tokens(cfg.micro_batch_tokens, shape, cfg.max_length, device, True)
        changed.append("gradient checkpointing")
    if not fits() and str(cfg.micro_batch_tokens) == "auto":
        row = peak_of(ckpt, 1, chunk, hold)  # one row a pass: what is left for activations beside the rest
        left = limit - PROCESS_BYTES - row.total + row.activations
        per = activation_bytes(shape, cfg.max_length, ckpt)
        cap = max(cfg.max_length, min(cap or cfg.batch_size * cfg.max_length, left // per // cfg.max_length
                                      * cfg.max_length))
        changed.append(f"passes of at most {cap:,} tokens")
    changed.append("freed memory given back after every pass and large buffers at once")
    return Plan(ckpt, cap, chunk, hold, peak_of(ckpt, cap, chunk, hold), limit, tuple(changed))


def available_bytes() -> int:
    """Bytes of memory available now (Linux: MemAvailable), else 0 (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def from_system(threshold: int = SYSTEM_THRESHOLD) -> None:
    """Serve every allocation of `threshold` bytes or more straight from the system from now on, for the rest of the
    process (glibc's mallopt M_MMAP_THRESHOLD; elsewhere a no-op): freeing one gives its pages back at once, instead
    of leaving a hole in the heap that counts until the next release(). Costs a page fault per new page. Measured on
    the issue-27 compare planned for 3 GB (SmolLM2-135M, passes of 512 tokens): peak 3,042-3,088 MiB → 2,868 (1 MB),
    2,988 (2 MB); wall 242 → 284 s (1 MB), 248 s (2 MB)."""
    libc = _glibc()
    if libc:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixed from now on: no dynamic raise)


def release() -> None:
    """Give the memory freed since the last call back to the system (glibc's malloc_trim: whole free pages, also
    inside the heap), so that what one pass freed is not still counted while the next one runs. Elsewhere a no-op."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def _glibc():
    """The C library where it is glibc (malloc_trim and mallopt), else False."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim, _libc.mallopt  # noqa: B018  (musl, macOS: absent)
        except (OSError, AttributeError):
            _libc = False
    return _libc


_libc = None
