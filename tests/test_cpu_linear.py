"""The CPU forms of the linear layers (``mythos_kernels.linear``) against ``F.linear``: ``K.dense``
with at most ``SPLIT_ROWS`` rows multiplies the weight's two row halves in one bmm, with more rows
it calls oneDNN's linear; ``vecmat``'s split-K product; the LM head's transposed copy and kept
logits; the packed shared experts; the cache of derived weights. All are taken only on the CPU
without autograd; everything else goes to ``F.linear``, which the fallback tests check too."""

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
    calls = spy(monkeypatch, L, "onednn_linear")
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
    calls = spy(monkeypatch, L, "onednn_linear")
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
    calls = spy(monkeypatch, L, "onednn_linear")
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
    blocks = spy(monkeypatch, L, "onednn_linear")
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
        with K.cpu_variant("head_kept", False):
            refs = [m(i) for i in ids]
        held = [m(i) for i in ids]
        again = m(ids[0])
    for out, ref in zip(held + [again], refs + refs[:1]):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
