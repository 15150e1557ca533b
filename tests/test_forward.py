"""imtune.model.forward: the one forward pass (training, its KL reference, evaluation) keeps packed examples apart
under a flash attention kernel, with several packed rows per batch.

There is no flash-attn on a CPU, so the kernels are swapped for torch ones (scaled_dot_product_attention) one level
below transformers: its own flash_attention_forward / _flash_attention_forward decide, as on a GPU, whether to call
the plain kernel (each row one causal sequence) or the varlen one (and with which cu_seqlens); only the kernel they
call is ours, and it records what it was handed. The model is the random tiny llama in fp32, loaded with sdpa and
switched to flash_attention_2 for the spy.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from imtune.data.pack import collate
from imtune.model.forward import embed, hidden_states, lm_head
from imtune.types import TokenizedExample, Where

# Two packed rows of max_length 12, next-fit in this order: [5, 4, 3] and [6, 2] + a padded tail of 4.
LENGTHS = (5, 4, 3, 6, 2)
MAX_LENGTH = 12
# The examples' spans once the two rows lie end to end (T = 12): the tail (20, 24) is a block of its own.
BLOCKS = [(0, 5), (5, 9), (9, 12), (12, 18), (18, 20), (20, 24)]


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for k, n in enumerate(LENGTHS):
        ids = torch.randint(1, 49152, (n,), generator=g).tolist()
        w = (torch.rand(n, generator=g) + 0.1).tolist()
        out.append(TokenizedExample(ids, w, [3] * n, Where("<t>", k)))
    return out


@pytest.fixture(scope="module")
def tiny():
    from imtune.model.models import load_model

    return load_model("random:tiny", dtype=torch.float32, seed=0)  # sdpa


def _sdpa(q, k, v, causal, scale):
    """q [n, Hq, D], k/v [n, Hk, D] -> [n, Hq, D]: one sequence's attention (grouped-query heads repeated)."""
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


class FlashSpy:
    """Stand-in flash kernels with flash-attn's signatures; `calls` lists ("dense", rows, T) or ("varlen", cu)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def flash(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        self.calls.append(("dense", q.shape[0], q.shape[1]))  # q [B, T, H, D]: each row ONE causal sequence
        return torch.stack([_sdpa(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
               softmax_scale=None, causal=False, **_):
        cu = cu_seqlens_q.tolist()
        assert cu == cu_seqlens_k.tolist()
        self.calls.append(("varlen", cu))
        return torch.cat([_sdpa(q[s:e], k[s:e], v[s:e], causal, softmax_scale) for s, e in zip(cu, cu[1:])])


@contextlib.contextmanager
def flash_spy(model, monkeypatch):
    """`model` runs transformers' flash_attention_2 path with the spy's kernels; yields the spy."""
    import transformers.modeling_flash_attention_utils as fa

    spy = FlashSpy()
    kernels = ((spy.flash, spy.varlen, None, fa._pad_input, fa._unpad_input),
               (fa._lazy_define_process_function(spy.varlen), dict))
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: kernels)
    before = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        yield spy
    finally:
        model.config._attn_implementation = before


def _alone(model, examples):
    """Each example's logits [n, V], run by itself through the model's own forward (sdpa)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0] for e in examples]


def _packed_batch(examples):
    batch = collate(examples, packed=True, max_length=MAX_LENGTH)
    assert batch.input_ids.shape == (2, MAX_LENGTH) and batch.attention_mask is None
    return batch


def test_flash_sees_every_packed_example_alone(tiny, monkeypatch):
    examples = _examples()
    batch = _packed_batch(examples)
    want = _alone(tiny, examples)
    with flash_spy(tiny, monkeypatch) as spy, torch.no_grad():
        h = hidden_states(tiny, embed(tiny, batch.input_ids), batch.position_ids, batch.attention_mask)
    cu = [s for s, _ in BLOCKS] + [BLOCKS[-1][1]]
    assert spy.calls == [("varlen", cu)] * tiny.config.num_hidden_layers  # every layer, every example apart
    assert h.shape == (2, MAX_LENGTH, tiny.config.hidden_size)
    w, b = lm_head(tiny)
    logits = F.linear(h.reshape(-1, h.shape[-1]), w, b)  # [2·T, V], the rows end to end
    for (s, e), ref in zip(BLOCKS, want):
        torch.testing.assert_close(logits[s:e], ref, atol=1e-5, rtol=1e-5)


def test_training_objective_and_its_kl_reference_go_through_it(tiny, monkeypatch):
    from imtune.model.objective import Objective, batch_args

    examples = _examples()
    batch = _packed_batch(examples)
    want = 0.0
    for e, logits in zip(examples, _alone(tiny, examples)):
        nll = F.cross_entropy(logits[:-1], torch.tensor(e.input_ids[1:]), reduction="none")
        want += float((nll * torch.tensor(e.weights[1:])).sum())
    obj = Objective(tiny, chunk_size=4, neftune_alpha=0.0, ref=tiny).train()
    with flash_spy(tiny, monkeypatch) as spy:
        nll, kl, _ = obj(*batch_args(batch), kl=True)
    assert {c[0] for c in spy.calls} == {"varlen"} and len(spy.calls) == 2 * tiny.config.num_hidden_layers
    assert nll.item() == pytest.approx(want, rel=1e-5)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)  # the reference is the model itself
    nll.backward()  # the training pass differentiates through the flat layout
    assert all(p.grad is not None for p in tiny.parameters() if p.requires_grad)
    tiny.zero_grad(set_to_none=True)


def test_evaluation_goes_through_it(tiny, monkeypatch):
    from imtune.evaluate.loss import class_sums

    examples = _examples()
    want = class_sums(tiny, examples, pad_id=0, batch_size=3)  # sdpa
    with flash_spy(tiny, monkeypatch) as spy:
        got = class_sums(tiny, examples, pad_id=0, batch_size=3)  # padded rows: flash unpads by attention_mask
    assert spy.calls and {c[0] for c in spy.calls} == {"varlen"}
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=1e-5)


def test_the_spy_catches_rows_that_are_not_laid_end_to_end(tiny, monkeypatch):
    # Several packed rows straight into the decoder (what training did before imtune.model.forward): transformers'
    # flash path infers no boundaries for a batch of more than one row, and examples attend to each other.
    from imtune.model.forward import decoder

    examples = _examples()
    batch = _packed_batch(examples)
    want = _alone(tiny, examples)
    with flash_spy(tiny, monkeypatch) as spy, torch.no_grad():
        h = decoder(tiny)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    assert spy.calls == [("dense", 2, MAX_LENGTH)] * tiny.config.num_hidden_layers
    logits = F.linear(h.last_hidden_state.reshape(-1, h.last_hidden_state.shape[-1]), *lm_head(tiny))
    s, e = BLOCKS[1]  # the second example of row 0 sees the first
    assert not torch.allclose(logits[s:e], want[1], atol=1e-3)


def test_the_trainer_integration_packs_one_row_that_flash_splits(tiny, monkeypatch):
    # imtune.integrations.hf leaves the forward to transformers' Trainer (model(**batch)), so it does not call
    # hidden_states; its packing collator makes ONE row, which transformers' flash path splits by position_ids.
    from imtune.integrations import hf

    examples = _examples()
    rows = [{"input_ids": e.input_ids, "loss_weights": e.weights} for e in examples]
    inputs = {k: v for k, v in hf.Collator(pad_id=0, packing=True)(rows).items() if k != "labels"}
    want = _alone(tiny, examples)
    with flash_spy(tiny, monkeypatch) as spy, torch.no_grad():
        logits = tiny(**inputs).logits[0]
    cu = [0, 5, 9, 12, 18, 20]  # LENGTHS end to end
    assert spy.calls == [("varlen", cu)] * tiny.config.num_hidden_layers
    for s, e, ref in zip(cu, cu[1:], want):
        torch.testing.assert_close(logits[s:e], ref, atol=1e-5, rtol=1e-5)
