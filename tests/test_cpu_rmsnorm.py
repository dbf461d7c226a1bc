"""RMSNorm on the CPU: ``F.rms_norm`` in fp32/fp64, bitwise open-mythos's formula."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import rand as _rand

import mythos_kernels as K

# every test here is of the CPU inference forms: new tensors on the CPU also on a GPU machine
pytestmark = pytest.mark.usefixtures("on_cpu", "no_cpu_size_floors")

L = importlib.import_module("mythos_kernels.cpu.linear")   # the CPU forms (K.dense is the op)
M = importlib.import_module("mythos_kernels.cpu.moe")



def _rms_formula(x, w, eps):
    return x * x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt() * w


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 7, 129), (2, 256, 512), (5, 1), (1, 17, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_rms_norm_fused_is_bitwise_open_mythos(shape, dtype, scale):
    R = importlib.import_module("mythos_kernels.rmsnorm")
    x, w = _rand(*shape, dtype=dtype, scale=scale), _rand(shape[-1], dtype=dtype)
    assert R._fused_ok(x, w)
    assert torch.equal(K.rms_norm(x, w, 1e-6), _rms_formula(x, w, 1e-6))
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2) if x.dim() > 1 else x
    assert torch.equal(K.rms_norm(xt, w, 1e-5), _rms_formula(xt, w, 1e-5))


def test_rms_norm_fused_gradients_equal_the_formula():
    """With the training form off, F.rms_norm's autograd: bitwise the formula's gradients."""
    x = _rand(3, 9, 130).requires_grad_()
    w = _rand(130).requires_grad_()
    g = torch.randn(3, 9, 130)
    with K.cpu_variant("rmsnorm_autograd", False):
        got = torch.autograd.grad((K.rms_norm(x, w, 1e-6) * g).sum(), [x, w])
    want = torch.autograd.grad((_rms_formula(x, w, 1e-6) * g).sum(), [x, w])
    for a, e in zip(got, want):
        assert torch.equal(a, e)


@pytest.mark.parametrize("shape", [(1, 1, 512), (3, 7, 129), (2, 256, 512), (5, 1), (17,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
@pytest.mark.parametrize("needs", ["both", "x", "weight"])
def test_rms_norm_training_form(shape, dtype, scale, needs):
    """The CPU training form: forward bitwise the formula, gradients of x and weight (each alone
    or both) within rounding of the formula's autograd, fresh random inputs and output grads."""
    x0, w0 = _rand(*shape, dtype=dtype, scale=scale), _rand(shape[-1], dtype=dtype)
    g = _rand(*shape, dtype=dtype)
    x = x0.clone().requires_grad_(needs in ("both", "x"))
    w = w0.clone().requires_grad_(needs in ("both", "weight"))
    K.reset_dispatch_counts()
    out = K.rms_norm(x, w, 1e-6)
    assert K.dispatch_counts() == {("rms_norm", "cpu"): 1}
    assert type(out.grad_fn).__name__ == "_RMSNormFnBackward"
    assert torch.equal(out, _rms_formula(x0, w0, 1e-6))
    xr, wr = x0.clone().requires_grad_(x.requires_grad), w0.clone().requires_grad_(w.requires_grad)
    inputs = [t for t in (x, w) if t.requires_grad]
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(_rms_formula(xr, wr, 1e-6), [t for t in (xr, wr) if t.requires_grad], g)
    # rounding scales: dx's terms are ~|g| |w| / rms(x), dweight's sums of |g| |x| / rms(x)
    rms = x0.pow(2).mean(-1, keepdim=True).sqrt()
    scale = {"x": float((g.abs() * w0.abs() / rms).max()),
             "weight": float((g.abs() * x0.abs() / rms).reshape(-1, shape[-1]).sum(0).max())}
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    names = [n for n, t in (("x", x), ("weight", w)) if t.requires_grad]
    for name, a, e in zip(names, got, want):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale[name], msg=lambda m, n=name: f"{n}: {m}")


def test_rms_norm_training_form_nan_row_and_limits():
    """A NaN stays in its row (forward and x's gradient); no double backward; the form does not
    serve without autograd, under no_grad, for bf16 or mixed dtypes."""
    x = _rand(4, 6, 96).requires_grad_()
    w = _rand(96).requires_grad_()
    with torch.no_grad():
        x[1, 2, 3] = float("nan")
    out = K.rms_norm(x, w, 1e-6)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    assert out[1, 2].isnan().all() and not out[1, :2].isnan().any() and not out[0].isnan().any()
    assert dx[1, 2].isnan().all() and not dx[0].isnan().any()
    z = _rand(2, 8).requires_grad_()
    (gz,) = torch.autograd.grad(K.rms_norm(z, _rand(8), 1e-6).pow(2).sum(), [z], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gz.sum().backward()
    for args in ((x.detach(), w.detach()), (x.bfloat16(), w.bfloat16()), (x, w.double())):
        K.reset_dispatch_counts()
        K.rms_norm(*args, 1e-6)
        assert ("rms_norm", "cpu") not in K.dispatch_counts()
    with torch.no_grad():
        K.reset_dispatch_counts()
        K.rms_norm(x, w, 1e-6)
        assert ("rms_norm", "cpu") not in K.dispatch_counts()


@pytest.mark.parametrize("case", ["bf16", "fp16", "mixed", "nan"])
def test_rms_norm_half_and_mixed_keep_the_formula(case):
    """Half types (F.rms_norm would upcast: not open-mythos's rounding) and mixed dtypes take the
    formula itself; a NaN stays in its row."""
    R = importlib.import_module("mythos_kernels.rmsnorm")
    x, w = _rand(4, 6, 96), _rand(96)
    if case == "bf16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "fp16":
        x, w = x.half(), w.half()
    elif case == "mixed":
        w = w.double()
    else:
        x[1, 2, 3] = float("nan")
    out = K.rms_norm(x, w, 1e-6)
    if case == "nan":
        assert R._fused_ok(x, w)
        assert out[1, 2].isnan().all() and not out[1, :2].isnan().any() and not out[0].isnan().any()
        return
    assert not R._fused_ok(x, w)
    assert torch.equal(out, _rms_formula(x, w, 1e-6))


def test_rms_norm_switch_off_takes_the_formula(monkeypatch):
    """The ``rmsnorm`` variant off: the formula itself (F.rms_norm not called), same values."""
    R = importlib.import_module("mythos_kernels.rmsnorm")
    calls = []
    real = R.F.rms_norm
    monkeypatch.setattr(R.F, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = _rand(3, 5, 130), _rand(130)
    on = K.rms_norm(x, w, 1e-6)
    n = len(calls)
    assert n > 0
    with K.cpu_variant("rmsnorm", False):
        assert not R._fused_ok(x, w)
        off = K.rms_norm(x, w, 1e-6)
    assert len(calls) == n and torch.equal(on, off)
