"""MLA kernels against their plain-torch references (run with TRITON_INTERPRET=1 on CPU).

* absorbed flash-decoding (``mla_decode_attention``): split-S + log-sum-exp merge, T >= 1 causal
  queries, int and tensor lengths, the cache beyond S poisoned with NaN;
* absorbed decode (``mla_decode``) equals the decompressed path; token-by-token decode equals a
  full causal forward; open-mythos 0.5.0's ``MLAttention`` with its cache equals the kernels;
* latent decompression (``mla_decompress``): forward and every gradient (c_kv, k_rope, w_up,
  norm weight), fused RMSNorm on and off, strided cache-prefix inputs;
* dispatch: forced triton records the kernel, raises when it cannot run; bad input -> ValueError.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from mythos_kernels import BackendUnavailable, dispatch_counts, reset_dispatch_counts, use_backend
from mythos_kernels.attention import attention_reference
from mythos_kernels.mla import mla_decompress, mla_decompress_reference, mla_decompress_triton
from mythos_kernels.mla_decode import (
    mla_absorb_weights,
    mla_decode,
    mla_decode_attention,
    mla_decode_attention_reference,
    mla_decode_attention_triton,
    mla_decode_reference,
)

# Triton 3.6's interpreter turns 1-element arrays into loop bounds (numpy deprecation, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERP,
                                  reason="needs a GPU or TRITON_INTERPRET=1")

# dtype -> (atol, rtol) for outputs; gradients use relative RMS error bounds below
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}
GRAD_RMS = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    yield


@pytest.fixture
def nan_empty(monkeypatch):
    """Every float torch.empty / empty_like is NaN-filled: unwritten outputs fail loudly."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name, got, ref, dtype):
    atol, rtol = TOL[dtype]
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------
# Absorbed flash-decoding kernel
# ----------------------------------------------------------------------------------------------

# (B, T, H, r, dr, Smax, S)
DECODE_SHAPES = [
    (1, 1, 1, 16, 16, 1, 1),       # S = 1, B = 1, one head
    (2, 1, 3, 48, 16, 37, 29),     # odd S, odd head count, r not a power of two
    (3, 1, 5, 32, 8, 70, 70),      # full capacity, several tiles
    (1, 1, 17, 32, 16, 45, 45),    # more heads than one row block
    (2, 3, 3, 32, 16, 40, 33),     # T > 1 causal queries at the end of the cache
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_attention_matches_reference(nan_empty, shape, dtype, num_splits):
    B, T, H, R, DR, Smax, S = shape
    q_lat = rand(B, T, H, R, dtype=dtype)
    q_rope = rand(B, T, H, DR, dtype=dtype)
    c = rand(B, Smax, R, dtype=dtype)
    kr = rand(B, Smax, DR, dtype=dtype)
    c[:, S:] = float("nan")      # keys beyond S must never be read
    kr[:, S:] = float("nan")
    scale = (16 + DR) ** -0.5
    if T == 1:                   # also the [B, H, r] form
        q_lat, q_rope = q_lat[:, 0], q_rope[:, 0]
    got = mla_decode_attention_triton(q_lat, q_rope, c, kr, S, scale, num_splits=num_splits)
    ref = mla_decode_attention_reference(q_lat, q_rope, c, kr, S, scale)
    assert got.shape == q_lat.shape and got.dtype == dtype
    assert_close("out_lat", got, ref, dtype)


# (B, T, H, r, dr, Smax, S, num_splits): more splits than key tiles (the empty splits carry
# lse = -inf and weigh nothing, T = 1 and 2); 70 splits (a 128-row merge tile, so the merge runs
# in 32-column blocks) with r = 40 (the last column block partly masked)
SPLIT_CASES = [(2, 1, 3, 32, 16, 9, 5, 8), (2, 2, 3, 32, 16, 9, 5, 8), (2, 1, 3, 40, 8, 75, 75, 70)]


@needs_triton
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_decode_attention_empty_splits_and_merge_blocks(nan_empty, case):
    B, T, H, R, DR, Smax, S, splits = case
    q_lat, q_rope = rand(B, T, H, R), rand(B, T, H, DR)
    c, kr = rand(B, Smax, R), rand(B, Smax, DR)
    got = mla_decode_attention_triton(q_lat, q_rope, c, kr, S, 0.3, num_splits=splits, block_n=16)
    ref = mla_decode_attention_reference(q_lat, q_rope, c, kr, S, 0.3)
    assert_close("out_lat", got, ref, torch.float32)


def test_decode_default_splits_fill_the_gpu_at_batch_one():
    """B=1 spreads a 4k cache over many programs (latency-bound otherwise); a full batch keeps
    one wave of programs."""
    from mythos_kernels.mla_decode import mla_decode_num_splits
    cpu = torch.device("cpu")   # planned for an H100's 132 SMs
    assert mla_decode_num_splits(1, 16, 4096, 512, cpu, 32) == 64
    assert mla_decode_num_splits(64, 16, 4096, 512, cpu, 32) == 2
    assert mla_decode_num_splits(1, 16, 40, 512, cpu, 32) == 1


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("T", [1, 2])
def test_decode_attention_tensor_lengths(nan_empty, dtype, per_batch, T):
    """Lengths from a device tensor (CUDA-graph friendly): per batch row or one for all."""
    B, H, R, DR, Smax = 3, 3, 32, 16, 41
    lens = torch.tensor([41, 2, 17] if per_batch else [23], dtype=torch.int32, device=DEVICE)
    q_lat, q_rope = rand(B, T, H, R, dtype=dtype), rand(B, T, H, DR, dtype=dtype)
    c, kr = rand(B, Smax, R, dtype=dtype), rand(B, Smax, DR, dtype=dtype)
    full = lens.expand(B) if not per_batch else lens
    for b in range(B):
        c[b, int(full[b]):] = float("nan")
        kr[b, int(full[b]):] = float("nan")
    got = mla_decode_attention_triton(q_lat, q_rope, c, kr, lens, 0.2, num_splits=4)
    ref = mla_decode_attention_reference(q_lat, q_rope, c, kr, lens, 0.2)
    assert_close("out_lat", got, ref, dtype)


@needs_triton
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_device_lengths_past_capacity_read_no_further(T, num_splits):
    """A device length past the cache's capacity (unchecked: reading it would sync) reads no
    key beyond the capacity: the cache is a view into a larger buffer poisoned past it, and
    the result is the reference's (every key of the capacity, causal limit from the length)."""
    B, H, R, DR, Smax = 2, 3, 24, 8, 7
    buf_c, buf_k = torch.full((B, Smax + 9, R), float("nan"), device=DEVICE), \
        torch.full((B, Smax + 9, DR), float("nan"), device=DEVICE)
    c, kr = buf_c[:, :Smax], buf_k[:, :Smax]
    c.copy_(rand(B, Smax, R))
    kr.copy_(rand(B, Smax, DR))
    q_lat, q_rope = rand(B, T, H, R), rand(B, T, H, DR)
    lens = torch.tensor([Smax + 5, 4], dtype=torch.int32, device=DEVICE)
    got = mla_decode_attention_triton(q_lat, q_rope, c, kr, lens, 0.3, num_splits=num_splits)
    ref = mla_decode_attention_reference(q_lat, q_rope, c, kr, lens, 0.3)
    assert not got.isnan().any()
    assert_close("out_lat", got, ref, torch.float32)


@pytest.mark.parametrize("bad", [3.7, True, "3"])
def test_decode_attention_host_length_must_be_an_int(bad):
    q_lat, q_rope = torch.randn(1, 2, 8), torch.randn(1, 2, 4)
    c, kr = torch.randn(1, 5, 8), torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match="seq_len must be an int"):
        mla_decode_attention(q_lat, q_rope, c, kr, bad, 0.3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2])
def test_absorbed_decode_equals_decompressed(dtype, T):
    """Weight absorption: mla_decode == decompress + softmax attention (the open-mythos path)."""
    B, H, dn, dv, R, DR, Smax, S = 2, 3, 16, 24, 40, 8, 30, 27
    q_nope, q_rope = rand(B, T, H, dn, dtype=dtype), rand(B, T, H, DR, dtype=dtype)
    c, kr = rand(B, Smax, R, dtype=dtype), rand(B, Smax, DR, dtype=dtype)
    w_up = rand(H * (dn + dv), R, dtype=dtype, scale=R ** -0.5)
    scale = (dn + DR) ** -0.5
    ref = mla_decode_reference(q_nope, q_rope, c, kr, w_up, dn, dv, S, scale)
    with use_backend("triton"):
        got = mla_decode(q_nope, q_rope, c, kr, w_up, dn, dv, S, scale, num_splits=2)
    assert got.shape == (B, T, H, dv)
    assert_close("out", got, ref, dtype)
    # and the reference itself equals decompress + attention over the valid prefix
    K, V = mla_decompress_reference(c[:, :S].float(), kr[:, :S].float(), w_up.float(), H, dn, dv)
    q = torch.cat([q_nope, q_rope], -1).float()
    ref2 = attention_reference(q, K, V, scale=scale, causal=True)
    torch.testing.assert_close(ref.float(), ref2.to(dtype).float(), atol=TOL[dtype][0],
                               rtol=TOL[dtype][1])


def test_absorb_weights_views():
    H, dn, dv, R = 3, 4, 5, 7
    w = torch.randn(H * (dn + dv), R)
    wk, wv = mla_absorb_weights(w, H, dn, dv)
    assert wk.shape == (H, dn, R) and wv.shape == (H, dv, R)
    assert torch.equal(wk[1, 2], w[(dn + dv) + 2]) and torch.equal(wv[2, 0], w[2 * (dn + dv) + dn])
    with pytest.raises(ValueError):
        mla_absorb_weights(w, H + 1, dn, dv)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_by_token_decode_equals_full_forward(dtype):
    """Decoding one token at a time over a preallocated latent cache equals the full causal
    forward (decompress + attention) over the same tokens."""
    B, H, dn, dv, R, DR, T, cap = 2, 3, 8, 12, 32, 8, 7, 11
    q_nope, q_rope = rand(B, T, H, dn, dtype=dtype), rand(B, T, H, DR, dtype=dtype)
    c_new, kr_new = rand(B, T, R, dtype=dtype), rand(B, T, DR, dtype=dtype)
    nw = rand(R, dtype=dtype, scale=0.1) + 1
    w_up = rand(H * (dn + dv), R, dtype=dtype, scale=R ** -0.5)
    scale = (dn + DR) ** -0.5
    with use_backend("triton"):
        K, V = mla_decompress(c_new, kr_new, w_up, H, dn, dv, norm_weight=nw)
        full = attention_reference(torch.cat([q_nope, q_rope], -1), K, V, scale=scale)
        cache_c = torch.full((B, cap, R), float("nan"), dtype=dtype, device=DEVICE)
        cache_kr = torch.full((B, cap, DR), float("nan"), dtype=dtype, device=DEVICE)
        steps = []
        for t in range(T):
            var = c_new[:, t].float().pow(2).mean(-1, keepdim=True)
            cache_c[:, t] = (c_new[:, t].float() * torch.rsqrt(var + 1e-6) * nw.float()).to(dtype)
            cache_kr[:, t] = kr_new[:, t]
            steps.append(mla_decode(q_nope[:, t:t + 1], q_rope[:, t:t + 1], cache_c, cache_kr,
                                    w_up, dn, dv, t + 1, scale))
    got = torch.cat(steps, 1)
    assert_close("token-by-token", got, full, dtype)


@needs_triton
def test_decode_dispatch_and_errors():
    B, H, R, DR, Smax = 1, 2, 16, 16, 5
    q_lat, q_rope = rand(B, H, R), rand(B, H, DR)
    c, kr = rand(B, Smax, R), rand(B, Smax, DR)
    reset_dispatch_counts()
    with use_backend("triton"):
        mla_decode_attention(q_lat, q_rope, c, kr, 5, 0.3)
    assert dispatch_counts().get(("mla_decode_attention", "triton"), 0) == 1
    with use_backend("reference"):
        mla_decode_attention(q_lat, q_rope, c, kr, 5, 0.3)
    assert dispatch_counts().get(("mla_decode_attention", "reference"), 0) == 1
    # bad input: clear ValueError before any compute, under every backend
    for backend in ("triton", "reference", "auto"):
        with use_backend(backend):
            with pytest.raises(ValueError, match="seq_len"):
                mla_decode_attention(q_lat, q_rope, c, kr, 6, 0.3)
            with pytest.raises(ValueError, match="seq_len"):
                mla_decode_attention(q_lat, q_rope, c, kr, 0, 0.3)
            with pytest.raises(ValueError, match="latent dims"):
                mla_decode_attention(q_lat, q_rope, c[..., :8], kr, 5, 0.3)
            with pytest.raises(ValueError):
                mla_decode_attention(q_lat, q_rope[:, :1], c, kr, 5, 0.3)
    # forced triton that cannot run raises; auto falls back
    with use_backend("triton"):
        with pytest.raises(BackendUnavailable):
            mla_decode_attention(q_lat.double(), q_rope.double(), c.double(), kr.double(), 5, 0.3)
        with pytest.raises(BackendUnavailable, match="inference-only"):
            mla_decode_attention(q_lat.requires_grad_(), q_rope, c, kr, 5, 0.3)
    with use_backend("auto"):
        out = mla_decode_attention(q_lat.double().detach(), q_rope.double(), c.double(),
                                   kr.double(), 5, 0.3)
    assert out.dtype == torch.float64


def test_decode_bytes():
    from bench.ops_mla import mla_decode_bytes

    assert mla_decode_bytes(1, 4096, 512, 64, 16) == 2 * (4096 * 576 + 16 * (1024 + 64))


# ----------------------------------------------------------------------------------------------
# Latent decompression kernel (forward and backward)
# ----------------------------------------------------------------------------------------------

# (B, S, H, r, dn, dv, dr)
DECOMP_SHAPES = [
    (1, 1, 1, 16, 8, 8, 8),          # S = 1, B = 1
    (2, 5, 3, 40, 8, 12, 8),         # odd S, 3 heads, dn != dv
    (2, 7, 5, 48, 16, 24, 16),       # 5 heads, several column tiles
    (1, 70, 2, 96, 20, 70, 6),       # many row tiles, dv > 64 (two column tiles), dr = 6
    (2, 33, 2, 128, 128, 128, 64),   # the GPU tiles whole: r a multiple of every r / k block
    (1, 9, 3, 192, 64, 64, 32),      # three k blocks (half precision), r tiles 3 even / 2 uneven
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", DECOMP_SHAPES)
@pytest.mark.parametrize("norm", [True, False])
def test_decompress_forward_backward(nan_empty, shape, dtype, norm):
    B, S, H, R, dn, dv, DR = shape
    # c_kv as a strided prefix view of a larger preallocated cache
    cache = rand(B, S + 3, R, dtype=dtype)
    c = cache[:, :S].detach().requires_grad_()
    kr = rand(B, S, DR, dtype=dtype).requires_grad_()
    w = rand(H * (dn + dv), R, dtype=dtype, scale=R ** -0.5).requires_grad_()
    nw = (rand(R, dtype=dtype, scale=0.2) + 1).requires_grad_() if norm else None
    ins = [c, kr, w] + ([nw] if norm else [])
    K, V = mla_decompress_triton(c, kr, w, H, dn, dv, norm_weight=nw, eps=1e-6)
    assert K.shape == (B, S, H, dn + DR) and V.shape == (B, S, H, dv)
    assert K.dtype == V.dtype == dtype
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    K2, V2 = mla_decompress_reference(ref_ins[0], ref_ins[1], ref_ins[2], H, dn, dv,
                                      norm_weight=ref_ins[3] if norm else None, eps=1e-6)
    assert_close("K", K, K2, dtype)
    assert_close("V", V, V2, dtype)
    gK, gV = torch.randn_like(K2), torch.randn_like(V2)
    grads = torch.autograd.grad((K.double() * gK).sum() + (V.double() * gV).sum(), ins)
    ref_grads = torch.autograd.grad((K2 * gK).sum() + (V2 * gV).sum(), ref_ins)
    for name, g, rg in zip(["d_c_kv", "d_k_rope", "d_w_up", "d_norm_weight"], grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), f"{name}: non-finite"
        err = rel_rms(g, rg)
        assert err < GRAD_RMS[dtype], f"{name}: relative RMS error {err:.2e}"


@needs_triton
def test_fp16_both_kernels(nan_empty):
    """fp16: decode kernel and decompression forward + gradients, one odd shape each."""
    dt = torch.float16
    q_lat, q_rope = rand(2, 5, 48, dtype=dt), rand(2, 5, 16, dtype=dt)
    c, kr = rand(2, 23, 48, dtype=dt), rand(2, 23, 16, dtype=dt)
    got = mla_decode_attention_triton(q_lat, q_rope, c, kr, 21, 0.2, num_splits=2)
    assert_close("out_lat", got, mla_decode_attention_reference(q_lat, q_rope, c, kr, 21, 0.2), dt)
    c = c.detach().requires_grad_()
    kr = kr.detach().requires_grad_()
    w = rand(3 * 20, 48, dtype=dt, scale=0.15).requires_grad_()
    nw = (rand(48, dtype=dt, scale=0.1) + 1).requires_grad_()
    K, V = mla_decompress_triton(c, kr, w, 3, 8, 12, norm_weight=nw)
    ref_in = [t.detach().double().requires_grad_() for t in (c, kr, w, nw)]
    K2, V2 = mla_decompress_reference(*ref_in[:3], 3, 8, 12, norm_weight=ref_in[3])
    assert_close("K", K, K2, dt)
    assert_close("V", V, V2, dt)
    gK, gV = torch.randn_like(K2), torch.randn_like(V2)
    grads = torch.autograd.grad((K.double() * gK).sum() + (V.double() * gV).sum(), [c, kr, w, nw])
    ref = torch.autograd.grad((K2 * gK).sum() + (V2 * gV).sum(), ref_in)
    for name, g, rg in zip(["d_c_kv", "d_k_rope", "d_w_up", "d_norm_weight"], grads, ref):
        assert rel_rms(g, rg) < GRAD_RMS[dt], name


@needs_triton
def test_decompress_no_weight_grad():
    """Frozen w_up: the dW kernel is skipped, the other gradients still match."""
    c = rand(1, 4, 16).requires_grad_()
    kr = rand(1, 4, 8).requires_grad_()
    w = rand(2 * 16, 16, scale=0.25)
    K, V = mla_decompress_triton(c, kr, w, 2, 8, 8)
    g = torch.autograd.grad(K.sum() + V.pow(2).sum(), [c, kr])
    K2, V2 = mla_decompress_reference(c, kr, w, 2, 8, 8)
    r = torch.autograd.grad(K2.sum() + V2.pow(2).sum(), [c, kr])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_triton
def test_decompress_grad_of_one_output():
    """Only V used downstream: dK arrives as None."""
    B, S, H, R, dn, dv, DR = 1, 3, 2, 16, 8, 8, 8
    c = rand(B, S, R).requires_grad_()
    kr = rand(B, S, DR).requires_grad_()
    w = rand(H * (dn + dv), R, scale=0.25).requires_grad_()
    _, V = mla_decompress_triton(c, kr, w, H, dn, dv)
    gc, gkr, gw = torch.autograd.grad(V.sum(), [c, kr, w], allow_unused=True)
    _, V2 = mla_decompress_reference(c, kr, w, H, dn, dv)
    rc, _rkr, rw = torch.autograd.grad(V2.sum(), [c, kr, w], allow_unused=True)
    torch.testing.assert_close(gc, rc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)
    assert gkr is not None and torch.count_nonzero(gkr) == 0


@needs_triton
def test_decompress_dispatch_and_errors():
    B, S, H, R, dn, dv, DR = 1, 3, 2, 16, 8, 8, 8
    c, kr, w = rand(B, S, R), rand(B, S, DR), rand(H * (dn + dv), R)
    reset_dispatch_counts()
    with use_backend("triton"):
        mla_decompress(c, kr, w, H, dn, dv)
        mla_decompress(c, kr, w, H, dn, dv, norm_weight=torch.ones(R, device=DEVICE))
    assert dispatch_counts().get(("mla_decompress", "triton"), 0) == 2
    for backend in ("triton", "reference"):
        with use_backend(backend):
            with pytest.raises(ValueError, match="w_up"):
                mla_decompress(c, kr, w, H + 1, dn, dv)
            with pytest.raises(ValueError, match="differ"):
                mla_decompress(c, kr[:, :2], w, H, dn, dv)
            with pytest.raises(ValueError, match="norm_weight"):
                mla_decompress(c, kr, w, H, dn, dv, norm_weight=torch.ones(R + 1))
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="dtypes differ"):
        mla_decompress(c, kr, w.bfloat16(), H, dn, dv)
    with use_backend("auto"):  # float64 on CPU: the reference
        K, _ = mla_decompress(c.double(), kr.double(), w.double(), H, dn, dv)
    assert K.dtype == torch.float64


@needs_triton
def test_decompress_rows_past_the_grid_cap_refused(monkeypatch):
    """More row tiles than CUDA's grid axis 1 takes (B*S over 65535 x 128 rows in half
    precision): the forced kernel refuses by name before any launch; the auto backend serves the
    reference. The cap is lowered here so that a small input crosses it."""
    import mythos_kernels.mla as mla_mod

    B, S, H, R, dn, dv, DR = 2, 40, 2, 16, 8, 8, 8
    c, kr = rand(B, S, R), rand(B, S, DR)
    w = rand(H * (dn + dv), R, scale=R ** -0.5)
    monkeypatch.setattr(mla_mod, "_MAX_GRID_Y", 2)          # fp32 row tile 32: 80 rows -> 3 tiles
    with use_backend("triton"), pytest.raises(BackendUnavailable, match="row tiles"):
        mla_decompress(c, kr, w, H, dn, dv)
    with pytest.raises(ValueError, match="row tiles"):
        mla_decompress_triton(c, kr, w, H, dn, dv)
    reset_dispatch_counts()
    K, V = mla_decompress(c, kr, w, H, dn, dv)               # auto: the reference serves it
    K2, V2 = mla_decompress_reference(c, kr, w, H, dn, dv)
    assert torch.equal(K, K2) and torch.equal(V, V2)
    assert dispatch_counts().get(("mla_decompress", "triton"), 0) == 0
    monkeypatch.setattr(mla_mod, "_MAX_GRID_Y", 3)          # 3 tiles fit: the kernel runs
    with use_backend("triton"):
        mla_decompress(c, kr, w, H, dn, dv)


# ----------------------------------------------------------------------------------------------
# open-mythos 0.5.0 MLAttention with its cache == the kernels
# ----------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("n_heads", [3])
def test_open_mythos_mla_parity_with_cache(om, n_heads):
    """Prefill 5 tokens then decode 3, open-mythos MLAttention (kv_cache dict, torch.cat,
    re-expansion) vs. a compressed preallocated cache + mla_decompress (prefill) and the
    absorbed mla_decode kernel (decode steps), fp32, MYTHOS_BACKEND=triton."""
    cfg = om.MythosConfig(dim=48, n_heads=n_heads, kv_lora_rank=24, q_lora_rank=20,
                          qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, dropout=0.0,
                          attn_type="mla")
    attn = om.MLAttention(cfg).eval()
    with torch.no_grad():
        attn.kv_norm.weight.add_(torch.randn_like(attn.kv_norm.weight) * 0.1)
        attn.q_norm.weight.add_(torch.randn_like(attn.q_norm.weight) * 0.1)
    B, T0, steps = 2, 5, 3
    freqs = om.precompute_rope_freqs(cfg.qk_rope_head_dim, 32)
    x = torch.randn(B, T0 + steps, cfg.dim)
    H, dn, dv, dr, r = n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.qk_rope_head_dim, \
        cfg.kv_lora_rank
    scale = (dn + dr) ** -0.5

    # open-mythos: prefill with the causal mask, then one token at a time
    cache: dict = {}
    mask = torch.full((T0, T0), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = [attn(x[:, :T0], freqs[:T0], mask, cache, "l0")]
        for t in range(T0, T0 + steps):
            ref.append(attn(x[:, t:t + 1], freqs[t:t + 1], None, cache, "l0"))
    ref = torch.cat(ref, 1)

    # ours: compressed cache written by position, one rope key, normalized latent
    cap = 16
    c_cache = torch.full((B, cap, r), float("nan"))
    kr_cache = torch.full((B, cap, dr), float("nan"))

    def project(xs, pos):
        Tn = xs.shape[1]
        c_q = attn.q_norm(attn.q_down(xs))
        q_nope = attn.q_up_nope(c_q).view(B, Tn, H, dn)
        q_rope = om.apply_rope(attn.q_up_rope(c_q).view(B, Tn, H, dr), freqs[pos:pos + Tn])
        kv = attn.kv_down(xs)
        c_raw, k_rope = kv[..., :r], kv[..., r:]
        k_rope = om.apply_rope(k_rope.unsqueeze(2), freqs[pos:pos + Tn]).squeeze(2)
        return q_nope, q_rope, c_raw, k_rope

    reset_dispatch_counts()
    outs = []
    with torch.no_grad(), use_backend("triton"):
        q_nope, q_rope, c_raw, k_rope = project(x[:, :T0], 0)
        c_cache[:, :T0] = attn.kv_norm(c_raw)
        kr_cache[:, :T0] = k_rope
        K, V = mla_decompress(c_raw, k_rope, attn.kv_up.weight, H, dn, dv,
                              norm_weight=attn.kv_norm.weight, eps=attn.kv_norm.eps)
        o = attention_reference(torch.cat([q_nope, q_rope], -1), K, V, scale=scale)
        outs.append(attn.wo(o.reshape(B, T0, -1)))
        for t in range(T0, T0 + steps):
            q_nope, q_rope, c_raw, k_rope = project(x[:, t:t + 1], t)
            c_cache[:, t:t + 1] = attn.kv_norm(c_raw)
            kr_cache[:, t:t + 1] = k_rope
            o = mla_decode(q_nope, q_rope, c_cache, kr_cache, attn.kv_up.weight, dn, dv, t + 1,
                           scale)
            outs.append(attn.wo(o.reshape(B, 1, -1)))
    got = torch.cat(outs, 1)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    counts = dispatch_counts()
    assert counts.get(("mla_decompress", "triton"), 0) == 1
    assert counts.get(("mla_decode_attention", "triton"), 0) == steps


def test_reference_decode_math():
    """The latent reference equals an explicit per-head softmax (guards the reference itself)."""
    B, H, R, DR, S = 1, 2, 6, 4, 5
    q_lat, q_rope = torch.randn(B, H, R), torch.randn(B, H, DR)
    c, kr = torch.randn(B, S, R), torch.randn(B, S, DR)
    out = mla_decode_attention_reference(q_lat, q_rope, c, kr, S, 0.5)
    for h in range(H):
        s = (c[0] @ q_lat[0, h] + kr[0] @ q_rope[0, h]) * 0.5
        torch.testing.assert_close(out[0, h], torch.softmax(s, 0) @ c[0])
    assert math.isfinite(out.sum().item())


# ----------------------------------------------------------------------------------------------
# Model level (guarded: the model is integrated by the lead)
# ----------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parity
def test_model_mla_cache_parity_triton(om):
    """open-mythos 0.5.0 vs mythos, MLA, prefill + cached decode with MYTHOS_BACKEND=triton:
    the decompression kernel serves the prefill, the absorbed kernel the decode steps."""
    pytest.importorskip("mythos")
    from conftest import make_pair, tiny_kwargs

    kw = tiny_kwargs("mla", act_threshold=1e4, max_loop_iters=2)
    a, b = make_pair(om, seed=11, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 9))
    ca, cb = {}, {}
    reset_dispatch_counts()
    with torch.no_grad(), use_backend("triton"):
        outs_b = [b(ids[:, :6], kv_cache=cb)]
        for i in range(6, 9):
            outs_b.append(b(ids[:, i:i + 1], kv_cache=cb, start_pos=i))
    with torch.no_grad():
        outs_a = [a(ids[:, :6], kv_cache=ca)]
        for i in range(6, 9):
            outs_a.append(a(ids[:, i:i + 1], kv_cache=ca, start_pos=i))
    for i, (ra, rb) in enumerate(zip(outs_a, outs_b)):
        err = rel_rms(rb, ra)
        assert err < 1e-5, f"step {i}: relative RMS error {err:.2e}"
    counts = dispatch_counts()
    assert counts.get(("mla_decompress", "triton"), 0) > 0, counts
    assert counts.get(("mla_decode_attention", "triton"), 0) > 0, counts
    assert counts.get(("mla_decompress", "reference"), 0) == 0
    assert counts.get(("mla_decode_attention", "reference"), 0) == 0


@needs_triton
def test_decode_attention_compiles_as_one_op():
    """Under torch.compile the Triton decode is an opaque torch.library op (fake impl for
    tracing): no graph break, same numbers as the eager kernel."""
    import torch._dynamo

    torch._dynamo.reset()
    B, H, S, r, dr = 2, 5, 37, 32, 8
    q = torch.randn(B, H, r, device=DEVICE)
    qr = torch.randn(B, H, dr, device=DEVICE)
    c = torch.randn(B, S, r, device=DEVICE)
    kr = torch.randn(B, S, dr, device=DEVICE)
    lens = torch.tensor([S], dtype=torch.int32, device=DEVICE)

    def f(q, qr, c, kr, lens):
        return mla_decode_attention(q, qr, c, kr, lens, 0.2, num_splits=3) * 2.0

    with use_backend("triton"):
        eager = f(q, qr, c, kr, lens)
        explain = torch._dynamo.explain(f)(q, qr, c, kr, lens)
        compiled = torch.compile(f, fullgraph=True)(q, qr, c, kr, lens)
    assert explain.graph_break_count == 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
