"""The CPU inference paths (no autograd, few rows) against their plain references.

``K.dense`` with at most ``SPLIT_ROWS`` rows multiplies the weight's two row halves in one bmm,
with more rows it calls oneDNN's linear; ``moe_experts`` runs ``moe_experts_cpu``: two pairs per
bmm (strided views of two experts) for at most ``FEW_PAIRS`` (token, slot) pairs, two padded bmms
for balanced routing, sorted segments without pair-order copies (split products for small
segments, oneDNN for large) for skewed routing; ``rms_norm`` is ``F.rms_norm`` in fp32/fp64
(bitwise open-mythos's formula). All are taken only on the CPU without autograd; everything else
goes to ``F.linear`` / the sorted reference, which the fallback tests check too.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import mythos_kernels as K

# every test here is of the CPU inference forms: new tensors on the CPU also on a GPU machine
pytestmark = pytest.mark.usefixtures("on_cpu")

L = importlib.import_module("mythos_kernels.linear")   # the module (K.dense is the function)
M = importlib.import_module("mythos_kernels.moe")


@pytest.fixture(autouse=True)
def _no_size_floors(monkeypatch):
    """These tests use small odd shapes: lower the forms' weight-size floors so that those shapes
    take the forms under test (``test_*_size_floor*`` restore them)."""
    monkeypatch.setattr(L, "SPLIT_MIN_WEIGHT", 1)
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    monkeypatch.setattr(M, "SPLIT_MIN_EXPERT", 1)
    monkeypatch.setattr(L, "two_threads", lambda: True)   # the split forms, whatever the machine


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 4), (8,)])
@pytest.mark.parametrize("N,Kd", [(64, 17), (160, 512), (514, 33), (2048, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_split_path_matches_linear(lead, N, Kd, bias):
    x = _rand(*lead, Kd)
    w = _rand(N, Kd, scale=0.1)
    b = _rand(N) if bias else None
    assert L._split_rows_ok(x, w)          # these shapes take the split path
    with torch.no_grad():
        out = K.dense(x, w, b)
    ref = F.linear(x, w, b)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["offset", "strided"])
def test_dense_split_path_views_of_x(layout):
    """x as a view: rows of a bigger tensor (storage offset), or a non-contiguous slice."""
    big = _rand(5, 3, 70)
    x = big[2:4, 1] if layout == "strided" else big[3, 1:]      # [2, 70] or [2, 70]
    w = _rand(96, 70, scale=0.1)
    assert L._split_rows_ok(x, w)
    with torch.no_grad():
        out = K.dense(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["odd_out", "small_out", "noncontig", "bf16", "empty"])
def test_dense_other_inputs_use_linear(case):
    x, w = _rand(2, 40), _rand(130, 40, scale=0.1)
    if case == "odd_out":
        w = _rand(129, 40)
    elif case == "small_out":
        w = _rand(L.SPLIT_MIN_OUT - 2, 40)
    elif case == "noncontig":
        w = _rand(40, 130).t()
    elif case == "bf16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "empty":
        x = _rand(0, 40)
    with torch.no_grad():
        assert not L._split_rows_ok(x, w) and not L._onednn_ok(x, w)
        out = K.dense(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=0, atol=0)


def _spy_fn(monkeypatch, mod, name):
    """Record calls of mod.<name> (still running it)."""
    calls = []
    real = getattr(mod, name)

    def wrapped(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(mod, name, wrapped)
    return calls


@pytest.mark.parametrize("lead", [(9,), (3, 7), (2, 256), (1, 33)])
@pytest.mark.parametrize("N,Kd", [(1, 40), (130, 40), (769, 128), (64, 513)])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_onednn_path_matches_linear(monkeypatch, lead, N, Kd, bias):
    """More than SPLIT_ROWS rows on the CPU without autograd: oneDNN's linear (where this torch
    has it), within fp32 rounding of F.linear (the weight-size floor lowered so that small odd
    shapes take it)."""
    if not L.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    x, w = _rand(*lead, Kd), _rand(N, Kd, scale=0.1)
    b = _rand(N) if bias else None
    calls = _spy_fn(monkeypatch, L, "onednn_linear")
    with torch.no_grad():
        assert L._onednn_ok(x, w) and not L._split_rows_ok(x, w)
        out = K.dense(x, w, b)
    assert calls
    ref = F.linear(x, w, b)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["x_strided", "w_transposed_view"])
def test_dense_onednn_strided_inputs(monkeypatch, layout):
    """Views: a non-contiguous x; a weight that is the transpose of a [K, N] slice (the routed
    experts' layout, which the sorted MoE form passes)."""
    if not L.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    x, w = _rand(40, 37), _rand(50, 37, scale=0.1)
    if layout == "x_strided":
        x = _rand(37, 80)[:, ::2].t()                      # [40, 37], strides (2, 80)
    else:
        w = _rand(3, 37, 50, scale=0.1)[1].t()             # [50, 37], strides (1, 50)
    with torch.no_grad():
        assert L._onednn_ok(x, w)
        out = L.onednn_linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["env_off", "autograd", "bf16", "few_rows", "unavailable",
                                  "small_weight"])
def test_dense_onednn_declines(monkeypatch, case):
    x, w = _rand(20, 48), _rand(96, 48, scale=0.1)
    if case != "small_weight":
        monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    if case == "env_off":
        monkeypatch.setenv("MYTHOS_CPU_ONEDNN", "0")
    elif case == "autograd":
        x.requires_grad_()
    elif case == "bf16":
        x, w = x.bfloat16(), w.bfloat16()
    elif case == "few_rows":
        x = x[:L.SPLIT_ROWS]
    else:
        monkeypatch.setattr(L, "_ONEDNN", [False])
    calls = _spy_fn(monkeypatch, L, "onednn_linear")
    with torch.no_grad() if case != "autograd" else torch.enable_grad():
        assert not L._onednn_ok(x, w)
        out = K.dense(x, w)
    assert not calls
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_onednn_probe_failure_means_unavailable(monkeypatch):
    """A torch whose oneDNN op raises (or is missing) is probed once as unusable: F.linear."""
    def broken(*a, **k):
        raise RuntimeError("no oneDNN here")

    class FakeOps:
        _linear_pointwise = staticmethod(broken)

    monkeypatch.setattr(L, "_ONEDNN", [])
    monkeypatch.setattr(torch.ops, "mkldnn", FakeOps(), raising=False)
    assert L.onednn_available() is False
    with torch.no_grad():
        x, w = _rand(20, 48), _rand(96, 48)
        torch.testing.assert_close(K.dense(x, w), F.linear(x, w), rtol=0, atol=0)


def test_dense_onednn_nan_stays_in_its_row(monkeypatch):
    if not L.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    x = _rand(30, 64)
    x[11, 5] = float("nan")
    with torch.no_grad():
        out = K.dense(x, _rand(100, 64, scale=0.1))
    assert out[11].isnan().all()
    assert not out[:11].isnan().any() and not out[12:].isnan().any()


@pytest.mark.parametrize("rows", [65, 300])
def test_lm_head_many_rows_onednn(monkeypatch, rows):
    """A forward's head (more than DECODE_ROWS rows, vocab > VOCAB_BLOCK, a weight above the
    size floor): one oneDNN product."""
    if not L.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    x, w = _rand(1, rows, 40), _rand(L.VOCAB_BLOCK + 77, 40, scale=0.1)
    assert w.numel() >= L.ONEDNN_MIN_WEIGHT
    calls = _spy_fn(monkeypatch, L, "onednn_linear")
    with torch.no_grad():
        out = K.lm_head(x, w)
    assert calls
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("MYTHOS_CPU_ONEDNN", "0")         # the column-blocked MKL form
    with torch.no_grad():
        torch.testing.assert_close(K.lm_head(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_dense_and_vecmat_shape_mismatch_raise():
    """Mismatched inner dims take torch's own error (never a strided read of the wrong rows)."""
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            K.dense(_rand(1, 40), _rand(96, 41))
        with pytest.raises(RuntimeError):
            K.dense(_rand(1, 80), _rand(96, 40))         # 2x the inner dim: numel would fit
        with pytest.raises(RuntimeError):
            L.vecmat(_rand(1, 40), _rand(20, 16))


def test_dense_with_autograd_uses_linear_and_grads():
    x = _rand(1, 5, 48).requires_grad_()
    w = _rand(96, 48, scale=0.1).requires_grad_()
    b = _rand(96).requires_grad_()
    assert not L._split_rows_ok(x, w)
    g = torch.randn(1, 5, 96)
    got = torch.autograd.grad((K.dense(x, w, b) * g).sum(), [x, w, b])
    want = torch.autograd.grad((F.linear(x, w, b) * g).sum(), [x, w, b])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("M,Kd,N", [(1, 512, 256), (1, 2, 3), (3, 128, 70), (8, 34, 9)])
def test_vecmat_split_k_matches_matmul(M, Kd, N):
    x, w = _rand(M, Kd), _rand(Kd, N, scale=0.1)
    with torch.no_grad():
        out = L.vecmat(x, w)
    torch.testing.assert_close(out, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["odd_k", "rows", "noncontig", "grad"])
def test_vecmat_other_inputs_use_matmul(case):
    x, w = _rand(2, 40), _rand(40, 24)
    if case == "odd_k":
        x, w = _rand(2, 41), _rand(41, 24)
    elif case == "rows":
        x = _rand(L.SPLIT_ROWS + 1, 40)
    elif case == "noncontig":
        w = _rand(24, 40).t()
    elif case == "grad":
        w.requires_grad_()
    out = L.vecmat(x, w)
    torch.testing.assert_close(out, x @ w, rtol=0, atol=0)
    if case == "grad":
        (g,) = torch.autograd.grad(out.sum(), [w])
        torch.testing.assert_close(g, x.t() @ torch.ones(x.shape[0], 24))


def test_dense_nan_stays_in_its_row():
    """A NaN in one input row poisons that row's outputs only (the halves are separate bmm
    batches: nothing is shared across rows)."""
    x = _rand(3, 64)
    x[1, 7] = float("nan")
    with torch.no_grad():
        out = K.dense(x, _rand(128, 64, scale=0.1))
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


def _route(N, E, k):
    logits = torch.randn(N, E)
    return M.moe_route_reference(logits, torch.randn(E) * 0.1, k)


@pytest.mark.parametrize("N,k,E,D,Fh", [(1, 1, 5, 24, 8), (1, 4, 64, 48, 12), (3, 2, 7, 33, 9),
                                        (8, 4, 16, 40, 20), (4, 3, 3, 16, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_few_pairs_matches_reference(N, k, E, D, Fh, dtype):
    x = _rand(N, D, dtype=dtype)
    w13 = _rand(E, D, 2 * Fh, dtype=dtype, scale=0.2)
    w2 = _rand(E, Fh, D, dtype=dtype, scale=0.2)
    weights, idx = _route(N, E, k)
    weights = weights.to(dtype)
    with torch.no_grad():
        assert M._cpu_inference(x, idx, w13, w2) and idx.numel() <= M.FEW_PAIRS
        K.reset_dispatch_counts()
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert K.dispatch_counts()[("moe_experts", "reference")] == 1
    assert out.shape == ref.shape and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_moe_few_pairs_all_tokens_one_expert():
    """Every token on the same experts (the others empty), idx as int32."""
    N, k, E, D, Fh = 5, 2, 9, 20, 6
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.tensor([[4, 0]] * N, dtype=torch.int32)
    weights = torch.rand(N, k)
    with torch.no_grad():
        out = M.moe_experts_few_pairs(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx.long(), w13, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _spy(monkeypatch, name):
    """Record calls of moe.<name> (still running it)."""
    return _spy_fn(monkeypatch, M, name)


@pytest.mark.parametrize("N,k,E,D,Fh", [(17, 2, 4, 24, 8), (40, 4, 16, 33, 9), (97, 3, 7, 16, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_balanced_routing_takes_padded_form(monkeypatch, N, k, E, D, Fh, dtype):
    x = _rand(N, D, dtype=dtype)
    w13 = _rand(E, D, 2 * Fh, dtype=dtype, scale=0.2)
    w2 = _rand(E, Fh, D, dtype=dtype, scale=0.2)
    # balanced routing in a random order (counts differ by at most one): padding stays small
    idx = (torch.arange(N * k) % E)[torch.randperm(N * k)].view(N, k)
    weights = torch.softmax(torch.randn(N, k), -1).to(dtype)
    padded, sorted_ = _spy(monkeypatch, "moe_experts_padded"), _spy(monkeypatch, "moe_experts_sorted")
    with torch.no_grad():
        assert M._cpu_inference(x, idx, w13, w2) and idx.numel() > M.FEW_PAIRS
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert padded and not sorted_
    assert out.shape == ref.shape and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_moe_uneven_busy_routing_takes_padded_form(monkeypatch):
    """Every expert busy but one holding 3x the mean: the slab is 2.4x the pair rows (the former
    1.5x rule sent this to the sorted form), within the rows PAD_SEGMENT_ROWS credits each of
    the sorted form's segments."""
    N, k, E, D, Fh = 40, 2, 16, 24, 8
    idx = torch.cat([torch.zeros(12, dtype=torch.long), torch.arange(N * k - 12) % (E - 1) + 1])
    idx = idx[torch.randperm(N * k)].view(N, k)
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    assert min(counts) > 0 and E * max(counts) > 1.5 * N * k
    x = _rand(N, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    weights = torch.softmax(torch.randn(N, k), -1)
    padded, sorted_ = _spy(monkeypatch, "moe_experts_padded"), _spy(monkeypatch, "moe_experts_sorted")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert padded and not sorted_
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("counts,pairs,padded,paired", [
    ([3] * 8, 24, True, False),                   # balanced: slab == pairs
    ([1] * 64, 64, True, False),                  # one pair per expert
    ([9, 1, 1, 1, 1, 1, 1, 1], 16, True, False),  # 72 <= 16 + 24 * 8
    ([30, 1, 1, 0, 0, 0, 0, 0], 32, False, False),  # 240 > 32 + 24 * 3: few busy experts
    ([0] * 63 + [40], 40, False, False),          # all on one expert: its segment alone
    ([512] + [0] * 63, 512, False, False),
    ([3] * 8, 24, False, True),                   # paired segments: under 4 rows per expert
    ([1] * 64, 64, False, True),
    ([4] * 8, 32, True, True),                    # 4 rows per expert, balanced
    ([9, 3, 3, 3, 3, 3, 3, 5], 32, True, True),   # 72 <= 32 + 24 * 8
    ([40, 0, 0, 0, 0, 0, 0, 0], 40, False, True),
])
def test_moe_padded_rule(counts, pairs, padded, paired):
    """The rule itself: slab rows E * max(counts) against the pair rows plus PAD_SEGMENT_ROWS per
    non-empty expert, and with paired segments at least PAD_MIN_ROWS pair rows per expert (the
    constants are what these cases are drawn around)."""
    assert M.PAD_SEGMENT_ROWS == 24 and M.PAD_MIN_ROWS == 4
    assert M._padded_is_cheaper(counts, pairs, paired) is padded


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_skewed_routing_takes_sorted_form(monkeypatch, idx_dtype, dtype):
    """Most tokens on two experts of 64, many experts empty: padding every expert to the largest
    count would be ~30x the real rows, so the sorted form runs."""
    N, k, E, D, Fh = 41, 3, 64, 24, 10
    x = _rand(N, D, dtype=dtype)
    w13 = _rand(E, D, 2 * Fh, dtype=dtype, scale=0.2)
    w2 = _rand(E, Fh, D, dtype=dtype, scale=0.2)
    idx = torch.stack([torch.ones(N, dtype=torch.long), torch.zeros(N, dtype=torch.long),
                       torch.randint(2, E, (N,))], 1)
    idx = idx[:, torch.randperm(k)].to(idx_dtype)
    weights = torch.softmax(torch.randn(N, k), -1).to(dtype)
    padded, sorted_ = _spy(monkeypatch, "moe_experts_padded"), _spy(monkeypatch, "moe_experts_sorted")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx.long(), w13, w2)
    assert sorted_ and not padded
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_moe_autograd_takes_the_sorted_reference():
    N, k, E, D, Fh = 3, 2, 6, 16, 4
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh), _rand(E, Fh, D)
    weights, idx = _route(N, E, k)
    x1 = x.clone().requires_grad_()
    assert not M._cpu_inference(x1, idx, w13, w2)
    (gx,) = torch.autograd.grad(K.moe_experts(x1, weights, idx, w13, w2).sum(), [x1])
    x2 = x.clone().requires_grad_()
    (rx,) = torch.autograd.grad(M.moe_experts_reference(x2, weights, idx, w13, w2).sum(), [x2])
    torch.testing.assert_close(gx, rx)


def _shared_ref(x, gates, ups, downs):
    out = 0
    for g, u, d in zip(gates, ups, downs):
        out = out + F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    return out


@pytest.mark.parametrize("S,H,D", [(1, 12, 10), (2, 64, 48), (3, 33, 17)])
@pytest.mark.parametrize("lead", [(1, 1), (2, 3), (40,)])
def test_shared_swiglu_packed_matches_experts(S, H, D, lead):
    gates = [_rand(H, D, scale=0.2) for _ in range(S)]
    ups = [_rand(H, D, scale=0.2) for _ in range(S)]
    downs = [_rand(D, H, scale=0.2) for _ in range(S)]
    x = _rand(*lead, D)
    with torch.no_grad():
        # the model packs only for few rows (decode); the function itself takes any row count
        assert K.packable(x, *gates, *ups, *downs) == (x.numel() <= L.SPLIT_ROWS * D)
        out = K.shared_swiglu_packed(x, gates, ups, downs)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _shared_ref(x, gates, ups, downs), rtol=1e-5, atol=1e-5)


def test_shared_swiglu_packed_follows_weight_changes():
    """The packed copies are remade when a weight changes in place (optimizer step, load) or is
    replaced; a stale pack would give the old experts' output."""
    S, H, D = 2, 16, 8
    lin = [torch.nn.Linear(D, H, bias=False) for _ in range(2 * S)]
    downs = [torch.nn.Linear(H, D, bias=False) for _ in range(S)]
    gates, ups = [m.weight for m in lin[:S]], [m.weight for m in lin[S:]]
    dws = [m.weight for m in downs]
    x = _rand(1, D)
    with torch.no_grad():
        first = K.shared_swiglu_packed(x, gates, ups, dws)
        ups[1].mul_(-2.0)                                     # in place: version counter moves
        dws[0].add_(0.5)
        second = K.shared_swiglu_packed(x, gates, ups, dws)
        torch.testing.assert_close(second, _shared_ref(x, gates, ups, dws), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(first, second)
        gates = [g.clone() for g in gates]                    # new tensors: new cache entries
        gates[0].zero_()
        third = K.shared_swiglu_packed(x, gates, ups, dws)
        torch.testing.assert_close(third, _shared_ref(x, gates, ups, dws), rtol=1e-5, atol=1e-5)


def test_packable_declines():
    w = _rand(8, 4)
    x = _rand(1, 4)
    assert K.packable(x, w)                                      # grad mode on, nothing needs it
    assert not K.packable(x, w.requires_grad_())                 # autograd
    with torch.no_grad():
        assert K.packable(x, w)
        assert not K.packable(x.bfloat16(), w.bfloat16())        # fp32 only
        assert not K.packable(_rand(L.SPLIT_ROWS + 1, 4), w)     # many rows: no copies
        with torch.inference_mode():
            wi = _rand(8, 4)
        assert not K.packable(x, wi)                             # no version counter


def test_shared_swiglu_packed_bad_inputs():
    g, u, d = _rand(6, 4), _rand(6, 4), _rand(4, 6)
    with pytest.raises(ValueError, match="gates"):
        K.shared_swiglu_packed(_rand(1, 4), [g], [u, u], [d])
    with pytest.raises(ValueError, match="every gate/up"):
        K.shared_swiglu_packed(_rand(1, 4), [g], [_rand(5, 4)], [d])
    with pytest.raises(ValueError, match="last dim 8"):
        K.shared_swiglu_packed(_rand(1, 8), [g], [u], [d])   # would reshape into 2 rows


def test_derived_entry_dropped_when_any_source_is_freed():
    a, b = _rand(4, 3), _rand(4, 3)
    key = ("cat_test", id(a), id(b))
    L.derived("cat_test", (a, b), lambda x, y: torch.cat([x, y]))
    assert key in L._DERIVED
    del b                                    # the second source: its id may be reused
    import gc
    gc.collect()
    assert key not in L._DERIVED


@pytest.mark.parametrize("edit", ["data-mul", "data-copy", "numpy", "in-place", "rebind"])
def test_derived_copy_remade_after_any_edit(edit):
    """A cached copy follows its source through edits that bump the version counter (in-place
    ops), move the storage (``.data =``), and that bump nothing (through ``.data``, a numpy
    view): the last are caught by the sampled fingerprint, on every use outside
    ``weights_unchanged``."""
    w = torch.nn.Parameter(_rand(300, 7))
    get = lambda: L.derived("t_test", (w,), lambda t: t.t().contiguous())   # noqa: E731
    assert torch.equal(get(), w.detach().t())
    version = w._version
    with torch.no_grad():
        if edit == "data-mul":
            w.data.mul_(0.5)
        elif edit == "data-copy":
            w.data.copy_(_rand(300, 7))
        elif edit == "numpy":
            w.detach().numpy()[:] = 3.0
        elif edit == "in-place":
            w.add_(1.0)
        else:
            w.data = _rand(300, 7)
    if edit in ("data-mul", "data-copy", "numpy"):
        assert w._version == version                  # nothing for the version check to see
    assert torch.equal(get(), w.detach().t())


def test_weights_unchanged_checks_once_per_context(monkeypatch):
    """Inside ``weights_unchanged()`` each copy's fingerprint is checked on first use only (the
    promise: no weight changes inside); the next context checks again and sees an edit."""
    w = _rand(50, 4)
    calls = []
    real = L._fingerprint
    monkeypatch.setattr(L, "_fingerprint", lambda t: calls.append(1) or real(t))
    get = lambda: L.derived("u_test", (w,), lambda t: t * 2)   # noqa: E731
    get()
    calls.clear()
    with K.weights_unchanged():
        for _ in range(5):
            get()
        with K.weights_unchanged():          # nested: the outer context's check stands
            get()
        assert len(calls) == 1
        w.detach().numpy()[:] = 1.0          # broken promise: not seen inside
        assert not torch.equal(get(), w * 2)
    with K.weights_unchanged():
        assert torch.equal(get(), w * 2)     # seen by the next context's check
    for _ in range(3):                       # outside any context: a check on every use
        get()
    assert len(calls) == 1 + 1 + 3


def test_weight_copies_switch(monkeypatch):
    """MYTHOS_CPU_WEIGHT_COPIES=0: no packed or transposed copies are made (the decode head
    uses the no-copy split product), with the same results; clear_weight_copies frees them."""
    D, H, V = 16, 24, 4096 + 130
    gates = [_rand(H, D, scale=0.2)]
    head = _rand(V, D, scale=0.2)
    x = _rand(1, 1, D)
    with torch.no_grad():
        K.clear_weight_copies()
        want = F.linear(x, head)
        torch.testing.assert_close(K.lm_head(x, head), want, rtol=1e-5, atol=1e-5)
        assert K.packable(x, *gates)
        n_with = len(L._DERIVED)
        assert n_with >= 1                                   # the head's transposed copy
        K.clear_weight_copies()
        assert len(L._DERIVED) == 0
        monkeypatch.setenv("MYTHOS_CPU_WEIGHT_COPIES", "0")
        assert not K.weight_copies_enabled() and not K.packable(x, *gates)
        torch.testing.assert_close(K.lm_head(x, head), want, rtol=1e-5, atol=1e-5)
        assert len(L._DERIVED) == 0                          # nothing cached


def test_model_without_weight_copies_matches(monkeypatch):
    """A small MLA model's prefill + cached decode logits are the same with and without the
    CPU weight copies, and with them switched off none is made."""
    import mythos
    cfg = mythos.MythosConfig(vocab_size=5000, dim=64, n_heads=4, attn_type="mla", kv_lora_rank=16,
                              q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=16, n_experts=8, n_experts_per_tok=2, expert_dim=16,
                              n_shared_experts=2, prelude_layers=1, coda_layers=1,
                              max_loop_iters=3, act_threshold=100.0, max_seq_len=32)
    model = mythos.OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 7))

    def run():
        cache = {}
        with torch.no_grad():
            first = model(ids[:, :6], kv_cache=cache)
            last = model(ids[:, 6:], kv_cache=cache, start_pos=6)
        return torch.cat([first, last], 1)

    K.clear_weight_copies()
    with_copies = run()
    assert len(L._DERIVED) > 0
    K.clear_weight_copies()
    monkeypatch.setenv("MYTHOS_CPU_WEIGHT_COPIES", "0")
    without = run()
    assert len(L._DERIVED) == 0
    torch.testing.assert_close(without, with_copies, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T,H", [(1, 1, 8), (3, 1, 5), (2, 4, 3)])
@pytest.mark.parametrize("S", [4, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_cpu_absorption_matches_decompressed(B, T, H, S, dtype):
    MD = importlib.import_module("mythos_kernels.mla_decode")
    dn, dr, dv, r, cap = 12, 6, 10, 20, 41
    q_nope, q_rope = _rand(B, T, H, dn, dtype=dtype), _rand(B, T, H, dr, dtype=dtype)
    c_kv, k_rope = _rand(B, cap, r, dtype=dtype), _rand(B, cap, dr, dtype=dtype)
    c_kv[:, S:] = float("nan")                       # past the valid length: never read
    k_rope[:, S:] = float("nan")
    w_up = _rand(H * (dn + dv), r, dtype=dtype, scale=0.3)
    scale = (dn + dr) ** -0.5
    with torch.no_grad():
        assert MD._cpu_inference(q_nope, q_rope, c_kv, w_up)
        out = K.mla_decode(q_nope, q_rope, c_kv, k_rope, w_up, dn, dv, S, scale)
        ref = K.mla_decode_reference(q_nope, q_rope, c_kv, k_rope, w_up, dn, dv, S, scale)
    assert out.shape == (B, T, H, dv) and out.dtype == dtype and not out.isnan().any()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out, ref.to(dtype), **tol)


def test_cpu_inference_predicate():
    from mythos_kernels._dispatch import cpu_inference
    a, w = _rand(2, 3), _rand(3, 3).requires_grad_()
    assert cpu_inference(a) and cpu_inference()
    assert not cpu_inference(a, w)                    # autograd through w
    with torch.no_grad():
        assert cpu_inference(a, w)                    # no autograd in no_grad mode
    assert not cpu_inference(a, torch.empty(3, device="meta"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_inference(a)                   # CPU autocast: the general path


def test_cpu_autocast_inference_takes_the_general_path():
    """Under CPU autocast the CPU forms stand aside and the general path's ops take autocast's
    casts. Before, fp32 inputs under autocast reached the CPU forms, which computed in fp32
    unlike autocast's ops (and at the mid config the sorted MoE form's out= product raised on a
    cast input: a forward under autocast failed before c5f9881 cast the experts' inputs)."""
    N, k, E, D, Fh = 41, 3, 64, 24, 10
    x = _rand(N, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.stack([torch.ones(N, dtype=torch.long), torch.zeros(N, dtype=torch.long),
                       torch.randint(2, E, (N,))], 1)                   # skewed: sorted form
    weights = torch.softmax(torch.randn(N, k), -1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
        head_w = _rand(5000, 64)
        h = _rand(3, 64)
        logits = K.lm_head(h, head_w)
    assert torch.equal(out, ref)
    assert logits.dtype == torch.bfloat16                 # as autocast's F.linear gives
    ref_logits = h @ head_w.t()
    assert float((logits.float() - ref_logits).norm() / ref_logits.norm()) <= 1e-2


# ----- RMSNorm: F.rms_norm on the CPU in fp32/fp64 (open-mythos's exact values) ---------------

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


# ----- MoE: decode pairs two at a time; the sorted form through oneDNN -------------------------

@pytest.mark.parametrize("N,k", [(1, 4), (1, 3), (1, 2), (2, 3), (5, 4), (8, 4)])
def test_moe_pairs_two_by_two_matches_reference(monkeypatch, N, k):
    """fp32 contiguous stacks take the paired form: odd pair counts, repeated experts across
    tokens, every expert id from 0 to E-1 (the views' offsets reach both ends of the stack)."""
    E, D, Fh = 9, 40, 12
    x = _rand(N, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    idx[0, 0], idx[-1, -1] = 0, E - 1
    weights = torch.softmax(torch.randn(N, k), -1)
    calls = _spy(monkeypatch, "_pairs_two_by_two")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert calls
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_moe_pairs_two_by_two_default_device_elsewhere(monkeypatch):
    """The kept pair-order tensors are made on the CPU whatever the default device (the GPU
    suite's is CUDA; "meta" stands for it here): CPU decode pairs still compute, same values."""
    E, D, Fh = 6, 40, 12
    x = _rand(1, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx, weights = torch.tensor([[4, 1, 5, 0]]), torch.softmax(torch.randn(1, 4), -1)
    with torch.no_grad():
        want = M._pairs_two_by_two(x, weights, idx, w13, w2)
        monkeypatch.setattr(M, "_ORDER_TENSORS", {})
        prev = torch.get_default_device()
        torch.set_default_device("meta")
        try:
            got = M._pairs_two_by_two(x, weights, idx, w13, w2)
        finally:
            torch.set_default_device(prev)
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert all(t.device.type == "cpu" for t in M._ORDER_TENSORS.values())


@pytest.mark.parametrize("case", ["one_pair", "noncontig", "offset_stack", "bf16"])
def test_moe_few_pairs_other_layouts(monkeypatch, case):
    """One pair, a non-contiguous stack, bf16: the per-pair form; a stack that is a view at a
    storage offset: the paired form with the offset honoured."""
    E, D, Fh = 6, 24, 8
    N, k = (1, 1) if case == "one_pair" else (2, 3)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x = _rand(N, D, dtype=dtype)
    w13, w2 = _rand(E, D, 2 * Fh, dtype=dtype, scale=0.2), _rand(E, Fh, D, dtype=dtype, scale=0.2)
    if case == "noncontig":
        w13 = _rand(E, 2 * Fh, D, scale=0.2).transpose(1, 2)
    elif case == "offset_stack":
        w13 = _rand(E + 2, D, 2 * Fh, scale=0.2)[2:]
        w2 = _rand(E + 1, Fh, D, scale=0.2)[1:]
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, k), -1).to(dtype)
    calls = _spy(monkeypatch, "_pairs_two_by_two")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert bool(calls) == (case == "offset_stack")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_moe_pairs_nan_stays_in_its_token():
    N, k, E, D, Fh = 4, 2, 5, 16, 6
    x = _rand(N, D)
    x[2, 3] = float("nan")
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.tensor([[0, 1], [1, 2], [0, 1], [3, 4]])
    with torch.no_grad():
        out = K.moe_experts(x, torch.full((N, k), 0.5), idx, w13, w2)
    assert out[2].isnan().all()
    assert not out[[0, 1, 3]].isnan().any()


def test_moe_sorted_form_uses_onednn(monkeypatch):
    """Segments of at least SMALL_SEGMENT rows (here expert 0's) go through oneDNN."""
    if not L.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    N, k, E, D, Fh = M.SMALL_SEGMENT + 3, 2, 16, 24, 10
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.stack([torch.zeros(N, dtype=torch.long), torch.randint(1, E, (N,))], 1)
    weights = torch.softmax(torch.randn(N, k), -1)
    sorted_ = _spy(monkeypatch, "moe_experts_sorted")
    dnn = _spy_fn(monkeypatch, L, "onednn_linear")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
    assert sorted_ and dnn
    torch.testing.assert_close(out, M.moe_experts_reference(x, weights, idx, w13, w2),
                               rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("MYTHOS_CPU_ONEDNN", "0")
    dnn.clear()
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
    assert not dnn
    torch.testing.assert_close(out, M.moe_experts_reference(x, weights, idx, w13, w2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D,dtype,split", [(24, torch.float32, True), (33, torch.float32, False),
                                           (24, torch.bfloat16, False)])
def test_moe_sorted_small_segments_split(monkeypatch, D, dtype, split):
    """Segments under SMALL_SEGMENT rows: the two-core split products (fp32, even D; the expert
    size floor lowered for these small shapes); an odd D or bf16 keeps the plain products.
    Empty experts in between. (Expert pairs off here: test_moe_sorted_pairs covers them.)"""
    monkeypatch.setattr(M, "SPLIT_MIN_EXPERT", 1)
    monkeypatch.setattr(M, "_pair_segments_ok", lambda *a: False)
    N, k, E, Fh = 50, 2, 12, 7
    x = _rand(N, D, dtype=dtype)
    w13, w2 = _rand(E, D, 2 * Fh, dtype=dtype, scale=0.2), _rand(E, Fh, D, dtype=dtype, scale=0.2)
    # slot 0 on experts 0-1 (one holds >= 25 rows), slot 1 on 6-11, 4-5 experts empty: the slab
    # (>= 300 rows) exceeds 100 pairs + PAD_SEGMENT_ROWS * 8 = 292, so the sorted form runs
    idx = torch.stack([torch.randint(0, 2, (N,)), torch.randint(6, E, (N,))], 1)
    weights = torch.softmax(torch.randn(N, k), -1).to(dtype)
    calls = _spy(monkeypatch, "_segment_split")
    sorted_ = _spy(monkeypatch, "moe_experts_sorted")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert sorted_ and bool(calls) == split
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_pair_small_pairs_neighbours_in_count_order():
    """_pair_small: experts under SMALL_SEGMENT rows, sorted by count, each paired with the next
    when the counts differ by at most PAD_SEGMENT_ROWS; pairs are (lower id, higher id); empty
    and large experts are never paired."""
    gap, big = M.PAD_SEGMENT_ROWS, M.SMALL_SEGMENT
    # small ones by count: 8 (3), 1 (5), 3 (7), 5 (gap + 15), 6 (gap + 16), 9 (big - 1)
    counts = [0, 5, big, 7, 0, gap + 15, gap + 16, big + 40, 3, big - 1]
    assert M._pair_small(counts) == [(1, 8), (5, 6)]        # 3 -> 5 is more than gap apart
    assert M._pair_small([4, 4 + gap]) == [(0, 1)]
    assert M._pair_small([4, 5 + gap]) == []
    assert M._pair_small([0, 0, big, big]) == []
    assert M._pair_small([9, 2, 9]) == [(0, 1)]              # smallest first: 2 with a 9
    assert M._pair_small([9, 40, 30]) == [(0, 2)]            # 9 with 30; 40 left alone


@pytest.mark.parametrize("N,k,E,D,Fh", [(61, 3, 13, 40, 7), (5, 4, 9, 17, 3), (200, 2, 6, 24, 11)])
def test_moe_sorted_pairs(monkeypatch, N, k, E, D, Fh):
    """Small segments two experts at a time (fp32, any expert size, odd sizes): equal to the
    reference, empty experts in between."""
    x = _rand(N, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.stack([torch.cat([torch.randint(0, 2, (1,)), 2 + torch.randperm(E - 2)[:k - 1]])
                       for _ in range(N)])                    # slot 0 on experts 0-1: skewed
    weights = torch.softmax(torch.randn(N, k), -1)
    pairs = _spy(monkeypatch, "_segment_pair")
    flat = idx.reshape(-1)
    host = torch.bincount(flat, minlength=E).tolist()
    order = torch.argsort(flat, stable=True)
    with torch.no_grad():
        out = M.moe_experts_sorted(x, weights, idx, w13, w2, host, order)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert len(pairs) == len(M._pair_small(host)) > 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first,last", [(10, 4), (4, 10)])
def test_moe_sorted_pair_reads_past_its_segment(monkeypatch, first, last):
    """One pair, experts 0 and 3 (1-2 empty). (10, 4): the last expert's view runs past the last
    segment into the zero padding. (4, 10): expert 0's view covers expert 3's first rows, one of
    them a NaN token: the NaN stays in that token's output, the extra rows are dropped."""
    N, E, D, Fh = first + last, 4, 18, 5
    x = _rand(N, D)
    x[first + 1] = float("nan")                                 # a token of expert 3
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.tensor([0] * first + [3] * last).view(N, 1)
    weights = torch.rand(N, 1)
    pairs = _spy(monkeypatch, "_segment_pair")
    host = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    order = torch.arange(N)
    with torch.no_grad():
        out = M.moe_experts_sorted(x, weights, idx, w13, w2, host, order)
        ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    assert len(pairs) == 1
    nan = torch.zeros(N, dtype=torch.bool)
    nan[first + 1] = True
    assert out[nan].isnan().all() and not out[~nan].isnan().any()
    torch.testing.assert_close(out[~nan], ref[~nan], rtol=1e-5, atol=1e-6)


def test_moe_sorted_no_pairs_for_bf16_or_strided_stacks(monkeypatch):
    """bf16, or a non-contiguous expert stack: no expert-pair views (plain products)."""
    N, k, E, D, Fh = 40, 2, 8, 24, 6
    pairs = _spy(monkeypatch, "_segment_pair")
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    flat = idx.reshape(-1)
    host = torch.bincount(flat, minlength=E).tolist()
    order = torch.argsort(flat, stable=True)
    weights = torch.softmax(torch.randn(N, k), -1)
    x = _rand(N, D)
    w13 = _rand(E, 2 * Fh, D, scale=0.2).transpose(1, 2)                # strided
    w2 = _rand(E, Fh, D, scale=0.2)
    with torch.no_grad():
        out = M.moe_experts_sorted(x, weights, idx, w13, w2, host, order)
        torch.testing.assert_close(out, M.moe_experts_reference(x, weights, idx, w13, w2),
                                   rtol=1e-5, atol=1e-6)
        xb, w13b, w2b = x.bfloat16(), w13.contiguous().bfloat16(), w2.bfloat16()
        out = M.moe_experts_sorted(xb, weights.bfloat16(), idx, w13b, w2b, host, order)
        torch.testing.assert_close(out, M.moe_experts_reference(xb, weights.bfloat16(), idx,
                                                                w13b, w2b),
                                   rtol=2e-2, atol=2e-2)
    assert not pairs


def test_moe_sorted_small_experts_keep_mm(monkeypatch):
    """Experts under SPLIT_MIN_EXPERT elements: plain products (the split costs more there)."""
    monkeypatch.undo()                                       # the real floors
    N, k, E, D, Fh = 50, 2, 12, 24, 7
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    assert D * 2 * Fh < M.SPLIT_MIN_EXPERT
    idx = torch.stack([torch.randint(0, 2, (N,)), torch.randint(6, E, (N,))], 1)   # sorted form
    weights = torch.softmax(torch.randn(N, k), -1)
    calls = _spy(monkeypatch, "_segment_split")
    sorted_ = _spy(monkeypatch, "moe_experts_sorted")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
    assert sorted_ and not calls
    torch.testing.assert_close(out, M.moe_experts_reference(x, weights, idx, w13, w2),
                               rtol=1e-5, atol=1e-6)


def test_size_floors_send_small_weights_to_plain_products(monkeypatch):
    """With the real floors: weights under SPLIT_MIN_WEIGHT take F.linear / x @ w, no packing,
    no expert pairs; weights under ONEDNN_MIN_WEIGHT skip oneDNN; experts under
    SPLIT_MIN_EXPERT skip the split segments. Results still match."""
    monkeypatch.undo()
    monkeypatch.setattr(L, "two_threads", lambda: True)   # the floors, whatever the machine
    assert L.SPLIT_MIN_WEIGHT > 1 and L.ONEDNN_MIN_WEIGHT > 1 and M.SPLIT_MIN_EXPERT > 1
    small = _rand(64, 64, scale=0.1)                                  # 4096 elements
    big = _rand(256, 128, scale=0.1)                                  # 32768 elements
    x1 = _rand(1, 64)
    with torch.no_grad():
        assert not L._split_rows_ok(x1, small) and L._split_rows_ok(_rand(1, 128), big)
        assert not L.packable(x1, small) and L.packable(_rand(1, 128), big)
        assert not L._onednn_ok(_rand(40, 64), small)
        assert L._onednn_ok(_rand(40, 512), _rand(256, 512))             # weight >= 2^17
        assert not L._onednn_ok(_rand(128, 256), _rand(256, 256))        # 2^23 MACs
        assert L._onednn_ok(_rand(512, 256), _rand(256, 256))           # 2^24 MACs
        torch.testing.assert_close(K.dense(x1, small), F.linear(x1, small), rtol=0, atol=0)
        w = _rand(64, 48)
        torch.testing.assert_close(L.vecmat(x1, w), x1 @ w, rtol=0, atol=0)
        E, D, Fh = 5, 16, 6
        w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
        assert not M._pairable(_rand(1, D), torch.tensor([[0, 1]]), w13, w2)
        assert not M._split_segments_ok(_rand(3, D), w13, w2)


def test_one_thread_takes_no_split_forms(monkeypatch):
    """With one intra-op thread the two-way split products only add calls: dense, vecmat and the
    MoE's small segments take their plain products (same numbers as F.linear / mm)."""
    monkeypatch.undo()
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not L.two_threads()
        monkeypatch.setattr(L, "SPLIT_MIN_WEIGHT", 1)
        monkeypatch.setattr(M, "SPLIT_MIN_EXPERT", 1)
        seg = _spy_fn(monkeypatch, M, "_segment_split")
        x, w = _rand(3, 40), _rand(66, 40)
        with torch.no_grad():
            assert not L._split_rows_ok(x, w)
            assert torch.equal(K.dense(x, w), F.linear(x, w))
            wt = _rand(40, 66)
            assert torch.equal(L.vecmat(x, wt), x @ wt)
            E, D, Fh = 5, 24, 10
            xs, w13, w2 = _rand(40, D), _rand(E, D, 2 * Fh), _rand(E, Fh, D)
            idx = torch.randint(0, E, (40, 2))
            wts = torch.rand(40, 2)
            ref = M.moe_experts_reference(xs, wts, idx, w13, w2)
            counts = torch.bincount(idx.reshape(-1), minlength=E)
            order = torch.argsort(idx.reshape(-1), stable=True)
            out = M.moe_experts_sorted(xs, wts, idx, w13, w2, counts.tolist(), order)
        assert not seg
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        torch.set_num_threads(prev)
    assert L.two_threads() == (prev >= 2)


def test_decode_head_weight_and_transposed_head(monkeypatch):
    """decode_head_weight: the cached [D, V] copy decode multiplies (the same tensor on a second
    call, remade after the weight changes); None where decode would not use it.
    lm_head_transposed(x, copy) equals the head; a mismatched copy raises before computing."""
    V, D = L.VOCAB_BLOCK + 3, 40
    w = _rand(V, D, scale=0.1)
    x = _rand(3, D)
    with torch.no_grad():
        t = K.decode_head_weight(w)
        assert t is not None and t.shape == (D, V) and t.is_contiguous()
        assert K.decode_head_weight(w) is t
        torch.testing.assert_close(K.lm_head_transposed(x, t), F.linear(x, w), rtol=1e-5,
                                   atol=1e-5)
        w.mul_(2)
        t2 = K.decode_head_weight(w)
        torch.testing.assert_close(t2, w.t())
        assert K.decode_head_weight(_rand(L.VOCAB_BLOCK, D)) is None          # small vocab
        assert K.decode_head_weight(w.to(torch.bfloat16)) is None
        with pytest.raises(ValueError, match="last dim"):
            K.lm_head_transposed(_rand(3, D + 1), t2)
    assert K.decode_head_weight(w.clone().requires_grad_()) is None           # autograd on
    with torch.inference_mode():
        assert K.decode_head_weight(_rand(V, D)) is None                       # no version
    monkeypatch.setenv("MYTHOS_CPU_WEIGHT_COPIES", "0")
    with torch.no_grad():
        assert K.decode_head_weight(w) is None                                 # copies off


def test_scratch_buffers_reused_grown_and_released():
    """mythos_kernels._scratch: one kept buffer per (tag, dtype) and thread, views of it handed
    out, grown when too small; big or non-CPU requests are not kept; release drops them."""
    import threading

    S = importlib.import_module("mythos_kernels._scratch")
    S.release_scratch()
    a = S.scratch("t", (3, 5), torch.float32, torch.device("cpu"))
    b = S.scratch("t", (2, 7), torch.float32, "cpu")
    assert a.shape == (3, 5) and b.shape == (2, 7) and b.is_contiguous()
    assert a.data_ptr() == b.data_ptr()                               # the same pages
    assert S.scratch("u", (3, 5), torch.float32, "cpu").data_ptr() != a.data_ptr()   # per tag
    assert S.scratch("t", (3, 5), torch.float64, "cpu").data_ptr() != a.data_ptr()   # per dtype
    c = S.scratch("t", (40,), torch.float32, "cpu")                    # grows
    assert c.numel() == 40 and S.scratch("t", (4,), torch.float32, "cpu").data_ptr() == c.data_ptr()
    held = S.scratch_bytes()
    assert held == 40 * 4 + 15 * 4 + 15 * 8
    big = S.scratch("t", (S.MAX_BYTES // 4 + 1,), torch.float32, "cpu")   # not kept
    assert S.scratch_bytes() == held and big.data_ptr() != c.data_ptr()
    other = []
    th = threading.Thread(target=lambda: other.append(
        S.scratch("t", (4,), torch.float32, "cpu").data_ptr()))
    th.start()
    th.join()
    assert other[0] != c.data_ptr()                                    # per thread
    S.release_scratch()
    assert S.scratch_bytes() == 0


def test_kept_output_reused_only_when_nothing_references_it(monkeypatch):
    """mythos_kernels._scratch.kept_output: a buffer is handed out again only once no tensor or
    view of the last result is left; a held result is never handed out; two kept per tag (the
    oldest dropped), per thread; too big or off the CPU: None; release drops them."""
    import threading

    S = importlib.import_module("mythos_kernels._scratch")
    if S._LONE_REFS is None:
        pytest.skip("this torch does not report storage references: nothing is kept")
    S.release_scratch()
    cpu = torch.device("cpu")
    a = S.kept_output("o", (3, 5), torch.float32, cpu)
    pa = a.data_ptr()
    del a
    b = S.kept_output("o", (3, 5), torch.float32, cpu)
    assert b.data_ptr() == pa and b.shape == (3, 5) and b.is_contiguous()      # reused
    c = S.kept_output("o", (3, 5), torch.float32, cpu)        # b held: the second buffer
    assert c.data_ptr() != pa
    pc = c.data_ptr()
    row = b[1]                                                # only a view of b left
    del b
    d = S.kept_output("o", (3, 5), torch.float32, cpu)        # b's view and c held: a third
    assert d.data_ptr() not in (pa, pc)
    assert S.scratch_bytes() == 2 * 15 * 4                    # two kept: b's buffer dropped
    del row
    arr = c.numpy()                                           # a numpy view holds c's pages
    del c
    e = S.kept_output("o", (3, 5), torch.float32, cpu)
    assert e.data_ptr() != pc
    kept = {d.data_ptr(), e.data_ptr()}
    del arr, d, e
    h = S.kept_output("o", (3, 5), torch.float32, cpu)
    assert h.data_ptr() in kept
    h.share_memory_()                        # another process may read it: never handed out
    ph = h.data_ptr()
    del h
    assert all(S.kept_output("o", (3, 5), torch.float32, cpu).data_ptr() != ph
               for _ in range(3))
    f = S.kept_output("o", (5, 3), torch.float32, cpu)        # another shape: a new buffer
    assert f.shape == (5, 3)
    assert S.kept_output("o", (3, 5), torch.float32, torch.device("meta")) is None
    monkeypatch.setattr(S, "MAX_OUTPUT_BYTES", 59)
    assert S.kept_output("o", (3, 5), torch.float32, cpu) is None             # 60 bytes
    monkeypatch.undo()
    other = []
    g = S.kept_output("p", (4,), torch.float32, cpu)
    pg = g.data_ptr()
    del g
    th = threading.Thread(target=lambda: other.append(
        S.kept_output("p", (4,), torch.float32, cpu).data_ptr()))
    th.start()
    th.join()
    assert other[0] != pg                                     # per thread
    assert S.kept_output("p", (4,), torch.float32, cpu).data_ptr() == pg
    S.release_scratch()
    assert S.scratch_bytes() == 0


def test_lm_head_kept_logits_never_overwrite_held_ones(monkeypatch):
    """The forward's head writes large logits into a kept output in column blocks (a ragged last
    one): values as F.linear's; logits the caller holds stay intact through later calls; dropped
    ones are reused, every column written again (the kept buffers NaN-poisoned in between)."""
    S = importlib.import_module("mythos_kernels._scratch")
    if not L.onednn_available() or S._LONE_REFS is None:
        pytest.skip("this torch build has no oneDNN linear op or reports no storage references")
    S.release_scratch()
    monkeypatch.setattr(L, "KEPT_HEAD_MIN_BYTES", 0)
    monkeypatch.setattr(L, "HEAD_BLOCK_BYTES", 1)              # blocks of 1024 columns
    w = _rand(L.VOCAB_BLOCK + 77, 40, scale=0.1)
    xs = [_rand(2, 37, 40) for _ in range(3)]
    refs = [F.linear(x, w) for x in xs]
    blocks = _spy_fn(monkeypatch, L, "onednn_linear")
    with torch.no_grad():
        out0 = K.lm_head(xs[0], w)
        assert len(blocks) == 5                                # 4 x 1024 + 77 columns
        out1 = K.lm_head(xs[1], w)
        out2 = K.lm_head(xs[2], w)                             # out0, out1 held: a third buffer
        for out, ref in zip((out0, out1, out2), refs):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        ptrs = {out1.data_ptr(), out2.data_ptr()}
        assert len(ptrs | {out0.data_ptr()}) == 3
        del out0, out1, out2
        for buf in S._local.outs["lm_head"]:
            buf.fill_(float("nan"))
        out = K.lm_head(xs[0], w)
    assert out.data_ptr() in ptrs                              # reused
    torch.testing.assert_close(out, refs[0], rtol=1e-5, atol=1e-5)
    S.release_scratch()


def test_model_logits_held_across_forwards_stay_intact(monkeypatch):
    """Through the model: held logits of earlier forwards keep their values while later
    forwards write kept outputs, and match the head without kept outputs."""
    import mythos

    if not L.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(L, "KEPT_HEAD_MIN_BYTES", 0)
    torch.manual_seed(0)
    kw = dict(vocab_size=L.VOCAB_BLOCK + 131, dim=48, n_heads=4, n_kv_heads=2, max_seq_len=64,
              max_loop_iters=2, n_experts=5, n_experts_per_tok=2, expert_dim=16, lora_rank=2,
              attn_type="gqa")
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    ids = [torch.randint(0, kw["vocab_size"], (2, 37)) for _ in range(3)]
    with torch.no_grad():
        with monkeypatch.context() as mp:
            mp.setattr(L, "kept_output", lambda *a: None)
            refs = [m(i) for i in ids]
        held = [m(i) for i in ids]
        again = m(ids[0])
    for out, ref in zip(held + [again], refs + refs[:1]):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["sorted", "sorted-pairs", "padded"])
def test_moe_cpu_forms_ignore_stale_scratch(monkeypatch, form):
    """The MoE CPU forms keep their big intermediates in scratch buffers between calls: with
    those buffers NaN-poisoned the result is still the reference's, and a second call (other
    inputs, the same buffers) leaves the first call's result untouched (no aliasing)."""
    S = importlib.import_module("mythos_kernels._scratch")
    N, k, E, D, Fh = 57, 3, 7, 20, 9
    if form == "sorted":
        monkeypatch.setattr(M, "_pair_segments_ok", lambda *a: False)
    spy = _spy(monkeypatch, "moe_experts_padded" if form == "padded" else "moe_experts_sorted")
    if form == "padded":
        monkeypatch.setattr(M, "_padded_is_cheaper", lambda *a: True)
    else:
        monkeypatch.setattr(M, "_padded_is_cheaper", lambda *a: False)

    def inputs():
        x = _rand(N, D)
        w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
        idx = torch.stack([torch.cat([torch.randint(0, 2, (1,)), 2 + torch.randperm(E - 2)[:k - 1]])
                           for _ in range(N)])
        return x, torch.softmax(torch.randn(N, k), -1), idx, w13, w2

    S.release_scratch()
    with torch.no_grad():
        first = inputs()
        K.moe_experts(*first)                                          # makes the buffers
        for buf in S._local.bufs.values():
            buf.fill_(float("nan"))
        assert S.scratch_bytes() > 0
        out1 = K.moe_experts(*first)
        keep = out1.clone()
        second = inputs()
        out2 = K.moe_experts(*second)
    assert len(spy) == 3
    for out, args in ((out1, first), (out2, second)):
        torch.testing.assert_close(out, M.moe_experts_reference(*args), rtol=1e-5, atol=1e-6)
    assert torch.equal(out1, keep)


@pytest.mark.parametrize("padded", [False, True])
def test_moe_scratch_made_under_inference_mode_serves_no_grad(monkeypatch, padded):
    """Scratch buffers first made under torch.inference_mode() are normal tensors: later calls
    under no_grad write them (an inference tensor would raise), and back again."""
    S = importlib.import_module("mythos_kernels._scratch")
    monkeypatch.setattr(M, "_padded_is_cheaper", lambda *a: padded)
    N, k, E, D, Fh = 45, 2, 6, 22, 7
    x = _rand(N, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, k), -1)
    ref = M.moe_experts_reference(x, weights, idx, w13, w2)
    S.release_scratch()
    outs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            outs.append(K.moe_experts(x, weights, idx, w13, w2))
    assert S.scratch_bytes() > 0
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
