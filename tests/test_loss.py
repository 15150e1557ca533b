"""imtune.model.loss: the chunked weighted NLL equals the naive one (values and gradients); per-sequence weights; the
hidden states and head of imtune.model.forward give the model's own logits."""
import pytest
import torch
import torch.nn.functional as F

from imtune.data.pack import collate, model_inputs
from imtune.model import forward, loss as L
from imtune.types import CLASSES, Examples, TokenizedExample, Where

B, T, H, V = 2, 13, 16, 50


def _data(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, -3:] = -100  # padding
    labels[1, 5] = -100
    weights = torch.rand(B, T, generator=g)
    weights[0, :4] = 0.0  # zero-weight but labelled positions
    weights[labels == -100] = 0.0
    classes = torch.randint(0, len(CLASSES), (B, T), generator=g).to(torch.int8)
    classes[labels == -100] = -1
    return hidden, W, b, labels, weights, classes


def _naive(hidden, W, b, labels, weights):
    logits = F.linear(hidden, W, b).float()  # [B, T, V], all at once
    nll = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none", ignore_index=-100)
    return (nll * weights.reshape(-1)).sum(), nll.reshape(B, T)


def _grads(out, *ts):
    return torch.autograd.grad(out, [t for t in ts if t is not None])


@pytest.mark.parametrize("chunk", [1, 4, 6, 1024])  # the 18 active positions: 6 divides, 4 does not, 1024 > all
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_naive_values_and_grads(chunk, bias):
    hidden, W, b, labels, weights, _ = _data(bias=bias)
    assert int(((labels != -100) & (weights > 0)).sum()) == 18
    got = L.weighted_nll(hidden, W, labels, weights, chunk_size=chunk, lm_head_bias=b)
    ref, _ = _naive(hidden, W, b, labels, weights)
    torch.testing.assert_close(got.nll_sum, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.weight_sum, weights.sum())
    assert not got.weight_sum.requires_grad
    for g1, g2 in zip(_grads(got.nll_sum, hidden, W, b), _grads(ref, hidden, W, b)):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_only_weighted_positions_are_computed_and_chunks_are_bounded(monkeypatch):
    hidden, W, _, labels, weights, _ = _data()
    seen = []
    real = L._chunk_nll_grad
    monkeypatch.setattr(L, "_chunk_nll_grad", lambda h, *a: seen.append(h.shape[0]) or real(h, *a))
    L.weighted_nll(hidden, W, labels, weights, chunk_size=4).nll_sum.backward()
    # 18 positions in chunks of <= 4, each computed once: the gradient is formed in forward, backward recomputes none
    assert max(seen) <= 4 and sum(seen) == 18


@pytest.mark.parametrize("first", [True, False])  # .grad absent (a step's first pass) or holding earlier passes
def test_head_grad_puts_the_head_gradient_straight_into_grad(first):
    """head_grad (the factor backward will apply): the head weight's gradient is in W.grad once forward returns, and
    after backward W.grad and the hidden states' gradient are those of the autograd path; no [V, H] buffer goes
    through autograd (backward hands on none for W)."""
    hidden, W, b, labels, weights, _ = _data(3)
    scale, before = 0.37, torch.randn(V, H)
    ref = L.weighted_nll(hidden, W, labels, weights, chunk_size=4).nll_sum * scale
    g_h, g_w = torch.autograd.grad(ref, [hidden, W])
    W.grad = None if first else before.clone()
    out = L.weighted_nll(hidden, W, labels, weights, chunk_size=4, head_grad=scale)
    assert out.nll_sum.item() * scale == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(W.grad, g_w if first else before + g_w)  # already, before any backward
    (out.nll_sum * scale).backward()
    torch.testing.assert_close(W.grad, g_w if first else before + g_w)  # and nothing more came through autograd
    torch.testing.assert_close(hidden.grad, g_h)


@pytest.mark.parametrize("head_grad", [None, 0.37, 0.0])  # through autograd, straight into .grad, a stand-in pass
@pytest.mark.parametrize("weighted", [True, False])  # positions to score, or none at all
def test_a_fresh_head_gradient_is_written_not_added_to_garbage(monkeypatch, head_grad, weighted):
    """The head's gradient buffer is allocated without zeros and written by the first chunk: whatever the fresh
    memory holds (NaN here) never reaches the gradient, also when no chunk writes it (no position, factor 0)."""
    hidden, W, _, labels, weights, _ = _data(5)
    weights = weights if weighted else torch.zeros(B, T)
    ref = L.weighted_nll(hidden, W, labels, weights, chunk_size=4).nll_sum * (head_grad if head_grad is not None else 1)
    g_w, = torch.autograd.grad(ref, [W], allow_unused=True)
    g_w = torch.zeros_like(W) if g_w is None else g_w
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **k: real(t, **k).fill_(float("nan")))
    W.grad = None
    out = L.weighted_nll(hidden, W, labels, weights, chunk_size=4, head_grad=head_grad)
    (out.nll_sum * (head_grad if head_grad is not None else 1)).backward()
    if not weighted and head_grad is None:
        assert W.grad is None or not W.grad.any()  # nothing to score: no gradient, or zeros
    else:
        torch.testing.assert_close(W.grad, g_w)


def test_all_zero_weights_give_zero_and_backward_works():
    hidden, W, _, labels, _, _ = _data()
    got = L.weighted_nll(hidden, W, labels, torch.zeros(B, T), chunk_size=4)
    assert got.nll_sum.item() == 0.0 and got.weight_sum.item() == 0.0
    got.nll_sum.backward()
    assert hidden.grad is not None and not hidden.grad.any()


def test_per_class_sums_cover_every_labelled_token_unweighted():
    hidden, W, _, labels, weights, classes = _data()
    got = L.weighted_nll(hidden, W, labels, weights, chunk_size=5, classes=classes)
    _, nll = _naive(hidden, W, None, labels, weights)
    for c, name in enumerate(CLASSES):
        sel = (classes == c) & (labels != -100)
        if sel.any():
            s, n = got.per_class[name]
            assert n == sel.sum().item()
            assert s == pytest.approx(nll[sel].sum().item(), abs=1e-4)
        else:
            assert name not in got.per_class
    assert sum(n for _, n in got.per_class.values()) == (labels != -100).sum().item()  # zero-weight ones included


def test_class_nll_sums_each_example_and_class_over_the_scored_classes_only():
    hidden, W, _, labels, weights, classes = _data()
    _, ref = _naive(hidden, W, None, labels, weights)
    groups = torch.arange(B)[:, None].expand(B, T)  # one example per row
    for scored in ([True] * len(CLASSES), [c in ("assistant", "eot") for c in CLASSES]):
        sums, counts = L.class_nll(hidden, W, labels, classes, groups, torch.tensor(scored), chunk_size=3)
        assert sums.shape == counts.shape == (B, len(CLASSES))
        for b in range(B):
            for c in range(len(CLASSES)):
                sel = (classes[b] == c) & (labels[b] != -100)
                want = ref[b][sel].sum().item() if scored[c] else 0.0
                assert sums[b, c].item() == pytest.approx(want, abs=1e-4)
                assert counts[b, c].item() == (sel.sum().item() if scored[c] else 0)


def test_bf16_hidden_works():
    hidden, W, _, labels, weights, _ = _data()
    h16 = hidden.detach().to(torch.bfloat16).requires_grad_()
    got = L.weighted_nll(h16, W, labels, weights, chunk_size=4)
    ref, _ = _naive(h16.detach().float(), W, None, labels, weights)
    assert got.nll_sum.dtype == torch.float32
    torch.testing.assert_close(got.nll_sum, ref, atol=1e-4, rtol=1e-4)  # same inputs, fp32 head: only rounding
    got.nll_sum.backward()
    assert h16.grad.dtype == torch.bfloat16 and h16.grad.abs().sum() > 0


def test_frozen_head_no_grad_and_autocast_match_the_naive_loss():
    hidden, W, b, labels, weights, _ = _data(bias=True)
    ref, _ = _naive(hidden, W, b, labels, weights)
    ref_grads = torch.autograd.grad(ref, [hidden, W, b])
    # a frozen head (LoRA): only dL/dh
    Wf, bf = W.detach(), b.detach()
    got = L.weighted_nll(hidden, Wf, labels, weights, chunk_size=5, lm_head_bias=bf)
    (gh,) = torch.autograd.grad(got.nll_sum, [hidden])
    torch.testing.assert_close(gh, ref_grads[0], atol=1e-5, rtol=1e-5)
    # no grad (evaluation): the same value, nothing attached
    with torch.no_grad():
        got = L.weighted_nll(hidden, W, labels, weights, chunk_size=5, lm_head_bias=b)
    assert not got.nll_sum.requires_grad
    torch.testing.assert_close(got.nll_sum, ref.detach(), atol=1e-5, rtol=1e-5)
    # bf16 autocast: the gradient matmuls follow the forward's dtype; values stay close to fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.weighted_nll(hidden, W, labels, weights, chunk_size=5, lm_head_bias=b)
    for g1, g2 in zip(_grads(got.nll_sum, hidden, W, b), ref_grads):
        assert g1.dtype == g2.dtype
        torch.testing.assert_close(g1, g2, atol=0.1, rtol=0.05)


def _ex(n, w=1.0):
    return TokenizedExample(list(range(1, n + 1)), [w] * n, [3] * n, Where("<t>", 1))


def test_sequence_weights_make_each_example_sum_to_one():
    from imtune.data.pack import per_sequence

    # rows [5, 3], [4] + pad
    batch = collate(per_sequence(Examples.of([_ex(5), _ex(3, 2.0), _ex(4)])), packed=True, max_length=9)
    ids = forward.sequence_ids(batch.position_ids)
    w = batch.weights
    per_seq = torch.zeros(int(ids.max()) + 1).index_add_(0, ids.reshape(-1), w.reshape(-1))
    assert per_seq.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])  # three examples + one padded tail
    assert (w[batch.labels == -100] == 0).all()


def test_sequence_normalisation_gives_mean_over_examples():
    # nll_sum / weight_sum with sequence weights == mean over examples of each example's weighted mean nll
    from imtune.data.pack import per_sequence

    g = torch.Generator().manual_seed(1)
    batch = collate(per_sequence(Examples.of([_ex(6), _ex(3), _ex(5)])), packed=True, max_length=16)
    hidden = torch.randn(*batch.input_ids.shape, H, generator=g)
    W = torch.randn(V, H, generator=g)
    labels = batch.labels.clamp_max(V - 1).where(batch.labels != -100, -100)
    w = batch.weights
    got = L.weighted_nll(hidden, W, labels, w)
    nll = torch.nn.functional.cross_entropy((hidden @ W.T).reshape(-1, V), labels.reshape(-1), reduction="none",
                                            ignore_index=-100).reshape(labels.shape)[0]  # the reference, by hand
    means = [nll[s:e][:-1].mean() for s, e in [(0, 6), (6, 9), (9, 14)]]  # last token of each predicts nothing
    assert got.weight_sum.item() == pytest.approx(3.0)
    assert (got.nll_sum / got.weight_sum).item() == pytest.approx(torch.stack(means).mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def tiny():
    from imtune.model.models import load_model

    return load_model("random:tiny")


def test_hidden_states_and_lm_head_match_the_model_logits(tiny):
    from peft import LoraConfig, get_peft_model

    batch = collate([_ex(7, 1.0), _ex(4, 0.5)], packed=False)
    full = tiny(**model_inputs(batch), output_hidden_states=True)
    ref = full.logits  # [B, T, V]
    keep = batch.labels != -100
    ref_sum = (F.cross_entropy(ref[keep], batch.labels[keep], reduction="none") * batch.weights[keep]).sum()
    w, b = forward.lm_head(tiny)
    assert b is None and w is tiny.model.embed_tokens.weight  # tied

    def hidden(model):
        return forward.hidden_states(model, forward.embed(model, batch.input_ids), batch.position_ids,
                                     batch.attention_mask)

    got = L.weighted_nll(hidden(tiny), w, batch.labels, batch.weights, chunk_size=3)
    torch.testing.assert_close(got.nll_sum, ref_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.hidden_states[-1], hidden(tiny))  # the model's own forward, last hidden state
    peft_model = get_peft_model(tiny, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        w2, _ = forward.lm_head(peft_model)
        assert w2 is w
        got2 = L.weighted_nll(hidden(peft_model), w2, batch.labels, batch.weights)
        torch.testing.assert_close(got2.nll_sum, ref_sum, atol=1e-5, rtol=1e-5)  # LoRA B starts at 0
    finally:
        peft_model.unload()
