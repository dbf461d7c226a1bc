"""Fused linear + cross-entropy against ``F.cross_entropy(x @ W.T)`` (the Triton path runs under
TRITON_INTERPRET=1 on CPU): odd N / D / V, ignore_index, every row ignored, the three reductions,
fp32 and bf16 with paired tolerances, the loss and both gradients; the chunked plain-torch path;
dispatch; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KERNEL_DEVICE, assert_close, gen, needs_kernels

import mythos_kernels.linear_ce as lce
from mythos_kernels import (
    BackendUnavailable,
    dispatch_counts,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    reset_dispatch_counts,
    use_backend,
)
from mythos_kernels.linear_ce import default_chunk_size, linear_cross_entropy_chunked

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}     # relative error, paired with the dtype
SHAPES = [(37, 48, 1001), (5, 17, 3), (64, 32, 130)]  # N, D, V


def _inputs(N, D, V, dtype, seed, ignored=(3,), device=None):
    g = gen(seed)
    x = (torch.randn(N, D, generator=g, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g, device=device) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g, device=device)
    for i in ignored:
        if i < N:
            t[i] = -100
    return x, w, t


def _oracle(x, w, t, reduction, ignore_index=-100):
    """Reference in fp64 (so bf16 is compared against exact math of its inputs)."""
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    return xd, wd, linear_cross_entropy_reference(xd, wd, t, ignore_index, reduction)


def _check_against_oracle(fn, x, w, t, reduction, tol, ignore_index=-100):
    xd, wd, ref = _oracle(x, w, t, reduction, ignore_index)
    out = fn(x, w, t, ignore_index=ignore_index, reduction=reduction)
    assert out.dtype == x.dtype and out.shape == ref.shape
    gout = torch.randn(ref.shape, generator=gen(99), dtype=torch.float64)
    dx_ref, dw_ref = torch.autograd.grad(ref, (xd, wd), gout)
    dx, dw = torch.autograd.grad(out, (x, w), gout.to(out.dtype))
    if reduction == "none":
        assert_close("loss", ref, out, tol)
    else:
        assert abs(out.double().item() - ref.item()) <= tol * max(1.0, abs(ref.item())), \
            f"loss {out.item()} vs {ref.item()}"
    assert_close("dx", dx_ref, dx, tol)
    assert_close("dw", dw_ref, dw, tol)


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Outputs the op allocates uninitialized (or takes from kept buffers) start as NaN: an
    unwritten element fails."""
    def empty(*size, **kw):
        return torch.empty(*size, **kw).fill_(float("nan"))

    def kept(*a, **kw):
        t = real_kept(*a, **kw)
        return t if t is None else t.fill_(float("nan"))
    real_kept = lce.kept_output
    monkeypatch.setattr(lce, "_empty", empty)
    monkeypatch.setattr(lce, "kept_output", kept)


def _force(impl):
    return use_backend("triton" if impl == "triton" else "reference")


IMPLS = [pytest.param("reference"), pytest.param("triton", marks=needs_kernels)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_cross_entropy(impl, dtype, reduction, shape):
    N, D, V = shape
    x, w, t = _inputs(N, D, V, dtype, seed=N + D + V)
    reset_dispatch_counts()
    with _force(impl):
        _check_against_oracle(lambda *a, **k: linear_cross_entropy(*a, chunk_size=16, **k),
                              x, w, t, reduction, TOL[dtype])
    assert dispatch_counts().get(("linear_cross_entropy", impl), 0) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_several_column_blocks(impl, monkeypatch):
    """V larger than the row kernel's block: the online max / sum over several steps."""
    monkeypatch.setattr(lce, "_MAX_BLOCK_V", 128)
    x, w, t = _inputs(19, 24, 517, torch.float32, seed=5, ignored=(0, 7))
    with _force(impl):
        _check_against_oracle(lambda *a, **k: linear_cross_entropy(*a, chunk_size=7, **k),
                              x, w, t, "mean", TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(impl, reduction):
    """No valid target: mean is NaN (as F.cross_entropy), sum 0, none all 0; gradients all 0."""
    x, w, t = _inputs(9, 16, 33, torch.float32, seed=2, ignored=range(9))
    with _force(impl):
        out = linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=4)
    ref = linear_cross_entropy_reference(x, w, t, reduction=reduction)
    torch.testing.assert_close(out, ref, equal_nan=True)
    gout = torch.ones_like(out)
    dx, dw = torch.autograd.grad(out, (x, w), gout)
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [None, 13, 40])
def test_one_or_several_chunks(impl, chunk):
    """The weight gradient written by the first chunk and summed over the later ones (one chunk:
    the default size and a chunk larger than N; several: 13 rows)."""
    x, w, t = _inputs(40, 24, 130, torch.float32, seed=6, ignored=(2, 39))
    with _force(impl):
        _check_against_oracle(lambda *a, **k: linear_cross_entropy(*a, chunk_size=chunk, **k),
                              x, w, t, "sum", TOL[torch.float32])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unit_output_grad_kept_graph(impl, reduction):
    """``loss.backward()`` (output gradient 1) gives the oracle's gradients, and again through a
    kept graph: the second backward adds the same gradients (nothing saved was overwritten)."""
    x, w, t = _inputs(23, 16, 45, torch.float32, seed=8)
    xd, wd, ref = _oracle(x, w, t, reduction)
    dx_ref, dw_ref = torch.autograd.grad(ref, (xd, wd))
    with _force(impl):
        out = linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=8)
    out.backward(retain_graph=True)
    assert_close("dx", dx_ref, x.grad, TOL[torch.float32])
    assert_close("dw", dw_ref, w.grad, TOL[torch.float32])
    first = w.grad.clone()
    out.backward()
    torch.testing.assert_close(w.grad, 2 * first, rtol=0, atol=0)


def test_accumulated_gradient_not_overwritten():
    """Two forward / backward passes into the same ``.grad`` (gradient accumulation) sum the two
    passes' gradients: the second pass's kept weight-gradient buffer is not the one the first
    pass's gradient still holds."""
    x, w, t = _inputs(23, 16, 45, torch.float32, seed=9)
    t2 = t.flip(0)
    alone = []
    for tt in (t, t2):
        w.grad = None                               # dropped: the next pass may reuse its buffer
        linear_cross_entropy(x, w, tt).backward()
        alone.append(w.grad.clone())
    w.grad = None
    linear_cross_entropy(x, w, t).backward()
    linear_cross_entropy(x, w, t2).backward()
    torch.testing.assert_close(w.grad, alone[0] + alone[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_rows(reduction):
    """N = 0: a zero (or empty) loss and zero gradients, no unwritten output."""
    x, w, t = _inputs(0, 16, 33, torch.float32, seed=2, ignored=())
    out = linear_cross_entropy(x, w, t, reduction=reduction)
    dx, dw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("impl", IMPLS)
def test_other_ignore_index_and_one_grad(impl):
    """A non-default ignore_index (a valid-looking negative), gradient wrt x only."""
    x, w, t = _inputs(21, 20, 77, torch.float32, seed=3, ignored=())
    t[[1, 4, 20]] = -1
    w = w.detach()
    ref = linear_cross_entropy_reference(x, w, t, ignore_index=-1)
    with _force(impl):
        out = linear_cross_entropy(x, w, t, ignore_index=-1, chunk_size=5)
    (dx_ref,) = torch.autograd.grad(ref, (x,))
    (dx,) = torch.autograd.grad(out, (x,))
    assert_close("loss", ref.detach(), out.detach(), 2e-5)
    assert_close("dx", dx_ref, dx, 2e-5)


@needs_kernels
def test_triton_row_kernel():
    """The row kernel alone (loss, dz in place, a per-row scale) against the torch row step."""
    g = gen(11)
    z = torch.randn(13, 301, generator=g, device=KERNEL_DEVICE)
    t = torch.randint(0, 301, (13,), generator=g, device=KERNEL_DEVICE)
    t[5] = -100
    scale = torch.rand(13, generator=g, device=KERNEL_DEVICE) + 0.5
    ref_loss, ref_dz = lce._ce_rows_torch(z.clone(), t, scale, -100, True)
    with torch.no_grad():
        loss, dz = lce._ce_rows_triton(z.clone(), t, scale, -100, True)
    assert_close("loss", ref_loss, loss, 1e-5)
    assert_close("dz", ref_dz, dz, 1e-5)
    assert torch.equal(dz[5], torch.zeros_like(dz[5]))


def test_chunked_needs_no_full_logits():
    """The chunked path equals the oracle for every chunk size, one row up to all rows."""
    x, w, t = _inputs(11, 9, 31, torch.float32, seed=4)
    for chunk in (1, 3, 11, 64):
        _check_against_oracle(lambda *a, **k: linear_cross_entropy_chunked(*a, chunk_size=chunk,
                                                                           **k),
                              x, w, t, "mean", 2e-5)


def test_default_chunk_size():
    assert default_chunk_size(16384, 2048, 32000) == 1024        # logits chunk ~ size of x
    assert default_chunk_size(1024, 512, 32000) == 512           # at least 16M elements
    assert default_chunk_size(256, 512, 32000) == 256
    assert default_chunk_size(3, 8, 10) == 3                     # at most N
    assert default_chunk_size(1, 1, 10 ** 9) == 1


def test_no_grad_forward():
    x, w, t = _inputs(10, 12, 50, torch.float32, seed=6)
    with torch.no_grad():
        out = linear_cross_entropy(x, w, t)
    assert not out.requires_grad
    assert_close("loss", linear_cross_entropy_reference(x, w, t).detach(), out, 2e-5)


def test_forced_triton_raises_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, t = _inputs(4, 8, 10, torch.float32, seed=7, device="cpu")
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="linear_cross_entropy"):
        linear_cross_entropy(x, w, t)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(x=torch.randn(4, 8, 1)), ValueError, "x \\[N, D\\]"),
    (dict(weight=torch.randn(10, 7)), ValueError, "shapes disagree"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), ValueError, "shapes disagree"),
    (dict(weight=torch.randn(10, 8, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(target=torch.zeros(4, dtype=torch.int32)), TypeError, "int64"),
    (dict(target=torch.tensor([0, 10, 1, 2])), ValueError, "outside \\[0, 10\\)"),
    (dict(target=torch.tensor([0, -5, 1, 2])), ValueError, "outside"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(x=[[0.0] * 8] * 4), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input(bad, exc, match):
    kw = dict(x=torch.randn(4, 8, device="cpu"), weight=torch.randn(10, 8, device="cpu"),
              target=torch.tensor([0, 9, -100, 3], device="cpu"))
    kw.update(bad)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(**kw)


def test_bytes_and_flops():
    assert lce.linear_cross_entropy_flops(2, 3, 5) == 60.0
    assert math.isclose(lce.linear_cross_entropy_bytes(2, 3, 5, torch.float32),
                        4 * (12 + 30 + 40))


def test_model_loss_through_the_fused_head():
    """On a tiny mythos model, the fused loss from the hidden states equals the cross-entropy of
    the model's logits, and so do the tied weight's gradients (as bench/train.py uses it)."""
    from conftest import tiny_kwargs

    import mythos
    from bench.train import _loss_fn

    torch.manual_seed(0)
    model = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(act_threshold=100.0))).train()
    ids = torch.randint(0, 97, (2, 9), generator=gen(1))
    targets = torch.randint(0, 97, (2, 9), generator=gen(2))
    targets[0, :3] = -100
    grads = {}
    for variant in ("mythos", "mythos+fused-ce"):
        model.zero_grad(set_to_none=True)
        loss = _loss_fn(variant, model, ids, targets, n_loops=2)
        loss.backward()
        grads[variant] = (loss.detach(), model.embed.weight.grad.clone(),
                          model.norm.weight.grad.clone())
    for name, a, b in zip(("loss", "embed.weight grad", "norm.weight grad"),
                          grads["mythos"], grads["mythos+fused-ce"]):
        assert_close(name, a.reshape(-1), b.reshape(-1), 1e-5)
