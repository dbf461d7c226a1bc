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
    x = _rand(3, 9, 130).requires_grad_()
    w = _rand(130).requires_grad_()
    g = torch.randn(3, 9, 130)
    got = torch.autograd.grad((K.rms_norm(x, w, 1e-6) * g).sum(), [x, w])
    want = torch.autograd.grad((_rms_formula(x, w, 1e-6) * g).sum(), [x, w])
    for a, e in zip(got, want):
        assert torch.equal(a, e)


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
