"""MoE router, align and grouped SwiGLU GEMM kernels against the plain-torch references.

Run under the interpreter on CPU: ``TRITON_INTERPRET=1 python -m pytest tests/test_moe.py -q``.
Without the interpreter (and no GPU) the kernel tests skip; on a GPU they run on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, gen

import mythos_kernels as K
from mythos_kernels import moe as M

triton = pytest.importorskip("triton")

from conftest import KERNEL_DEVICE as DEV  # noqa: E402
from conftest import needs_kernels  # noqa: E402

# dtype -> relative (RMS) tolerance for outputs / gradients
TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2}


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty / empty_like comes back NaN-filled (ints: -7777), so an output element
    the kernels forget to write fails loudly."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))
    yield


def _route_lowest(logits, bias, k):
    """The documented tie rule: top-k of logits + bias, ties to the lowest expert id."""
    sel = logits + bias
    idx = torch.sort(sel.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    s = torch.softmax(logits, dim=-1).gather(-1, idx)
    return s / s.sum(-1, keepdim=True), idx


def _boundary_tie_free(sel, k):
    """Rows whose k-th and (k+1)-th largest selection scores differ (torch.topk's choice among
    tied experts is implementation-defined; the kernel's is the lowest id)."""
    if k == sel.shape[-1]:
        return torch.ones(sel.shape[0], dtype=torch.bool, device=sel.device)
    v = sel.float().topk(k + 1, dim=-1).values
    return v[:, k - 1] != v[:, k]


def _distinct_logits(N, E, dtype):
    """Logits whose values are at least 0.2 apart in every row, also after rounding to bf16."""
    ranks = torch.argsort(torch.rand(N, E, device=DEV), dim=-1).float()
    return (ranks * 0.3 - 1.0 + 0.1 * torch.rand(N, E, device=DEV)).to(dtype)


def _routing(N, E, k, mode, dtype, gen_bias=True):
    """logits [N, E] and bias [E] producing the requested selection pattern."""
    logits = torch.randn(N, E, device=DEV).to(dtype)
    bias = torch.randn(E, device=DEV) * 0.5 if gen_bias else torch.zeros(E, device=DEV)
    bias = bias.to(dtype)
    if mode == "one_expert":          # every token picks expert E-1 first (k=1: all on one)
        bias = torch.zeros(E, device=DEV, dtype=dtype)
        bias[-1] = 100.0
    elif mode == "skewed":            # experts 0..E/2 never chosen (when k <= E/2)
        bias = torch.zeros(E, device=DEV, dtype=dtype)
        bias[: E // 2] = -100.0
    return logits, bias


# ------------------------------------------------------------------------------- routing ----

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,E,k", [(1, 5, 1), (37, 7, 2), (20, 12, 4), (9, 4, 4), (33, 64, 4)])
def test_route_matches_reference(poison, N, E, k, dtype):
    logits, bias = _routing(N, E, k, "random", dtype)
    w, idx, cnt = M.moe_route_triton(logits, bias, k, return_counts=True)
    rw, ridx = _route_lowest(logits, bias, k)
    assert idx.dtype == torch.int64 and w.dtype == dtype
    assert torch.equal(idx, ridx)
    # the same selected values as torch.topk (the reference) whatever the tie order
    tv = (logits + bias).topk(k, dim=-1).values
    assert torch.equal((logits + bias).gather(-1, idx), tv)
    assert_close("weights", rw.float(), w.float(), 1e-6 if dtype == torch.float32 else 8e-3)
    assert torch.equal(cnt.long(), torch.bincount(ridx.flatten(), minlength=E))
    # and against the module's reference itself, on rows where torch.topk's tie order can't matter
    w2, i2 = M.moe_route_reference(logits, bias, k)
    ok = _boundary_tie_free(logits + bias, k)
    assert torch.equal(idx[ok].sort(-1).values, i2[ok].sort(-1).values)


@needs_kernels
def test_route_bias_changes_selection(poison):
    N, E, k = 16, 6, 2
    logits = torch.randn(N, E, device=DEV)
    bias = torch.zeros(E, device=DEV)
    bias[3] = 20.0                        # expert 3 selected everywhere, weight from softmax
    _, idx0 = M.moe_route_triton(logits, torch.zeros(E, device=DEV), k)
    w, idx = M.moe_route_triton(logits, bias, k)
    assert not torch.equal(idx0, idx) and (idx[:, 0] == 3).all()
    rw, ridx = M.moe_route_reference(logits, bias, k)
    assert torch.equal(idx, ridx)
    assert_close("weights", rw, w, 1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_ties(poison, dtype):
    N, E, k = 12, 9, 4
    logits = torch.randint(-2, 3, (N, E), device=DEV).to(dtype)   # many exact ties
    logits[0] = 0.0                                                 # all tied
    bias = torch.zeros(E, device=DEV, dtype=dtype)
    w, idx = M.moe_route_triton(logits, bias, k)
    rw, ridx = _route_lowest(logits, bias, k)
    assert torch.equal(idx, ridx), "ties must go to the lowest expert id"
    assert torch.equal(idx[0], torch.arange(k, device=DEV))
    tv = logits.topk(k, dim=-1).values
    assert torch.equal(logits.gather(-1, idx), tv)
    assert_close("weights", rw.float(), w.float(), 1e-6 if dtype == torch.float32 else 8e-3)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_route_grad(dtype, k):
    N, E = 19, 7
    logits = _distinct_logits(N, E, dtype)
    bias = torch.zeros(E, device=DEV, dtype=dtype)
    bias[E // 2] = 0.45                    # moves the selection, values stay >= 0.05 apart
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w, idx = M.moe_route_triton(a, bias, k)
    rw, ridx = M.moe_route_reference(b, bias, k)
    assert torch.equal(idx.sort(-1).values, ridx.sort(-1).values)
    g = torch.randn(N, k, device=DEV).to(dtype)
    # align the reference slot order with the kernel's before comparing
    perm = (idx.unsqueeze(-1) == ridx.unsqueeze(-2)).float().argmax(-1)
    (da,) = torch.autograd.grad(w, a, g)
    (db,) = torch.autograd.grad(rw.gather(-1, perm), b, g)
    assert da.dtype == dtype
    if k == 1:                             # w == 1 exactly: the gradient is zero
        assert da.abs().max() == 0 and db.abs().max() < (1e-6 if dtype == torch.float32 else 2e-2)
        return
    assert_close("dlogits", db.float(), da.float(), 1e-5 if dtype == torch.float32 else 2e-2)


# --------------------------------------------------------------------------------- align ----

@needs_kernels
@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("N,E,k,mode", [(1, 5, 4, "random"), (45, 7, 2, "random"),
                                        (30, 6, 1, "one_expert"), (40, 10, 2, "skewed"),
                                        (300, 3, 2, "random"),
                                        (1100, 64, 4, "random")])  # > 32 chunks: scan loops
def test_align(poison, N, E, k, mode, block_m):
    logits, bias = _routing(N, E, k, mode, torch.float32)
    _, idx = M.moe_route_reference(logits, bias, k)
    al = M.moe_align_triton(idx, E, block_m)
    sid, eid, seg, cnt = M.moe_align_reference(idx.cpu(), E, block_m)
    n = int(al.n_post)
    assert n == int(seg[-1]) and n <= al.max_blocks * block_m
    assert torch.equal(al.sorted_ids[:n].cpu(), sid)
    assert torch.equal(al.expert_ids[: n // block_m].cpu(), eid)
    assert (al.expert_ids[n // block_m:] == -1).all()
    assert torch.equal(al.seg.cpu(), seg)
    assert torch.equal(al.counts.cpu(), cnt)


# ------------------------------------------------------------------------- grouped GEMMs ----

EXPERT_CASES = [
    # N,  D,  F,  E, k, mode,         block_m
    (1, 40, 24, 5, 4, "random", 16),          # decode, T=1
    (23, 33, 17, 7, 2, "random", 16),         # odd D and F, E not a power of two
    (29, 48, 20, 6, 1, "one_expert", 32),     # everything on one expert, others empty
    (26, 24, 36, 10, 2, "skewed", 16),        # half the experts get no tokens
    (21, 40, 24, 3, 2, "random", 64),         # the 64-row tile (wgmma-size path)
    (12, 20, 18, 6, 4, "random", None),       # config chosen by token count
    # 16-aligned D and F: bf16 takes the large-tile ("fast") configs; the 128-row alignment
    # also runs the SwiGLU-backward at 64-row tiles (two tiles per aligned block)
    (37, 64, 64, 3, 2, "random", 128),
    (20, 48, 48, 5, 4, "skewed", 64),         # EVEN_N false: masked columns on the fast path
    (9, 32, 16, 4, 1, "random", 32),
    (100, 64, 64, 2, 2, "random", None),      # > 96 pairs per expert: the 128-row production
                                              # tiles, 64-row backward tiles, aligned wgrad
]


def _expert_inputs(N, D, Fh, E, k, mode, dtype):
    torch.manual_seed(hash((N, D, Fh, E, k, mode)) % 10_000)
    logits, bias = _routing(N, E, k, mode, torch.float32)
    w, idx = M.moe_route_reference(logits, bias, k)
    x = torch.randn(N, D, device=DEV).to(dtype)
    w13 = (torch.randn(E, D, 2 * Fh, device=DEV) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, Fh, D, device=DEV) / Fh ** 0.5).to(dtype)
    return x, w.to(dtype), idx, w13, w2


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,Fh,E,k,mode,block_m", EXPERT_CASES)
def test_experts_forward_backward(poison, N, D, Fh, E, k, mode, block_m, dtype):
    x, w, idx, w13, w2 = _expert_inputs(N, D, Fh, E, k, mode, dtype)
    if mode == "one_expert" and k == 1:
        assert (idx == E - 1).all()
    leaves_t = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    leaves_r = [t.clone().float().requires_grad_() for t in (x, w, w13, w2)]
    out = M.moe_experts_triton(leaves_t[0], leaves_t[1], idx, leaves_t[2], leaves_t[3],
                               block_m=block_m)
    ref = M.moe_experts_reference(leaves_r[0], leaves_r[1], idx, leaves_r[2], leaves_r[3])
    assert out.dtype == dtype and out.shape == (N, D)
    tol = TOL[dtype]
    assert_close("out", ref, out.float(), tol)
    g = torch.randn(N, D, device=DEV).to(dtype)
    gt = torch.autograd.grad(out, leaves_t, g)
    gr = torch.autograd.grad(ref, leaves_r, g.float())
    for name, a, b in zip(("dx", "dweights", "dw13", "dw2"), gt, gr):
        assert a.dtype == dtype
        if name in ("dw13", "dw2"):    # experts without tokens get exact zeros
            empty = torch.bincount(idx.flatten(), minlength=E) == 0
            assert (a[empty] == 0).all()
        assert_close(name, b, a.float(), 2 * tol)


@needs_kernels
def test_experts_inference_no_grad(poison):
    x, w, idx, w13, w2 = _expert_inputs(17, 28, 20, 5, 2, "random", torch.float32)
    with torch.no_grad():
        out = M.moe_experts_triton(x, w, idx, w13, w2)
        out32 = M.moe_experts_triton(x, w, idx.int(), w13, w2)     # int32 expert ids
    ref = M.moe_experts_reference(x, w, idx, w13, w2)
    assert_close("out", ref, out, TOL[torch.float32])
    assert torch.equal(out, out32)


@needs_kernels
def test_experts_deterministic():
    x, w, idx, w13, w2 = _expert_inputs(40, 24, 20, 4, 2, "random", torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, w13, w2)]
    runs = []
    for _ in range(2):
        out = M.moe_experts_triton(leaves[0], leaves[1], idx, leaves[2], leaves[3])
        runs.append((out,) + torch.autograd.grad(out.square().sum(), leaves))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_end_to_end_grads(dtype):
    """Router matmul -> route -> experts: every gradient, router weight included."""
    N, D, Fh, E, k = 22, 36, 20, 7, 2
    wr = (torch.randn(E, D, device=DEV) / D ** 0.5).to(dtype)
    w13 = (torch.randn(E, D, 2 * Fh, device=DEV) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, Fh, D, device=DEV) / Fh ** 0.5).to(dtype)
    bias = (torch.randn(E, device=DEV) * 0.3).to(dtype)
    g = torch.randn(N, D, device=DEV).to(dtype)
    for _ in range(50):                    # tokens without exact ties at the top-k boundary
        x = torch.randn(N, D, device=DEV).to(dtype)
        if _boundary_tie_free(x @ wr.t() + bias, k).all():
            break

    def run(backend, cast):
        leaves = [t.clone().to(cast).requires_grad_() for t in (x, wr, w13, w2)]
        with K.use_backend(backend):
            logits = leaves[0] @ leaves[1].t()
            w, idx = K.moe_route(logits, bias.to(cast), k)
            out = K.moe_experts(leaves[0], w, idx, leaves[2], leaves[3])
        return out, torch.autograd.grad(out, leaves, g.to(cast))

    K.reset_dispatch_counts()
    out, grads = run("triton", dtype)
    counts = K.dispatch_counts()
    assert counts[("moe_route", "triton")] == 1 and counts[("moe_experts", "triton")] == 1
    ref, rgrads = run("reference", dtype)
    tol = TOL[dtype]
    assert_close("out", ref.float(), out.float(), tol)
    for name, a, b in zip(("dx", "drouter", "dw13", "dw2"), grads, rgrads):
        assert_close(name, b.float(), a.float(), 3 * tol)


# ---------------------------------------------------------------------- dispatch & input ----

def test_bad_inputs_raise_value_error():
    x = torch.randn(4, 8)
    w13, w2 = torch.randn(3, 8, 10), torch.randn(3, 5, 8)
    w, idx = torch.rand(4, 2), torch.randint(0, 3, (4, 2))
    with pytest.raises(ValueError, match="w13"):
        K.moe_experts(x, w, idx, torch.randn(3, 9, 10), w2)
    with pytest.raises(ValueError, match="idx"):
        K.moe_experts(x, w, idx.float(), w13, w2)
    with pytest.raises(ValueError, match="weights"):
        K.moe_experts(x, w[:, :1], idx, w13, w2)
    with pytest.raises(ValueError, match="k >= 1"):              # no expert per token
        K.moe_experts(x, w[:, :0], idx[:, :0], w13, w2)
    with pytest.raises(ValueError, match="dtypes differ"):
        K.moe_experts(x, w, idx, w13.double(), w2)
    # expert ids outside [0, E), every CPU path (checked for CPU tensors only: on a GPU the check
    # would be a host sync; the README says so)
    x, w, idx, w13, w2 = (t.cpu() for t in (x, w, idx, w13, w2))
    for bad in (3, -1):
        for grad in (False, True):
            i2 = idx.clone()
            i2[2, 1] = bad
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="expert ids"):
                K.moe_experts(x.clone().requires_grad_(grad), w, i2, w13, w2)
        with torch.no_grad(), pytest.raises(ValueError, match="expert ids"):   # 1 token: pairs
            K.moe_experts(x[:1], w[:1], torch.tensor([[0, bad]], device="cpu"), w13, w2)
    with pytest.raises(ValueError, match="topk"):
        K.moe_route(torch.randn(4, 3), torch.zeros(3), 4)
    with pytest.raises(ValueError, match="router_bias"):
        K.moe_route(torch.randn(4, 3), torch.zeros(4), 2)


def test_forced_triton_that_cannot_run_raises():
    x = torch.randn(4, 8, dtype=torch.float64)
    w13, w2 = torch.randn(3, 8, 10, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    w, idx = torch.rand(4, 2, dtype=torch.float64), torch.randint(0, 3, (4, 2))
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailable):
        K.moe_experts(x, w, idx, w13, w2)
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailable):
        K.moe_route(torch.randn(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 2)


def test_reference_backend_records_reference():
    K.reset_dispatch_counts()
    x, w13, w2 = torch.randn(4, 8), torch.randn(3, 8, 10), torch.randn(3, 5, 8)
    with K.use_backend("reference"):
        w, idx = K.moe_route(torch.randn(4, 3), torch.zeros(3), 2)
        K.moe_experts(x, w, idx, w13, w2)
    c = K.dispatch_counts()
    assert c[("moe_route", "reference")] == 1 and c[("moe_experts", "reference")] == 1


def test_kernels_registered():
    names = set(K.registered_kernels())
    assert {"moe_route", "moe_align_count", "moe_align_scan", "moe_align_scatter", "moe_gemm",
            "moe_wgrad", "moe_combine"} <= names
    gemm = K.registered_kernels()["moe_gemm"]
    assert any(c.expect_hgmma for c in gemm.configs)


def test_flops_bytes_helpers():
    from bench.ops_moe import moe_experts_bytes, moe_experts_flops

    assert moe_experts_flops(512, 2048, 2048, 4) == 6 * 512 * 4 * 2048 * 2048
    assert moe_experts_flops(1, 8, 8, 2, backward=True) == 3 * moe_experts_flops(1, 8, 8, 2)
    assert moe_experts_bytes(1, 64, 32, 4, 64) < moe_experts_bytes(512, 64, 32, 4, 64)


# -------------------------------------------------------------------------- model level ----

def _model_pair(om, seed):
    pytest.importorskip("mythos")
    from conftest import make_pair, tiny_kwargs

    kw = tiny_kwargs("gqa", max_loop_iters=2)
    a, b = make_pair(om, seed=seed, **kw)
    return a, b, torch.randint(0, kw["vocab_size"], (2, 7))


@needs_kernels
@pytest.mark.parity
def test_model_parity_moe_kernels_only(om, monkeypatch):
    """The whole model vs open-mythos 0.5.0 with only the MoE ops on their Triton kernels."""
    a, b, ids = _model_pair(om, seed=12)
    real_choose, real_pick = M.choose, M.pick

    def choose_moe_triton(op, *tensors, **kw):
        with K.use_backend("triton"):
            return real_choose(op, *tensors, **kw)

    def pick_moe_triton(op, *tensors, **kw):
        with K.use_backend("triton"):
            return real_pick(op, *tensors, **kw)

    monkeypatch.setattr(M, "choose", choose_moe_triton)
    monkeypatch.setattr(M, "pick", pick_moe_triton)
    K.reset_dispatch_counts()
    with torch.no_grad(), K.use_backend("reference"):
        ref, out = a(ids, n_loops=2), b(ids, n_loops=2)
    assert_close("logits", ref, out, 1e-4)
    counts = K.dispatch_counts()
    assert counts.get(("moe_experts", "triton"), 0) > 0
    assert counts.get(("moe_route", "triton"), 0) > 0


@needs_kernels
@pytest.mark.parity
def test_model_parity_triton_backend(om):
    """The whole model with MYTHOS_BACKEND=triton vs open-mythos 0.5.0, same state_dict."""
    a, b, ids = _model_pair(om, seed=11)
    K.reset_dispatch_counts()
    with torch.no_grad():
        ref = a(ids, n_loops=2)
        with K.use_backend("triton"):
            out = b(ids, n_loops=2)
    assert_close("logits", ref, out, 1e-4)
    counts = K.dispatch_counts()
    assert counts.get(("moe_experts", "triton"), 0) > 0
    assert counts.get(("moe_route", "triton"), 0) > 0


@needs_kernels
def test_inference_compiles_without_graph_break():
    """Under torch.compile (no grad) routing and experts are opaque torch.library ops: the whole
    router -> route -> experts function traces with fullgraph=True and matches eager."""
    import torch._dynamo

    torch._dynamo.reset()
    N, E, k, D, Fh = 13, 6, 2, 32, 16
    x = torch.randn(N, D, device=DEV)
    wr = torch.randn(E, D, device=DEV) * 0.1
    bias = torch.randn(E, device=DEV) * 0.01
    w13 = torch.randn(E, D, 2 * Fh, device=DEV) * 0.1
    w2 = torch.randn(E, Fh, D, device=DEV) * 0.1

    def f(x):
        w, idx = M.moe_route(x @ wr.t(), bias, k)
        return M.moe_experts(x, w, idx, w13, w2)

    with torch.no_grad(), K.use_backend("triton"):
        eager = f(x)
        explain = torch._dynamo.explain(f)(x)
        compiled = torch.compile(f, fullgraph=True)(x)
    assert explain.graph_break_count == 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("N,E,k", [(1, 64, 4), (3, 7, 2), (2, 5, 1), (4, 9, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gathered_form_matches_reference(poison, N, E, k, dtype):
    """The traceable gather form (a compiled decode step's MoE on the CPU) against the sorted
    reference: fresh random inputs, odd sizes, unnormalized weights, repeated experts."""
    g = gen(N * 100 + E)
    D, Fh = 21, 13
    x = torch.randn(N, D, generator=g).to(dtype)
    w13 = (torch.randn(E, D, 2 * Fh, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(E, Fh, D, generator=g) * 0.2).to(dtype)
    idx = torch.randint(0, E, (N, k), generator=g)
    w = torch.rand(N, k, generator=g)
    with torch.no_grad():
        ref = M.moe_experts_reference(x, w, idx, w13, w2)
        out = M.moe_experts_gathered(x, w, idx, w13, w2)
    tol = {torch.float64: 1e-12}.get(dtype, TOL.get(dtype))
    assert out.dtype == ref.dtype and not out.isnan().any()
    assert_close("gathered", ref.double(), out.double(), tol)


def test_reference_moe_compiles_without_graph_break_for_decode():
    """On the CPU under torch.compile (no grad) a decode-sized MoE (pairs <= experts) takes the
    gather form: route + experts trace as one graph (the sorted reference's host read of the
    expert counts would break it) and give the eager numbers."""
    import torch._dynamo

    torch._dynamo.reset()
    N, E, k, D, Fh = 3, 8, 2, 24, 10
    x = torch.randn(N, D)
    wr, bias = torch.randn(E, D) * 0.3, torch.randn(E) * 0.01
    w13, w2 = torch.randn(E, D, 2 * Fh) * 0.2, torch.randn(E, Fh, D) * 0.2

    def f(x):
        w, idx = M.moe_route(x @ wr.t(), bias, k)
        return M.moe_experts(x, w, idx, w13, w2)

    with torch.no_grad(), K.use_backend("reference"):
        eager = f(x)
        compiled = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert_close("compiled moe", eager, compiled, 1e-5)
