"""GradSink: a tied embedding / head weight's gradient summed in one buffer by the ops that
deposit into it (the fused linear + cross-entropy, the sink embedding), against autograd's own
sum over ``F.embedding`` and ``F.cross_entropy(x @ W.T)``: odd shapes, the three reductions,
fp32 and bf16, an output gradient other than 1, extra direct uses of the weight, one backward
only, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, gen, needs_kernels

from mythos_kernels import GradSink, linear_cross_entropy, sink_embedding, use_backend

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
IMPLS = [pytest.param("reference"), pytest.param("triton", marks=needs_kernels)]


def _tied(V, D, B, T, dtype, seed):
    """A tiny tied LM: ids [B, T] -> embedding -> tanh mix -> cross-entropy of the next ids."""
    g = gen(seed)
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    mix = (torch.randn(D, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    tgt = torch.randint(0, V, (B * T,), generator=g)
    tgt[::5] = -100
    return w, mix, ids, tgt


def _loss(w_emb, w_head, mix, ids, tgt, reduction, sink=None):
    h = sink_embedding(ids, w_emb, sink) if sink is not None else F.embedding(ids, w_emb)
    x = torch.tanh(h @ mix).reshape(-1, mix.shape[0])
    return linear_cross_entropy(x, w_head, tgt, reduction=reduction, chunk_size=7, grad_sink=sink)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(53, 24, 3, 5), (9, 8, 1, 2)])       # V, D, B, T
def test_sink_gradients_equal_autograd(impl, dtype, reduction, shape):
    """The weight's gradient through the sink (embedding rows + the loss's dW, an output gradient
    other than 1) equals autograd's sum of the two plain ops; the other parameter's too."""
    V, D, B, T = shape
    w, mix, ids, tgt = _tied(V, D, B, T, dtype, seed=V + D + B)
    with use_backend(impl):
        ref = _loss(w, w, mix, ids, tgt, reduction)
        gout = torch.rand(ref.shape, generator=gen(3)).to(ref.dtype) + 0.5
        dw_ref, dmix_ref = torch.autograd.grad(ref, (w, mix), gout)
        sink = GradSink()
        alias = sink.attach(w)
        out = _loss(alias, alias, mix, ids, tgt, reduction, sink)
        dw, dmix = torch.autograd.grad(out, (w, mix), gout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert_close("dW", dw_ref.float(), dw.float(), TOL[dtype])
    assert_close("dmix", dmix_ref.float(), dmix.float(), TOL[dtype])
    assert sink.take() is None                       # handed over: the sink starts empty again


def test_direct_uses_of_the_alias_are_added():
    """Gradients returned the usual way for the alias (an op that does not know the sink) and
    for the weight itself are added to the sink's sum."""
    w, mix, ids, tgt = _tied(31, 12, 2, 4, torch.float32, seed=4)
    ref = _loss(w, w, mix, ids, tgt, "mean") + (w ** 2).sum() * 0.3 + w.sum() * 0.1
    (dw_ref,) = torch.autograd.grad(ref, (w,))
    sink = GradSink()
    alias = sink.attach(w)
    out = _loss(alias, alias, mix, ids, tgt, "mean", sink) + (alias ** 2).sum() * 0.3 + w.sum() * 0.1
    (dw,) = torch.autograd.grad(out, (w,))
    assert_close("dW", dw_ref, dw, 2e-5)


def test_two_losses_deposit_into_one_sink():
    """Two fused losses on one sink (e.g. two heads' terms): both weight gradients summed."""
    w, mix, ids, tgt = _tied(37, 10, 2, 5, torch.float32, seed=8)
    x = torch.randn(6, 10, generator=gen(9))
    t2 = torch.randint(0, 37, (6,), generator=gen(10))
    ref = _loss(w, w, mix, ids, tgt, "mean") + 0.5 * linear_cross_entropy(x, w, t2)
    (dw_ref,) = torch.autograd.grad(ref, (w,))
    sink = GradSink()
    alias = sink.attach(w)
    out = _loss(alias, alias, mix, ids, tgt, "mean", sink) + 0.5 * linear_cross_entropy(
        x, alias, t2, grad_sink=sink)
    (dw,) = torch.autograd.grad(out, (w,))
    assert_close("dW", dw_ref, dw, 2e-5)


def test_untied_and_unused_paths():
    """The embedding alone through a sink (no fused loss), a sink nothing deposited into (the
    alias used by a plain op only), and an embedding whose weight needs no gradient."""
    w, mix, ids, _ = _tied(17, 6, 2, 3, torch.float32, seed=5)
    ref = (F.embedding(ids, w) @ mix).square().sum()
    sink = GradSink()
    out = (sink_embedding(ids, sink.attach(w), sink) @ mix).square().sum()
    torch.testing.assert_close(torch.autograd.grad(out, w)[0], torch.autograd.grad(ref, w)[0])
    sink = GradSink()
    out = (sink.attach(w) * 2).sum()
    torch.testing.assert_close(torch.autograd.grad(out, w)[0], torch.full_like(w, 2.0))
    frozen = w.detach()
    sink = GradSink()
    y = sink_embedding(ids, sink.attach(frozen), sink)
    assert not y.requires_grad and torch.equal(y, F.embedding(ids, frozen))


def test_the_weight_grad_is_one_buffer_and_accumulates():
    """``loss.backward()`` twice over fresh graphs (gradient accumulation) sums both steps into
    ``.grad``; the first step's ``.grad`` is the sink's buffer itself (no extra [V, D] sum)."""
    w, mix, ids, tgt = _tied(29, 10, 2, 3, torch.float32, seed=6)
    alone = []
    for _ in range(2):
        w.grad = None
        _loss(w, w, mix, ids, tgt, "mean").backward()
        alone.append(w.grad.clone())
    w.grad = None
    for _ in range(2):
        sink = GradSink()
        alias = sink.attach(w)
        _loss(alias, alias, mix, ids, tgt, "mean", sink).backward()
    assert_close("accumulated dW", alone[0] + alone[1], w.grad, 2e-5)


def test_second_backward_through_a_sink_raises():
    w, mix, ids, tgt = _tied(19, 8, 1, 4, torch.float32, seed=7)
    sink = GradSink()
    alias = sink.attach(w)
    out = _loss(alias, alias, mix, ids, tgt, "mean", sink)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


def test_bad_input():
    w = torch.randn(5, 3, requires_grad=True)
    with pytest.raises(TypeError, match="weight"):
        GradSink().attach([[1.0]])
    with pytest.raises(RuntimeError, match="attach"):
        GradSink().index_add(torch.tensor([0]), torch.ones(1, 3))
    sink = GradSink()
    sink.attach(w)
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        sink.add(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="sink"):
        sink_embedding(torch.tensor([1]), w, object())
    with pytest.raises(TypeError, match="grad_sink"):
        linear_cross_entropy(torch.randn(2, 3), w, torch.tensor([0, 1]), grad_sink="sink")
