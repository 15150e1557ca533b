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
    checkpointing: each layer's input, plus one layer's activations while it is recomputed."""
    per_layer = 4 * (8 * shape.hidden + 4 * shape.kv_dim + 5 * shape.intermediate) + 4 * max_length
    if checkpointing:
        return shape.layers * 4 * shape.hidden + per_layer
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
    """Positions in the largest pass of a micro-batch of `batch_size` rows of up to `max_length` tokens."""
    rows = batch_size if cap is None else max(1, min(batch_size, cap // max_length))
    return rows * max_length


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
