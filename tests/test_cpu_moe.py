"""The MoE experts' CPU forms (``mythos_kernels.cpu.moe``) against ``moe_experts_reference``:
two pairs per bmm (strided views of two experts) for at most ``FEW_PAIRS`` (token, slot) pairs,
two padded bmms for balanced routing, sorted segments without pair-order copies (split products
for small segments, oneDNN for large) for skewed routing, and the grouped-GEMM form for CPU
autograd."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import rand as _rand
from conftest import spy

import mythos_kernels as K

# every test here is of the CPU inference forms: new tensors on the CPU also on a GPU machine
pytestmark = pytest.mark.usefixtures("on_cpu", "no_cpu_size_floors")

L = importlib.import_module("mythos_kernels.cpu.linear")   # the CPU forms (K.dense is the op)
M = importlib.import_module("mythos_kernels.cpu.moe")



def _route(N, E, k):
    logits = torch.randn(N, E)
    return K.moe_route_reference(logits, torch.randn(E) * 0.1, k)


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
        assert M._serves_inference(x, None, idx, w13, w2) and idx.numel() <= M.FEW_PAIRS
        K.reset_dispatch_counts()
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
    assert K.dispatch_counts() == {("moe_experts", "cpu"): 1}
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
        ref = K.moe_experts_reference(x, weights, idx.long(), w13, w2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _spy(monkeypatch, name):
    """Record calls of cpu.moe.<name> (still running it)."""
    return spy(monkeypatch, M, name)


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
        assert M._serves_inference(x, None, idx, w13, w2) and idx.numel() > M.FEW_PAIRS
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
        ref = K.moe_experts_reference(x, weights, idx.long(), w13, w2)
    assert sorted_ and not padded
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def _autograd_case(N, k, E, D, Fh, dtype, form, idx=None):
    """Output and every gradient of ``K.moe_experts`` (with only ``form`` of the autograd forms on)
    against the reference's (random routing, or ``idx``); returns the dispatch record of the
    call."""
    from conftest import assert_close

    x, w13, w2 = _rand(N, D, dtype=dtype), _rand(E, D, 2 * Fh, dtype=dtype), _rand(E, Fh, D, dtype=dtype)
    weights, ridx = _route(N, E, k)
    weights = weights.to(dtype)
    if idx is None:
        idx = ridx
        idx[0] = torch.arange(k)                # every expert id in [0, k) at least once
    leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    dy = _rand(N, D, dtype=dtype)
    K.reset_dispatch_counts()
    with K.cpu_variant(next(f for f in AUTOGRAD_FORMS if f != form), False):
        out = K.moe_experts(leaves[0], leaves[1], idx, leaves[2], leaves[3])
    counts = K.dispatch_counts()
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.clone().requires_grad_() for t in (x, weights, w13, w2)]
    ref = K.moe_experts_reference(ref_leaves[0], ref_leaves[1], idx, ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    assert_close("out", ref, out, dtype)
    for name, r, g in zip(("dx", "dweights", "dw13", "dw2"), ref_grads, grads):
        assert_close(name, r, g, dtype)
    return counts


AUTOGRAD_FORMS = ("moe_sorted_autograd", "moe_grouped_mm")
AUTOGRAD_CASES = [(3, 2, 6, 16, 4), (37, 3, 7, 33, 9), (64, 4, 16, 24, 12), (20, 3, 6, 32, 16)]


@pytest.mark.parametrize("N,k,E,D,Fh", AUTOGRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_autograd_takes_the_sorted_form(monkeypatch, N, k, E, D, Fh, dtype):
    """CPU autograd: the sorted autograd form serves first (any row width), output and every
    gradient as the reference's (its padded slab for balanced routing switched off)."""
    calls = spy(monkeypatch, M._SortedExpertsFn, "apply")
    with K.cpu_variant("moe_padded_train", False):
        counts = _autograd_case(N, k, E, D, Fh, dtype, "moe_sorted_autograd")
    assert counts == {("moe_experts", "cpu"): 1}
    assert calls == ["apply"]


def _balanced(N, k, E):
    """Routing with expert loads differing by at most one, in a random order."""
    return (torch.arange(N * k) % E)[torch.randperm(N * k)].view(N, k)


def _skewed(N, k, E):
    """Routing with every token's first slot on expert 0 (one expert holds N of the N * k pairs)."""
    idx = torch.randint(0, E, (N, k))
    idx[:, 0] = 0
    return idx


@pytest.mark.parametrize("N,k,E,D,Fh", [(17, 2, 4, 24, 8), (40, 4, 16, 33, 9), (97, 3, 7, 16, 5),
                                        (64, 4, 64, 20, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_autograd_balanced_routing_takes_the_padded_form(monkeypatch, N, k, E, D, Fh, dtype):
    """CPU autograd with balanced routing: the padded slab serves (the sorted form for skewed
    routing, or with its variant off), output and every gradient as the reference's."""
    idx = _balanced(N, k, E)
    padded = spy(monkeypatch, M._PaddedExpertsFn, "apply")
    sorted_ = spy(monkeypatch, M._SortedExpertsFn, "apply")
    assert M._padded_is_cheaper(torch.bincount(idx.flatten(), minlength=E).tolist(), N * k)
    _autograd_case(N, k, E, D, Fh, dtype, "moe_sorted_autograd", idx=idx)
    assert (padded, sorted_) == (["apply"], [])
    with K.cpu_variant("moe_padded_train", False):
        _autograd_case(N, k, E, D, Fh, dtype, "moe_sorted_autograd", idx=idx)
    assert (padded, sorted_) == (["apply"], ["apply"])
    skewed = _skewed(N, k, E)
    pad = M._padded_is_cheaper(torch.bincount(skewed.flatten(), minlength=E).tolist(), N * k)
    assert pad == (E == 4)      # 4 experts: the padding costs less than 4 segments' own calls
    _autograd_case(N, k, E, D, Fh, dtype, "moe_sorted_autograd", idx=skewed)
    assert (len(padded), len(sorted_)) == (1 + pad, 2 - pad)


@pytest.mark.parametrize("form", ["sorted", "padded"])
@pytest.mark.parametrize("need", ["x", "weights", "w13", "w2"])
def test_moe_training_forms_single_gradients(monkeypatch, need, form):
    """Both training forms (the sorted segments; the padded slab, balanced routing): each input
    alone needing a gradient gets the reference's (the others' products skipped); an expert no
    pair reaches gets zero weight gradients (in the slab: padding rows only)."""
    from conftest import assert_close

    N, k, E, D, Fh = 29, 2, 9, 20, 7
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh), _rand(E, Fh, D)
    weights = torch.softmax(torch.randn(N, k), -1)
    idx = _balanced(N, k, E - 1)                 # expert E-1 gets no pair
    calls = spy(monkeypatch, M._PaddedExpertsFn if form == "padded" else M._SortedExpertsFn,
                "apply")
    ins = dict(x=x, weights=weights, w13=w13, w2=w2)
    dy = _rand(N, D)
    leaf = ins[need].clone().requires_grad_()
    args = {**ins, need: leaf}
    with K.cpu_variant("moe_padded_train", form == "padded"):
        out = M.moe_experts_sorted_autograd(args["x"], args["weights"], idx, args["w13"],
                                            args["w2"])
    (g,) = torch.autograd.grad(out, leaf, dy)
    assert calls == ["apply"]
    ref_leaf = ins[need].clone().requires_grad_()
    rargs = {**ins, need: ref_leaf}
    ref = K.moe_experts_reference(rargs["x"], rargs["weights"], idx, rargs["w13"], rargs["w2"])
    (rg,) = torch.autograd.grad(ref, ref_leaf, dy)
    assert_close("out", ref, out, torch.float32)
    assert_close("d" + need, rg, g, torch.float32)
    if need in ("w13", "w2"):
        assert torch.equal(g[E - 1], torch.zeros_like(g[E - 1]))


def test_moe_padded_autograd_nan_stays_in_its_expert(monkeypatch):
    """A NaN in one expert's weights reaches only the tokens routed there and that expert's
    gradients: its padding rows (0 x NaN) are never read back, and no other expert's slice."""
    N, E, D, Fh = 12, 4, 16, 8
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh), _rand(E, Fh, D)
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 2, 3, 0]).unsqueeze(1)   # expert 1: 2 rows of 4
    w13[1, 0, 0] = float("nan")
    calls = spy(monkeypatch, M._PaddedExpertsFn, "apply")
    leaves = [t.clone().requires_grad_() for t in (x, torch.ones(N, 1), w13, w2)]
    out = M.moe_experts_sorted_autograd(leaves[0], leaves[1], idx, leaves[2], leaves[3])
    dx, dw, dw13, dw2 = torch.autograd.grad(out, leaves, torch.ones(N, D))
    assert calls == ["apply"]
    bad = idx[:, 0] == 1
    assert out[bad].isnan().any() and not out[~bad].isnan().any()
    assert not dx[~bad].isnan().any() and not dw[~bad].isnan().any()
    assert not dw13[[0, 2, 3]].isnan().any() and not dw2[[0, 2, 3]].isnan().any()


def test_moe_summed_grads_over_padded_and_sorted_calls(monkeypatch):
    """Inside ``summed_expert_grads`` (the recurrent loops), calls served by the padded and the
    sorted forms add into the same sums, in any order: every gradient as the reference's
    summed over the calls, an expert no call reaches zero."""
    from conftest import assert_close

    N, k, E, D, Fh = 32, 2, 16, 16, 8
    w13, w2 = _rand(E, D, 2 * Fh), _rand(E, Fh, D)
    routes = [_skewed(N, k, E - 1), _balanced(N, k, E - 1), _balanced(N, k, E - 1),
              _skewed(N, k, E - 1)]
    xs = [_rand(N, D) for _ in routes]
    ws = [torch.softmax(torch.randn(N, k), -1) for _ in routes]
    dys = [_rand(N, D) for _ in routes]
    padded = spy(monkeypatch, M._PaddedExpertsFn, "apply")
    sorted_ = spy(monkeypatch, M._SortedExpertsFn, "apply")
    leaves = [t.clone().requires_grad_() for t in (w13, w2, *xs)]
    with M.summed_expert_grads([(leaves[0], leaves[1])]):
        outs = [M.moe_experts_sorted_autograd(x, w, i, leaves[0], leaves[1])
                for x, w, i in zip(leaves[2:], ws, routes)]
    grads = torch.autograd.grad(outs, leaves, dys)
    assert len(padded) == 2 and len(sorted_) == 2
    ref_leaves = [t.clone().requires_grad_() for t in (w13, w2, *xs)]
    refs = [K.moe_experts_reference(x, w, i, ref_leaves[0], ref_leaves[1])
            for x, w, i in zip(ref_leaves[2:], ws, routes)]
    ref_grads = torch.autograd.grad(refs, ref_leaves, dys)
    for r, g in zip(ref_grads, grads):
        assert_close("grad", r, g, torch.float32)
    assert not grads[0][E - 1].any() and not grads[1][E - 1].any()


def test_moe_sorted_autograd_nan_stays_in_its_expert():
    """Stale buffers are never read: a NaN in one expert's weights reaches only the tokens routed
    there and that expert's gradients, not another expert's slice."""
    N, E, D, Fh = 12, 4, 16, 8
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh), _rand(E, Fh, D)
    idx = (torch.arange(N) % E).unsqueeze(1)
    w13[1, 0, 0] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (x, torch.ones(N, 1), w13, w2)]
    out = M.moe_experts_sorted_autograd(leaves[0], leaves[1], idx, leaves[2], leaves[3])
    dx, _, dw13, dw2 = torch.autograd.grad(out, leaves, torch.ones(N, D))
    bad = idx[:, 0] == 1
    assert out[bad].isnan().any() and not out[~bad].isnan().any()
    assert not dx[~bad].isnan().any()
    assert not dw13[[0, 2, 3]].isnan().any() and not dw2[[0, 2, 3]].isnan().any()


@pytest.mark.parametrize("N,k,E,D,Fh", AUTOGRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_autograd_takes_the_grouped_form(N, k, E, D, Fh, dtype):
    """CPU autograd with the sorted form off: the grouped-GEMM form serves (recorded as cpu),
    output and every gradient as the reference's; with its variant off too, or rows off
    F.grouped_mm's 16-byte rule (D = 33), the reference serves."""
    x = _rand(1, dtype=dtype)
    grouped = D * x.element_size() % 16 == 0 and Fh * x.element_size() % 16 == 0
    counts = _autograd_case(N, k, E, D, Fh, dtype, "moe_grouped_mm")
    assert counts == {("moe_experts", "cpu" if grouped else "reference"): 1}
    leaves = [_rand(N, D).requires_grad_(), *_route(N, E, k), _rand(E, D, 2 * Fh), _rand(E, Fh, D)]
    K.reset_dispatch_counts()
    with K.cpu_variant("moe_grouped_mm", False), K.cpu_variant("moe_sorted_autograd", False):
        K.moe_experts(*leaves)
    assert K.dispatch_counts() == {("moe_experts", "reference"): 1}


def test_moe_forced_backends():
    """reference: the plain math even for CPU inference; cpu: the CPU form; cpu on tensors of
    another device raises."""
    N, k, E, D, Fh = 9, 2, 5, 16, 4
    x, w13, w2 = _rand(N, D), _rand(E, D, 2 * Fh), _rand(E, Fh, D)
    weights, idx = _route(N, E, k)
    for backend, impl in (("reference", "reference"), ("cpu", "cpu"), ("auto", "cpu")):
        K.reset_dispatch_counts()
        with torch.no_grad(), K.use_backend(backend):
            K.moe_experts(x, weights, idx, w13, w2)
        assert K.dispatch_counts() == {("moe_experts", impl): 1}, backend
    with torch.no_grad(), K.use_backend("cpu"), pytest.raises(K.BackendUnavailable, match="meta"):
        K.moe_experts(x.to("meta"), weights.to("meta"), idx.to("meta"), w13.to("meta"), w2.to("meta"))


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
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
    dnn = spy(monkeypatch, L, "onednn_linear")
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
    assert sorted_ and dnn
    torch.testing.assert_close(out, K.moe_experts_reference(x, weights, idx, w13, w2),
                               rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("MYTHOS_CPU_ONEDNN", "0")
    dnn.clear()
    with torch.no_grad():
        out = K.moe_experts(x, weights, idx, w13, w2)
    assert not dnn
    torch.testing.assert_close(out, K.moe_experts_reference(x, weights, idx, w13, w2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D,dtype,split", [(24, torch.float32, True), (33, torch.float32, False),
                                           (24, torch.bfloat16, False)])
def test_moe_sorted_small_segments_split(monkeypatch, D, dtype, split):
    """Segments under SMALL_SEGMENT rows: the two-core split products (fp32, even D; the expert
    size floor lowered for these small shapes); an odd D or bf16 keeps the plain products.
    Empty experts in between. (Expert pairs off here: test_moe_sorted_pairs covers them.)"""
    monkeypatch.setattr(M, "SPLIT_MIN_EXPERT", 1)
    K.set_cpu_variant("moe_seg_pairs", False)   # restored by conftest
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
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
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
        torch.testing.assert_close(out, K.moe_experts_reference(x, weights, idx, w13, w2),
                                   rtol=1e-5, atol=1e-6)
        xb, w13b, w2b = x.bfloat16(), w13.contiguous().bfloat16(), w2.bfloat16()
        out = M.moe_experts_sorted(xb, weights.bfloat16(), idx, w13b, w2b, host, order)
        torch.testing.assert_close(out, K.moe_experts_reference(xb, weights.bfloat16(), idx,
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
    torch.testing.assert_close(out, K.moe_experts_reference(x, weights, idx, w13, w2),
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
    ref = K.moe_experts_reference(x, weights, idx, w13, w2)
    S.release_scratch()
    outs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            outs.append(K.moe_experts(x, weights, idx, w13, w2))
    assert S.scratch_bytes() > 0
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


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
        seg = spy(monkeypatch, M, "_segment_split")
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
            ref = K.moe_experts_reference(xs, wts, idx, w13, w2)
            counts = torch.bincount(idx.reshape(-1), minlength=E)
            order = torch.argsort(idx.reshape(-1), stable=True)
            out = M.moe_experts_sorted(xs, wts, idx, w13, w2, counts.tolist(), order)
        assert not seg
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    finally:
        torch.set_num_threads(prev)
    assert L.two_threads() == (prev >= 2)


@pytest.mark.parametrize("form", ["sorted", "sorted-pairs", "padded"])
def test_moe_cpu_forms_ignore_stale_scratch(monkeypatch, form):
    """The MoE CPU forms keep their big intermediates in scratch buffers between calls: with
    those buffers NaN-poisoned the result is still the reference's, and a second call (other
    inputs, the same buffers) leaves the first call's result untouched (no aliasing)."""
    S = importlib.import_module("mythos_kernels._scratch")
    N, k, E, D, Fh = 57, 3, 7, 20, 9
    if form == "sorted":
        K.set_cpu_variant("moe_seg_pairs", False)   # restored by conftest
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
        torch.testing.assert_close(out, K.moe_experts_reference(*args), rtol=1e-5, atol=1e-6)
    assert torch.equal(out1, keep)
