"""Fused recurrent-step kernels (LTI injection + ACT halting + next loop input) against the
plain-torch references in ``mythos_kernels/recurrent.py``.

Run under the interpreter on CPU:
``TRITON_INTERPRET=1 python -m pytest tests/test_recurrent.py -q``.
Without the interpreter (and no GPU) the kernel tests skip; on a GPU they run on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, rel_err

import mythos_kernels as K
from mythos_kernels import recurrent as R

triton = pytest.importorskip("triton")

from conftest import KERNEL_DEVICE as DEV  # noqa: E402
from conftest import needs_kernels  # noqa: E402

# activation dtype -> relative (RMS) tolerance against the fp32 reference
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# bf16 gradients: the bf16 reference itself rounds its reductions; 2e-2 leaves room for that.
GTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
ACT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(2, 5, 60), (1, 1, 96), (1, 3, 200), (3, 1, 64)]  # (B, T, D): odd D, T=1, B=1
EPS = 1e-6


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty / empty_like comes back NaN-filled, so an unwritten output fails."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_like(*a, **k)))
    yield


def _params(D, dev=DEV):
    f32 = {"device": dev, "dtype": torch.float32}
    return {"log_A": 0.5 * torch.randn(D, **f32), "log_dt": 0.3 * torch.randn(1, **f32),
            "B": 0.1 + 0.05 * torch.randn(D, **f32), "w_halt": 0.3 * torch.randn(1, D, **f32),
            "b_halt": 0.5 * torch.randn(1, **f32), "norm_w": 1 + 0.1 * torch.randn(D, **f32)}


def _state(shape, dtype, halting, threshold, P, dev=DEV):
    """Inputs for one step. ``halting``: "mixed", "none" (no row halted before or after) or
    "all" (every row already halted). cum_p is nudged away from the ACT branch boundary
    (cum_p + p == threshold) so a rounding-level difference in p cannot flip the branch."""
    Bn, T, D = shape
    h = torch.randn(Bn, T, D, device=dev).to(dtype)
    e = torch.randn(Bn, T, D, device=dev).to(dtype)
    out = torch.randn(Bn, T, D, device=dev).to(dtype)
    h_out = 0.5 * torch.randn(Bn, T, D, device=dev)
    if halting == "mixed":
        cum_p = 1.2 * threshold * torch.rand(Bn, T, device=dev)
    elif halting == "none":
        cum_p = torch.zeros(Bn, T, device=dev)
        P = dict(P, b_halt=torch.full((1,), -8.0, device=dev), w_halt=0.01 * P["w_halt"])
    else:
        cum_p = threshold + 0.3 * torch.rand(Bn, T, device=dev)
    with torch.no_grad():
        hn = R.get_A(P["log_A"], P["log_dt"]) * h.float() + P["B"] * e.float() + out.float()
        p = torch.sigmoid(hn @ P["w_halt"].reshape(-1) + P["b_halt"])
        near = (cum_p + p - threshold).abs() < 0.03
        cum_p = torch.where(near & (cum_p < threshold), cum_p - 0.06, cum_p).clamp_min(0)
    return {"h": h, "e": e, "out": out, "h_out": h_out, "cum_p": cum_p}, P


def _args(S, P, threshold):
    return (S["h"], S["e"], S["out"], S["h_out"], S["cum_p"], P["log_A"], P["log_dt"], P["B"],
            P["w_halt"], P["b_halt"], threshold)


def _f32(S):
    return {k: v.float() for k, v in S.items()}


def _round_like_kernel(x, dtype):
    """fp32 -> dtype -> fp32 as the kernel rounds: round-to-nearest-even when compiled; the
    Triton 3.6 interpreter truncates fp32 -> bf16 instead (its ``cast_impl``)."""
    if dtype == torch.bfloat16 and DEV == "cpu":
        return (x.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return x.to(dtype).float()


def _ref_inputs(S, P):
    """fp32 inputs for the reference, with ``out`` shifted by a constant so the reference's h'
    equals the kernel's h' rounded to the activation dtype (gradients are unchanged by the
    shift); without it a 16-bit test would mostly measure that one rounding."""
    F = _f32(S)
    if S["h"].dtype != torch.float32:
        with torch.no_grad():
            hn = R.get_A(P["log_A"], P["log_dt"]) * F["h"] + P["B"] * F["e"] + F["out"]
            F["out"] = F["out"] + (_round_like_kernel(hn, S["h"].dtype) - hn)
    return F


def _cotangents(shape, dtype, fused):
    """Random output gradients; those of h' and x_next are representable in ``dtype`` (the
    kernel receives them in the activation dtype)."""
    Bn, T, D = shape
    c = [torch.randn(Bn, T, D, device=DEV).to(dtype).float(), torch.randn(Bn, T, D, device=DEV),
         torch.randn(Bn, T, device=DEV)]
    return c + ([torch.randn(Bn, T, D, device=DEV).to(dtype).float()] if fused else [])


# ------------------------------------------------------------------------------ forward ----

@needs_kernels
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_step_forward(poison, shape, dtype, fused):
    thr = 0.99
    S, P = _state(shape, dtype, "mixed", thr, _params(shape[-1]))
    nl = (3, P["norm_w"], EPS, shape[-1] // 8)
    with torch.no_grad():
        got = R.lti_act_step_triton(*_args(S, P, thr), next_loop=nl if fused else None)
        ref = R.lti_act_step_and_next_input_reference(*_args(_ref_inputs(S, P), P, thr), nl)
    assert len(got) == (4 if fused else 3)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, r, g in zip(("h'", "h_out", "cum_p", "x_next"), ref, got):
        assert torch.isfinite(g).all(), f"{name}: not every element written / finite"
        assert_close(name, r, g.float(), TOL[dtype])
    if fused:
        assert got[3].dtype == dtype


@needs_kernels
@pytest.mark.parametrize("halting", ["mixed", "none", "all"])
@pytest.mark.parametrize("threshold", [0.99, 0.6, 0.3])
def test_step_halting_states(poison, halting, threshold):
    shape = (2, 7, 60)
    S, P = _state(shape, torch.float32, halting, threshold, _params(60))
    with torch.no_grad():
        got = R.lti_act_step_triton(*_args(S, P, threshold))
        ref = R.lti_act_step_reference(*_args(S, P, threshold))
    for name, r, g in zip(("h'", "h_out", "cum_p"), ref, got):
        assert_close(name, r, g, TOL[torch.float32])
    if halting == "all":   # halted rows carry zero weight and keep their cum_p exactly
        assert torch.equal(got[1], S["h_out"]) and torch.equal(got[2], S["cum_p"])
    if halting == "none":
        assert (got[2] < threshold).all()


@needs_kernels
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 60), (1, 1, 200)])
def test_loop_input_forward(poison, shape, dtype):
    D = shape[-1]
    h, e = torch.randn(shape, device=DEV).to(dtype), torch.randn(shape, device=DEV).to(dtype)
    nw = 1 + 0.1 * torch.randn(D, device=DEV)
    with torch.no_grad():
        got = R.loop_input_triton(h, e, 5, nw, EPS, D // 8)
        ref = R.loop_input_reference(h.float(), e.float(), 5, nw, EPS, D // 8)
    assert got.dtype == dtype
    assert_close("x", ref, got.float(), TOL[dtype])


# ----------------------------------------------------------------------------- backward ----

def _leaves(S, P, fused):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in S.items()}
    params = {k: v.detach().clone().requires_grad_() for k, v in P.items()
              if fused or k != "norm_w"}
    return leaves, params


def _grads(fn, S, P, thr, fused, cots, delta=None):
    L, Q = _leaves(S, P, fused)
    nl = (2, Q["norm_w"], EPS, S["h"].shape[-1] // 8) if fused else None
    if delta is not None:
        L["delta"] = delta.detach().clone().requires_grad_()
        outs = fn(*_args(L, Q, thr), next_loop=nl, delta=L["delta"])
    else:
        outs = fn(*_args(L, Q, thr), nl) if fused else fn(*_args(L, Q, thr))
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cots))
    names = list(L) + list(Q)
    return dict(zip(names, torch.autograd.grad(loss, list(L.values()) + list(Q.values()))))


@needs_kernels
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("halting", ["mixed", "none"])
def test_step_backward(poison, shape, dtype, fused, halting):
    """Every gradient (h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, norm weight)
    against autograd through the fp32 reference."""
    thr = 0.9
    S, P = _state(shape, dtype, halting, thr, _params(shape[-1]))
    cots = _cotangents(shape, dtype, fused)
    ref_fn = R.lti_act_step_and_next_input_reference if fused else R.lti_act_step_reference
    ref = _grads(ref_fn, _ref_inputs(S, P), P, thr, fused, cots)
    got = _grads(R.lti_act_step_triton, S, P, thr, fused, cots)
    assert set(got) == set(ref)
    for name in ref:
        g = got[name]
        assert g is not None and g.shape == ref[name].shape, name
        assert g.dtype == (S[name].dtype if name in S else P[name].dtype), name
        if name in _SUMS:
            _close_abs_floor(f"grad {name}", ref[name], g.float(), GTOL[dtype],
                             _sum_floor(name, ref))
        else:
            assert_close(f"grad {name}", ref[name], g.float(), GTOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_step_with_lora_delta(poison, dtype, fused):
    """``delta=`` (the LoRA delta) gives the same as passing ``out + delta``, forward and
    backward; grad delta equals grad out."""
    shape, thr = (2, 3, 60), 0.9
    S, P = _state(shape, dtype, "mixed", thr, _params(60))
    delta = 0.3 * torch.randn(shape, device=DEV).to(dtype)
    cots = _cotangents(shape, dtype, fused)
    summed = dict(S, out=S["out"] + delta)        # rounded to the activation dtype, as eager
    with torch.no_grad():
        a = R.lti_act_step_triton(*_args(S, P, thr), delta=delta)
        b = R.lti_act_step_reference(*_args(_ref_inputs(summed, P), P, thr))
    for name, r, g in zip(("h'", "h_out", "cum_p"), b, a):
        assert_close(name, r, g.float(), TOL[dtype])
    ref_fn = R.lti_act_step_and_next_input_reference if fused else R.lti_act_step_reference
    ref = _grads(ref_fn, _ref_inputs(summed, P), P, thr, fused, cots)
    with K.use_backend("triton"):   # the kernel's backward, also under the CPU interpreter
        got = _grads(R.lti_act_step, S, P, thr, fused, cots, delta=delta)
    assert_close("grad delta", ref["out"], got["delta"].float(), GTOL[dtype])
    for name in ref:
        if name in _SUMS:
            _close_abs_floor(f"grad {name}", ref[name], got[name].float(), GTOL[dtype],
                             _sum_floor(name, ref))
        else:
            assert_close(f"grad {name}", ref[name], got[name].float(), GTOL[dtype])


# Gradients that are sums of many O(1) terms (dcum_p = ... - sum_D(gh_out * h'),
# dlog_dt = sum_D dlog_A, db_halt = sum_rows dz, dw_halt = sum_rows dz * h') can cancel to near
# zero while their rounding errors add up like a random walk; their error is judged against
# max(rms(ref), sqrt(number of terms) x term size) instead of rms(ref) alone. (dw_halt: each
# row's dz is itself such a sum over D; with one row its relative error is dz's, measured over
# 300 draws at (1, 1, 96) fp32: median 9e-8, 99th percentile 1.1e-5, worst 2.0e-5; a test run once
# failed at 2.9e-5 against the plain 2e-5; with the LoRA delta in bf16, 2.3e-2 at worst over 100
# seeds; judged this way, 240 draws of the delta test (both dtypes, fused or not) passed.)
_SUMS = ("cum_p", "log_dt", "b_halt", "w_halt")


def _sum_floor(name, ref):
    if name == "log_dt":
        return ref["log_A"].double().norm().item()
    if name == "cum_p":
        return ref["h"].shape[-1] ** 0.5
    return ref["cum_p"].numel() ** 0.5


def _close_abs_floor(name, ref, out, tol, floor=1.0):
    err = (out.double() - ref.double()).pow(2).mean().sqrt().item()
    scale = max(ref.double().pow(2).mean().sqrt().item(), floor)
    assert err <= tol * scale, f"{name}: error {err:.3e} > {tol:.1e} x {scale:.3g}"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_input_backward(poison, dtype):
    shape = (3, 4, 96)
    D = shape[-1]
    h0, e0 = torch.randn(shape, device=DEV).to(dtype), torch.randn(shape, device=DEV).to(dtype)
    nw0 = 1 + 0.1 * torch.randn(D, device=DEV)
    cot = torch.randn(shape, device=DEV)

    def run(fn, h, e, nw):
        h, e, nw = (t.detach().clone().requires_grad_() for t in (h, e, nw))
        x = fn(h, e, 4, nw, EPS, D // 8)
        return torch.autograd.grad((x.float() * cot).sum(), (h, e, nw))

    ref = run(R.loop_input_reference, h0.float(), e0.float(), nw0)
    got = run(R.loop_input_triton, h0, e0, nw0)
    for name, r, g in zip(("h", "e", "norm_w"), ref, got):
        assert_close(f"grad {name}", r, g.float(), GTOL[dtype])


@needs_kernels
@pytest.mark.parametrize("n_iter", [1, 4])
def test_gradients_chain_across_iterations(poison, n_iter):
    """Several fused steps with a stand-in block: gradients flow through h, h_out and cum_p
    (the remainder weight depends on earlier p's) into every leaf. Against the float64
    reference: each result within 5e-5, or within 4x the fp32 reference's own error where that
    is larger (the scalar parameters' gradients, b_halt and log_dt, are sums over every element
    that can nearly cancel: over 300 seeds the fp32 reference itself erred up to 1.1e-5, and a CI
    run measured the kernel at 5.007e-5 against a fixed 5e-5)."""
    Bn, T, D, thr = 2, 3, 60, 0.7
    P = _params(D)
    P["b_halt"] = torch.full((1,), -0.5, device=DEV)        # rows halt within a few steps
    h0, e0 = torch.randn(Bn, T, D, device=DEV), torch.randn(Bn, T, D, device=DEV)
    Wb = torch.randn(D, D, device=DEV) / D ** 0.5

    def loop(step, h0, e0, Q):
        h, e = h0, e0
        h_out = torch.zeros_like(h0)
        cum_p = torch.zeros(Bn, T, device=DEV, dtype=h0.dtype)
        x = R.loop_input_reference(h, e, 0, Q["norm_w"], EPS, D // 8)
        for t in range(n_iter):
            out = torch.tanh(x @ Wb.to(h0.dtype))
            h, h_out, cum_p, x = step(h, e, out, h_out, cum_p, Q["log_A"], Q["log_dt"], Q["B"],
                                      Q["w_halt"], Q["b_halt"], thr,
                                      (t + 1, Q["norm_w"], EPS, D // 8))
        return h_out, cum_p

    def grads(step, dtype=torch.float32):
        leaves = [h0.to(dtype).requires_grad_(), e0.to(dtype).requires_grad_()]
        Q = {k: v.to(dtype).requires_grad_() for k, v in P.items()}
        h_out, cum_p = loop(step, *leaves, Q)
        loss = (h_out * torch.cos(torch.arange(D, device=DEV, dtype=dtype))).sum() + \
            cum_p.pow(2).sum()
        return [h_out, cum_p] + list(torch.autograd.grad(loss, leaves + list(Q.values())))

    exact = grads(R.lti_act_step_and_next_input_reference, torch.float64)
    ref = grads(R.lti_act_step_and_next_input_reference)
    got = grads(R.lti_act_step_and_next_input_triton)
    names = ["h_out", "cum_p", "h0", "e", *P]
    for name, x64, r, g in zip(names, exact, ref, got):
        assert_close(name, x64, g, max(5e-5, 4 * rel_err(x64, r)))


def test_gradcheck_reference_float64():
    """The reference's own autograd (what the kernels are checked against) in float64."""
    Bn, T, D, thr = 1, 3, 6, 0.8
    dd = {"dtype": torch.float64, "device": "cpu"}
    h, e, out = (torch.randn(Bn, T, D, **dd) for _ in range(3))
    h_out = torch.randn(Bn, T, D, **dd)
    # rows: below threshold and not crossing, crossing (remainder branch), already halted
    cum_p = torch.tensor([[0.05, 0.75, 0.9]], **dd)
    P = {k: v.double() for k, v in _params(D, "cpu").items()}
    P["w_halt"] = 0.05 * P["w_halt"]
    P["b_halt"] = torch.zeros(1, **dd)
    ins = [h, e, out, h_out, cum_p, P["log_A"], P["log_dt"], P["B"], P["w_halt"], P["b_halt"],
           P["norm_w"]]
    ins = [t.clone().requires_grad_() for t in ins]

    def f(h, e, out, h_out, cum_p, log_A, log_dt, B, w, b, nw):
        return R.lti_act_step_and_next_input_reference(h, e, out, h_out, cum_p, log_A, log_dt,
                                                       B, w, b, thr, (2, nw, EPS, 2))

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- long loops ----

@needs_kernels
def test_64_iterations_bf16_stay_finite():
    Bn, T, D, thr = 2, 3, 96, 0.99
    P = _params(D)
    P["b_halt"] = torch.full((1,), -9.0, device=DEV)      # p ~ 1e-4: no row halts in 64 steps
    P["w_halt"] = 0.01 * P["w_halt"]
    h = torch.randn(Bn, T, D, device=DEV).to(torch.bfloat16)
    e = torch.randn(Bn, T, D, device=DEV).to(torch.bfloat16)
    Wb = (torch.randn(D, D, device=DEV) / D ** 0.5).to(torch.bfloat16)

    def loop(step, h, e, x0):
        h_out = torch.zeros(Bn, T, D, device=DEV)
        cum_p = torch.zeros(Bn, T, device=DEV)
        x = x0
        for t in range(64):
            out = torch.tanh(x @ Wb.to(x.dtype))
            h, h_out, cum_p, x = step(h, e, out, h_out, cum_p, P["log_A"], P["log_dt"], P["B"],
                                      P["w_halt"], P["b_halt"], thr,
                                      (t + 1, P["norm_w"], EPS, D // 8))
        return h, h_out, cum_p

    with torch.no_grad():
        x0 = R.loop_input_triton(h, e, 0, P["norm_w"], EPS, D // 8)
        got = loop(R.lti_act_step_and_next_input_triton, h, e, x0)
        ref = loop(R.lti_act_step_and_next_input_reference, h.float(), e.float(), x0.float())
    for name, r, g in zip(("h", "h_out", "cum_p"), ref, got):
        assert torch.isfinite(g).all(), name
        assert_close(name, r, g.float(), 5e-2)
    assert (got[2] > 0).all() and (got[2] < thr).all()


# ------------------------------------------------------------------- dispatch and errors ----

@needs_kernels
def test_dispatch_records_and_matches():
    S, P = _state((2, 3, 60), torch.float32, "mixed", 0.99, _params(60))
    nl = (1, P["norm_w"], EPS, 7)
    K.reset_dispatch_counts()
    with torch.no_grad():
        with K.use_backend("triton"):
            a = R.lti_act_step(*_args(S, P, 0.99), next_loop=nl)
            xa = R.loop_input(S["h"], S["e"], 0, P["norm_w"], EPS, 7)
        with K.use_backend("reference"):
            b = R.lti_act_step_and_next_input(*_args(S, P, 0.99), nl)
            xb = R.loop_input(S["h"], S["e"], 0, P["norm_w"], EPS, 7)
    c = K.dispatch_counts()
    assert c[("lti_act_step", "triton")] == 1 and c[("lti_act_step", "reference")] == 1
    assert c[("loop_input", "triton")] == 1 and c[("loop_input", "reference")] == 1
    for r, g in zip(b + (xb,), a + (xa,)):
        assert_close("dispatch", r, g, TOL[torch.float32])


def test_bad_inputs_raise_value_error():
    S, P = _state((2, 3, 16), torch.float32, "mixed", 0.99, _params(16, "cpu"), "cpu")
    for backend in ("reference", "auto"):
        with K.use_backend(backend):
            bad = [dict(S, h_out=S["h_out"].bfloat16()), dict(S, cum_p=S["cum_p"][:, :2]),
                   dict(S, e=S["e"][..., :8]), dict(S, out=S["out"].double()),
                   dict(S, h=S["h"].double(), e=S["e"].double(), out=S["out"].double())]
            for s in bad:
                with pytest.raises(ValueError):
                    R.lti_act_step(*_args(s, P, 0.99))
            with pytest.raises(ValueError, match="w_halt"):
                R.lti_act_step(*_args(S, dict(P, w_halt=P["w_halt"][:, :5]), 0.99))
            with pytest.raises(ValueError, match="log_dt"):
                R.lti_act_step(*_args(S, dict(P, log_dt=torch.zeros(2)), 0.99))
            with pytest.raises(ValueError, match="threshold"):
                R.lti_act_step(*_args(S, P, float("nan")))
            with pytest.raises(ValueError, match="next_loop"):
                R.lti_act_step(*_args(S, P, 0.99), next_loop=(1, P["norm_w"]))
            with pytest.raises(ValueError, match="norm_weight"):
                R.loop_input(S["h"], S["e"], 0, torch.ones(5), EPS, 2)


def test_forced_triton_that_cannot_run_raises():
    D = R.MAX_D + 8
    S, P = _state((1, 1, D), torch.float32, "mixed", 0.99, _params(D, "cpu"), "cpu")
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailable, match="MAX_D"):
        R.lti_act_step(*_args(S, P, 0.99))
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailable, match="MAX_D"):
        R.loop_input(S["h"], S["e"], 0, P["norm_w"], EPS, 8)
    with K.use_backend("auto"):   # an automatic choice falls back
        R.lti_act_step(*_args(S, P, 0.99))


def test_kernels_registered_and_bytes_helper():
    from bench.ops_recurrent import lti_act_step_bytes, lti_act_step_flops

    names = K.registered_kernels()
    assert {"recurrent_fwd", "recurrent_bwd"} <= set(names)
    assert len(names["recurrent_fwd"].configs) >= 6
    n, D = 16384, 2048
    # fused forward bf16: h, e, out, h' and x_next at 2 B + h_out read and write at 4 B
    assert lti_act_step_bytes(n, D, torch.bfloat16) == n * (18 * D + 12)
    assert lti_act_step_bytes(n, D, torch.float32, fused=False) == n * (24 * D + 12)
    assert lti_act_step_bytes(n, D, torch.bfloat16, backward=True) > \
        lti_act_step_bytes(n, D, torch.bfloat16)
    assert lti_act_step_flops(n, D) > 0


def test_all_halted_is_device_side():
    cum_p = torch.tensor([[0.995, 1.2], [0.99, 0.3]])
    flag = R.all_halted(cum_p, 0.99)
    assert isinstance(flag, torch.Tensor) and flag.dim() == 0 and not bool(flag)
    assert bool(R.all_halted(cum_p.clamp_min(0.99), 0.99))


# -------------------------------------------------------------------------- model level ----

@needs_kernels
@pytest.mark.parity
@pytest.mark.parametrize("n_loops", [1, 3])
def test_model_parity_triton_backend(om, n_loops):
    """The whole model with MYTHOS_BACKEND=triton vs open-mythos 0.5.0, same state_dict; the
    dispatch record shows the recurrent-step kernels served the loop."""
    pytest.importorskip("mythos")
    from conftest import make_pair, tiny_kwargs

    kw = tiny_kwargs("gqa", max_loop_iters=3)
    a, b = make_pair(om, seed=5, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 7))
    K.reset_dispatch_counts()
    with torch.no_grad():
        ref = a(ids, n_loops=n_loops)
        with K.use_backend("triton"):
            try:
                out = b(ids, n_loops=n_loops)
            except K.BackendUnavailable as exc:   # another op's kernel cannot run here
                pytest.skip(f"a non-recurrent kernel cannot run under forced triton: {exc}")
    assert_close("logits", ref, out, 1e-4)
    counts = K.dispatch_counts()
    assert counts.get(("lti_act_step", "triton"), 0) > 0
    assert counts.get(("loop_input", "triton"), 0) + counts.get(("lti_act_step", "triton"), 0) \
        >= n_loops


def _fused_recurrent_loop(rb, h, e, freqs_cis, mask, n_loops, lag=0, lora_delta=True):
    """open-mythos ``RecurrentBlock.forward`` written with the fused step: the next iteration's
    normalized input comes out of the step kernel (the wiring proposed for the model)."""
    thr = rb.cfg.act_threshold
    h_out = torch.zeros(*h.shape, device=h.device, dtype=torch.float32)
    cum_p = torch.zeros(h.shape[:-1], device=h.device, dtype=torch.float32)
    inj, halt = rb.injection, rb.act.halt
    x = R.loop_input(h, e, 0, rb.norm.weight, rb.norm.eps, rb.loop_dim)
    check = R.HaltCheck(h.device, lag=lag)
    for t in range(n_loops):
        out = rb.block(x, freqs_cis, mask, None, f"recurrent_loop_{t}")
        delta = rb.lora(out, t)
        if not lora_delta:
            out, delta = out + delta, None
        h, h_out, cum_p, x = R.lti_act_step(
            h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B, halt.weight, halt.bias, thr,
            next_loop=(t + 1, rb.norm.weight, rb.norm.eps, rb.loop_dim), delta=delta)
        if check(cum_p, thr):
            break
    return h_out.to(h.dtype)


@needs_kernels
@pytest.mark.parity
@pytest.mark.parametrize("n_loops,bias,lag,lora_delta", [(1, 0.0, 0, False), (4, -3.0, 0, True),
                                                         (4, 3.0, 0, True), (4, 3.0, 1, False)])
def test_fused_loop_matches_open_mythos_recurrent_block(om, n_loops, bias, lag, lora_delta):
    """open-mythos's RecurrentBlock vs the same weights run through the fused Triton step
    (forward and every gradient: h, e, LTI, halting, norm and block weights). bias=3 makes
    rows halt within the loop (remainder branch, early exit); lag=1 stops one iteration late
    (the sync-free check) and must give the same output and gradients."""
    from conftest import tiny_kwargs

    kw = tiny_kwargs("gqa", max_loop_iters=4, act_threshold=0.9)
    torch.manual_seed(3)
    model = om.OpenMythos(om.MythosConfig(**kw)).eval()
    rb = model.recurrent
    with torch.no_grad():
        for p in rb.parameters():
            p.add_(0.1 * torch.randn_like(p))
        rb.act.halt.bias.fill_(bias)
    Bn, T, D = 2, 5, kw["dim"]
    h0 = torch.randn(Bn, T, D, device=DEV)
    freqs_cis = model.freqs_cis[:T]
    mask = model._causal_mask(T, h0.device)
    cot = torch.randn(Bn, T, D, device=DEV)
    names = ["injection.log_A", "injection.log_dt", "injection.B", "act.halt.weight",
             "act.halt.bias", "norm.weight", "lora.B", "lora.down.weight", "lora.scale.weight",
             "block.attn_norm.weight", "block.attn.wq.weight", "block.ffn.router.weight",
             "block.ffn.shared_experts.0.down.weight"]
    params = dict(rb.named_parameters())

    def run(fn):
        h = h0.clone().requires_grad_()
        e = (0.5 * h0).clone().requires_grad_()
        y = fn(rb, h, e, freqs_cis, mask, n_loops)
        g = torch.autograd.grad((y * cot).sum(), [h, e] + [params[n] for n in names])
        return [y] + list(g)

    ref = run(lambda rb, *a: rb(*a))
    K.reset_dispatch_counts()
    with K.use_backend("triton"):
        got = run(lambda *a: _fused_recurrent_loop(*a, lag=lag, lora_delta=lora_delta))
    steps = K.dispatch_counts()[("lti_act_step", "triton")]
    if bias > 0:   # every row halts within two iterations: early exit (lag=1: one step later)
        assert 1 + lag <= steps <= 2 + lag < n_loops, steps
    else:
        assert steps == n_loops
    for name, r, g in zip(["h_out", "h", "e"] + names, ref, got):
        assert_close(name, r, g, 1e-4)


@pytest.mark.parametrize("lag", [0, 1])
def test_halt_check_lag(lag):
    """lag=0 answers for this iteration; lag=1 for the previous one (never before it is set)."""
    check = R.HaltCheck("cpu", lag=lag)
    states = [torch.tensor([0.2, 0.5]), torch.tensor([0.995, 0.5]), torch.tensor([0.995, 0.99]),
              torch.tensor([0.995, 1.3])]
    answers = [check(s, 0.99) for s in states]
    expect = [False, False, True, True]
    assert answers == (expect if lag == 0 else [False] + expect[:-1])
    with pytest.raises(ValueError):
        R.HaltCheck("cpu", lag=2)
    assert R.HaltCheck("cpu").lag == 0


def test_halt_lag_default_env_and_model(monkeypatch):
    """Default lag 0 on every device; MYTHOS_HALT_LAG=1 or RecurrentBlock.halt_lag = 1 reads the
    flag a loop late: same logits, one more loop when every row halts early."""
    from conftest import tiny_kwargs

    import mythos

    assert R.HaltCheck("cuda").lag == 0
    monkeypatch.setenv("MYTHOS_HALT_LAG", "1")
    assert R.HaltCheck("cpu").lag == 1 and R.HaltCheck("cpu", lag=0).lag == 0
    monkeypatch.setenv("MYTHOS_HALT_LAG", "2")
    with pytest.raises(ValueError, match="MYTHOS_HALT_LAG"):
        R.HaltCheck("cpu")
    monkeypatch.delenv("MYTHOS_HALT_LAG")

    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa"))).eval()
    with torch.no_grad():
        m.recurrent.act.halt.weight.zero_()
        m.recurrent.act.halt.bias.fill_(20.0)          # p = 1: every row halts after one loop
    ids = torch.randint(0, m.cfg.vocab_size, (2, 5))
    calls = []
    hook = m.recurrent.block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out0 = m(ids, n_loops=4)
        n0 = len(calls)
        m.recurrent.halt_lag = 1
        out1 = m(ids, n_loops=4)
        n1 = len(calls) - n0
    hook.remove()
    assert (n0, n1) == (1, 2)
    torch.testing.assert_close(out0, out1, rtol=0, atol=0)


# ---------------------------------------------------------------------- compile (no GPU) ----

@pytest.mark.skipif(K.interpreter_active(), reason="compiles real GPU code: run without "
                    "TRITON_INTERPRET")
@pytest.mark.parametrize("kernel,cfg", [
    ("recurrent_fwd", "bf16-B2048-step+norm+delta"), ("recurrent_fwd", "fp32-B4096-step+norm"),
    ("recurrent_bwd", "bf16-B4096-step+norm"), ("recurrent_bwd", "fp32-B4096-step+norm"),
    ("recurrent_bwd", "bf16-B2048-step+norm"), ("recurrent_bwd", "fp32-B4096-+norm")])
def test_compiles_without_spills(kernel, cfg, tmp_path):
    """sm_90 and sm_80 builds of the main configs, specialized as the runtime specializes them
    (pointers and D 16-divisible), use no stack (no register spills)."""
    import os
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ent = K.registered_kernels()[kernel]
    c = next(c for c in ent.configs if c.name == cfg)
    fn = ent.fn
    sig = dict(c.signature)
    sig.update({k: "constexpr" for k in c.constexprs})
    sig = {n: sig[n] for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in c.signature.items() if t.startswith("*") or n == "D"}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    for arch in (90, 80):
        k = triton.compile(ASTSource(fn, sig, dict(c.constexprs), attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": c.num_warps, "num_stages": c.num_stages})
        path = tmp_path / f"k{arch}.cubin"
        path.write_bytes(k.asm["cubin"])
        usage = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        assert "STACK:0 " in usage, f"sm_{arch} {cfg}: {usage}"


def test_float64_runs_on_the_reference_only():
    """fp64 activations (an fp64 model) step on the reference with fp64 ACT state, matching a
    plain fp64 evaluation of the formula; forcing Triton raises, naming the dtype."""
    S, P = _state((2, 3, 16), torch.float64, "mixed", 0.99, _params(16, "cpu"), "cpu")
    S = dict(S, h_out=S["h_out"].double(), cum_p=S["cum_p"].double())
    P = {k: (v.double() if torch.is_tensor(v) else v) for k, v in P.items()}
    with K.use_backend("auto"):
        h2, ho, cp = R.lti_act_step(*_args(S, P, 0.99))
    assert h2.dtype == ho.dtype == cp.dtype == torch.float64
    A = torch.exp(-torch.exp((P["log_dt"] + P["log_A"]).clamp(-20, 20)))
    h_ref = A * S["h"] + P["B"] * S["e"] + S["out"]
    assert_close("fp64 h'", h_ref, h2, 1e-15)
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailable, match="float64"):
        R.lti_act_step(*_args(S, P, 0.99))
    with K.use_backend("triton"), pytest.raises(K.BackendUnavailable, match="float64"):
        R.loop_input(S["h"], S["e"], 0, P["norm_w"], EPS, 8)


@pytest.mark.parametrize("backend", ["reference", "auto", pytest.param("triton", marks=needs_kernels)])
def test_step_and_input_return_h_dtype_with_wider_parameters(backend):
    """bf16 activations with fp32 parameters (or an fp64 norm weight with fp32 activations):
    h' and the next input come back in h's dtype on every backend, as documented (the
    reference's math would promote them); the ACT state stays fp32; numpy scalars pass."""
    import numpy as np

    S, P = _state((2, 3, 16), torch.bfloat16, "mixed", 0.99, _params(16, "cpu"), "cpu")
    with K.use_backend(backend):
        res = R.lti_act_step(*_args(S, P, np.float32(0.99)),
                             next_loop=(1, P["norm_w"], EPS, 2))
        x = R.loop_input(S["h"].float(), S["e"].float(), 0, P["norm_w"].double(), EPS, 2)
    assert [t.dtype for t in res] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    assert x.dtype == torch.float32
    ref = R.lti_act_step_reference(*_args(_f32(S), P, 0.99))
    assert_close("h'", ref[0], res[0].float(), torch.bfloat16)
