"""imtune.data.pack: bin packing invariants, collate layout, and packed == one example at a time on a real model."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from imtune.data.pack import collate, make_batches, model_inputs, pack_examples, padding_fraction, split_passes
from imtune.model.forward import embed, hidden_states, lm_head
from imtune.model.loss import weighted_nll
from imtune.types import TokenizedExample, UsageError, Where


def _ex(n, start=1, w=None, cls=3):
    return TokenizedExample(list(range(start, start + n)), w if w is not None else [1.0] * n, [cls] * n,
                            Where("data.jsonl", n))


lengths_and_max = st.integers(4, 64).flatmap(
    lambda m: st.tuples(st.lists(st.integers(1, m), min_size=0, max_size=60), st.just(m)))


@settings(max_examples=150, deadline=None)
@given(lengths_and_max)
def test_pack_examples_invariants(case):
    lengths, max_length = case
    examples = [_ex(n) for n in lengths]
    bins = pack_examples(examples, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every example exactly once
    totals = [sum(lengths[i] for i in b) for b in bins]
    assert all(t <= max_length for t in totals)
    # any-fit quality: no two bins could have been one (so at most one bin is at most half full)
    assert all(totals[i] + totals[j] > max_length for i in range(len(bins)) for j in range(i))
    assert pack_examples(examples, max_length) == bins  # deterministic


@settings(max_examples=100, deadline=None)
@given(lengths_and_max, st.integers(1, 5), st.booleans(), st.integers(0, 3))
def test_make_batches_covers_each_example_once_and_collate_reproduces_bins(case, batch_size, packed, seed):
    lengths, max_length = case
    examples = [_ex(n, start=1000 * (i + 1)) for i, n in enumerate(lengths)]  # token id // 1000 - 1 = example
    batches = make_batches(examples, batch_size, max_length, packed, seed=seed, epoch=1)
    assert sorted(i for mb in batches for i in mb) == list(range(len(lengths)))  # each example once per epoch
    assert batches == make_batches(examples, batch_size, max_length, packed, seed=seed, epoch=1)
    rows = []
    for mb in batches:
        batch = collate([examples[i] for i in mb], packed, max_length)
        assert batch.input_ids.shape[0] <= batch_size and batch.n_examples == len(mb)
        assert batch.input_ids.shape[1] <= max_length
        for row in batch.input_ids.tolist():
            rows.append(tuple(sorted({t // 1000 - 1 for t in row if t})))
    if packed:  # the collated rows are exactly the bins of pack_examples
        assert sorted(rows) == sorted(tuple(sorted(b)) for b in pack_examples(examples, max_length))
    else:
        assert len(rows) == len(lengths)


@settings(max_examples=100, deadline=None)
@given(lengths_and_max, st.integers(1, 6), st.booleans(), st.integers(1, 200))
def test_split_passes_keeps_rows_whole_and_each_pass_under_the_cap(case, batch_size, packed, cap):
    """--micro-batch-tokens: a micro-batch's passes hold its examples once, in order; collated, they are exactly its
    rows (never a row cut or rebuilt differently), and a pass holds more than `cap` positions only as a lone row."""
    lengths, max_length = case
    examples = [_ex(n, start=1000 * (i + 1)) for i, n in enumerate(lengths)]
    for mb in make_batches(examples, batch_size, max_length, packed, seed=0, epoch=0):
        passes = split_passes(mb, lengths, packed, max_length, cap)
        assert [i for p in passes for i in p] == mb
        whole = collate([examples[i] for i in mb], packed, max_length)
        rows = whole.input_ids.tolist()
        got = []
        for p in passes:
            b = collate([examples[i] for i in p], packed, max_length)
            assert b.input_ids.numel() <= cap or b.input_ids.shape[0] == 1
            got += [row + [0] * (whole.input_ids.shape[1] - len(row)) for row in b.input_ids.tolist()]
        assert got == rows  # the same rows, in the same order (padding aside)
        assert split_passes(mb, lengths, packed, max_length, None) == [mb]


def test_packed_micro_batches_group_bins_of_similar_length():
    import random

    rnd = random.Random(0)
    # LIMA-like: most examples longer than half a row, so bins fill unevenly
    examples = [_ex(rnd.randint(257, 512) if rnd.random() < 0.6 else rnd.randint(1, 256)) for _ in range(600)]
    batches = make_batches(examples, 4, 512, True, seed=0, epoch=0)
    assert padding_fraction(examples, batches, True, 512) < 0.03  # 1.3%; shuffled bins without grouping: 9.5%
    n_bins = len(pack_examples(examples, 512))
    assert len(batches) == -(-n_bins // 4)
    assert len(make_batches(examples, 4, 512, True, seed=0, epoch=0, drop_last=True)) == n_bins // 4


def test_make_batches_shuffles_per_epoch():
    examples = [_ex(n) for n in range(1, 41)]
    for packed in (False, True):
        e0 = make_batches(examples, 2, 50, packed, seed=0, epoch=0)
        assert e0 != make_batches(examples, 2, 50, packed, seed=0, epoch=1)
        assert e0 != make_batches(examples, 2, 50, packed, seed=1, epoch=0)


def test_collate_packed_layout():
    a = _ex(3, start=10, w=[9.0, 0.5, 1.0], cls=1)  # weights[0] is never used: nothing predicts token 0
    b = _ex(2, start=20, w=[9.0, 2.0], cls=4)
    c = _ex(4, start=30)
    batch = collate([a, b, c], packed=True, max_length=5, pad_id=7)  # rows [a b] and [c] + 1 pad
    assert batch.attention_mask is None and batch.n_tokens == 9 and batch.n_examples == 3
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 7]]
    assert batch.labels.tolist() == [[11, 12, -100, 21, -100], [31, 32, 33, -100, -100]]  # never across examples
    assert batch.weights.tolist() == [[0.5, 1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]]
    assert batch.classes.tolist() == [[1, 1, -1, 4, -1], [3, 3, 3, -1, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # the pad restarts at 0: own block
    assert batch.classes.dtype == torch.int8 and batch.weights.dtype == torch.float32
    assert batch.padding_fraction == pytest.approx(1 / 10)
    assert padding_fraction([a, b, c], [[0, 1, 2]], packed=True, max_length=5) == pytest.approx(1 / 10)
    assert "attention_mask" not in model_inputs(batch) and model_inputs(batch)["use_cache"] is False
    assert collate([a, b, c], packed=True).input_ids.shape == (1, 9)  # no max_length: one row


def test_collate_padded_layout():
    batch = collate([_ex(3, start=10), _ex(1, start=20)], packed=False, pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12], [20, 0, 0]]
    assert batch.labels.tolist() == [[11, 12, -100], [-100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.weights[1].sum() == 0 and batch.padding_fraction == pytest.approx(2 / 6)
    assert model_inputs(batch)["attention_mask"] is batch.attention_mask


def test_too_long_example_raises_a_clear_error():
    examples = [_ex(3), _ex(9)]
    with pytest.raises(UsageError, match=r"data.jsonl:9: example has 9 tokens, more than max_length 8"):
        pack_examples(examples, 8)
    for packed in (True, False):
        with pytest.raises(UsageError, match="more than max_length"):
            make_batches(examples, 2, 8, packed, 0, 0)
        with pytest.raises(UsageError, match="more than max_length"):
            collate(examples, packed, max_length=8)


# --- packed == one at a time, on a real (random, fp32) llama --------------------------------------------------------

@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request):
    from imtune.model.models import load_model

    return load_model("random:tiny", attn_implementation=request.param)


def _random_examples(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(0, 49152, (length,), generator=g).tolist()
        w = (torch.rand(length, generator=g) * (torch.rand(length, generator=g) > 0.3)).tolist()  # some zeros
        out.append(TokenizedExample(ids, w, [3] * length, Where("<t>", k)))
    return out


def _loss_and_grads(model, batch, inputs=None):
    model.zero_grad()
    w, _ = lm_head(model)
    if inputs is None:
        h = hidden_states(model, embed(model, batch.input_ids), batch.position_ids, batch.attention_mask)
    else:  # other model inputs: the flat layout, or a deliberately leaky setup to show the test can fail
        h = model.model(**inputs).last_hidden_state
    s = weighted_nll(h, w, batch.labels, batch.weights, chunk_size=5)
    s.nll_sum.backward()
    return s.nll_sum.detach(), s.weight_sum, {n: p.grad.clone() for n, p in model.named_parameters()}


def _one_at_a_time(model, examples):
    total, wsum, grads = 0.0, 0.0, None
    for e in examples:
        nll, w, g = _loss_and_grads(model, collate([e], packed=False))
        total, wsum = total + nll, wsum + w
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    return total, wsum, grads


def test_packed_and_padded_equal_one_at_a_time(tiny):
    examples = _random_examples()
    ref_nll, ref_w, ref_g = _one_at_a_time(tiny, examples)
    for packed in (False, True):
        batch = collate(examples, packed=packed, max_length=24 if packed else None)
        assert batch.input_ids.shape[0] == (2 if packed else 5)  # packed: several examples per row, padded tail
        nll, w, g = _loss_and_grads(tiny, batch)
        torch.testing.assert_close(w, torch.as_tensor(ref_w))
        torch.testing.assert_close(nll, torch.as_tensor(ref_nll), atol=1e-5, rtol=1e-5)
        for name in g:
            torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)
    # the flat layout (what flash-attention needs): packed rows end to end in one row, same loss and grads
    nll, _, g = _loss_and_grads(tiny, batch, model_inputs(batch, flat=True))
    torch.testing.assert_close(nll, torch.as_tensor(ref_nll), atol=1e-5, rtol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)


def test_attention_leak_would_be_caught(tiny):
    # The same packed batch with the model's default use_cache (a KV cache silently disables packed-sequence
    # detection in transformers 5) or with an all-ones 2D mask: attention crosses examples and the loss differs.
    examples = _random_examples()
    ref_nll, _, _ = _one_at_a_time(tiny, examples)
    batch = collate(examples, packed=True, max_length=24)
    leaky = [dict(input_ids=batch.input_ids, position_ids=batch.position_ids),
             dict(model_inputs(batch), attention_mask=torch.ones_like(batch.input_ids))]
    for inputs in leaky:
        nll, _, _ = _loss_and_grads(tiny, batch, inputs)
        assert (nll - ref_nll).abs() > 1e-3
