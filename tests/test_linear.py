"""The column-blocked LM head equals F.linear (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mythos_kernels as K


@pytest.mark.parametrize("shape", [(1, 1, 40), (2, 7, 40), (3, 40), (5, 30, 40)])
@pytest.mark.parametrize("V", [97, 4096, 9001])
def test_lm_head_matches_linear(shape, V):
    x = torch.randn(*shape)
    w = torch.randn(V, shape[-1]) * 0.1
    with torch.no_grad():
        out = K.lm_head(x, w)
    ref = F.linear(x, w)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_lm_head_gradients():
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = (torch.randn(9001, 24) * 0.1).requires_grad_()
    g = torch.randn(2, 5, 9001)
    gx, gw = torch.autograd.grad((K.lm_head(x, w) * g).sum(), [x, w])
    rx, rw = torch.autograd.grad((F.linear(x, w) * g).sum(), [x, w])
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_decode_head_copy_follows_weight_changes():
    """The decode path's transposed copy is remade when the weight changes in place, and a new
    weight never reuses a stale copy. (Tolerance: the copy sums in another order.)"""
    x = torch.randn(1, 1, 24)
    w = torch.randn(9001, 24)
    with torch.no_grad():
        a = K.lm_head(x, w)
        torch.testing.assert_close(a, F.linear(x, w), rtol=1e-5, atol=1e-5)
        w.mul_(-2.0)                                  # in place (an optimizer step)
        torch.testing.assert_close(K.lm_head(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        w[3].zero_()                                  # a partial in-place write
        torch.testing.assert_close(K.lm_head(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        for _ in range(3):                            # fresh tensors (ids may be recycled)
            w = torch.randn(9001, 24)
            torch.testing.assert_close(K.lm_head(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_decode_head_with_inference_tensors():
    """A weight made under inference_mode has no version counter: plain F.linear, no error."""
    with torch.inference_mode():
        w = torch.randn(9001, 24)
        x = torch.randn(1, 24)
        torch.testing.assert_close(K.lm_head(x, w), F.linear(x, w))
