"""The recurrent step around the shared block: loop-index signal + RMSNorm on the way in, and the
LTI-stable update + ACT halting on the way out.

Per loop iteration t (open-mythos 0.5.0 ``RecurrentBlock.forward``)::

    x_t    = RMSNorm(h + loop_emb(t) + e)                                   # loop_input
    out    = Block(x_t) + LoRA(Block(x_t), t)                               # outside this file
    A      = exp(-exp(clamp(log_dt + log_A, -20, 20)))                       # 0 < A < 1
    h'     = A * h + B * e + out
    p      = sigmoid(h' . w_halt + b_halt)                                   # [B, T]
    run    = cum_p < threshold                                               # not yet halted
    w      = where(cum_p + p >= threshold, clamp(1 - cum_p, min=0), p) * run
    h_out += w * h'
    cum_p += p * run
    x_t+1  = RMSNorm(h' + loop_emb(t + 1) + e)                              # optional, fused

``halted`` of open-mythos is ``cum_p >= threshold``: cum_p never decreases, so the running OR of
that test equals the test on the current cum_p, and only cum_p needs carrying. ACT state (cum_p,
h_out) is fp32 whatever the activation dtype, fp64 for fp64 activations (reference only: the
Triton kernels take fp32/bf16/fp16).

Triton path (one pass over each row, fp32 math, h' rounded to the activation dtype once and that
rounded value used downstream, as the reference does):

* ``_recurrent_fwd_kernel`` -- one program per token row: the LTI update, the halting dot product,
  the ACT weight, h_out / cum_p update and (``NORM``) the next iteration's normalized input.
  With ``STEP=False`` it is the standalone ``loop_input`` (RMSNorm(h + emb + e)).
* ``_recurrent_bwd_kernel`` -- persistent programs looping over rows: row gradients for h, e, out,
  cum_p and per-program column partials for A (-> log_A, log_dt), B, w_halt, b_halt, norm weight.

Public API: :func:`loop_input`, :func:`lti_act_step` (``next_loop=`` fuses the next iteration's
input, ``delta=`` takes the LoRA delta unsummed), :func:`lti_act_step_and_next_input`, the
``*_triton`` / ``*_reference`` variants, :class:`HaltCheck` (early exit without a sync per
iteration) (the bench's byte and FLOP counts: ``bench/ops_recurrent.py``).

Bytes per token (fused, bf16): read h, e, out (2 B each), h_out (4 B); write h', x (2 B each),
h_out (4 B) = 18 D bytes (+ 2 D with the LoRA delta, + 12 B of ACT state); see
``bench.ops_recurrent.lti_act_step_bytes``. Widths up to ``MAX_D`` = 4096 (whole row in registers).
"""

from __future__ import annotations

import math
import numbers

import torch

from ._dispatch import choose
from ._env import env_int
from .rmsnorm import rms_norm_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing
    triton = None
    tl = None

_EMB_CACHE: dict = {}
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # fp64: reference
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 4096  # widest row the Triton kernels take (whole row in registers, no spills)


# ---------------------------------------------------------------------------------------------
# Plain-torch references (the semantics; the model, the tests and the benchmarks import these)
# ---------------------------------------------------------------------------------------------

def loop_index_embedding(h: torch.Tensor, loop_t: int, loop_dim: int,
                         theta: float = 10000.0) -> torch.Tensor:
    """Add a sinusoidal loop-index signal to the first ``loop_dim`` channels of h (open-mythos)."""
    return h + loop_embedding_vector(loop_t, loop_dim, h.shape[-1], h.dtype, h.device, theta)


def loop_embedding_vector(loop_t: int, loop_dim: int, dim: int, dtype: torch.dtype,
                          device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    """The [dim] vector that :func:`loop_index_embedding` adds, computed in ``dtype`` exactly as
    open-mythos does (so bf16 rounding matches too); cached per (t, dim, dtype, device)."""
    key = (loop_t, loop_dim, dim, dtype, str(device), theta)
    emb = _EMB_CACHE.get(key)
    if emb is None:
        # a normal tensor even under torch.inference_mode(): a cached inference tensor could not
        # be saved for backward by a later training step (the Triton path's autograd Functions)
        with torch.inference_mode(False):
            freqs = 1.0 / (theta ** (torch.arange(0, loop_dim, 2, device=device, dtype=dtype)
                                     / loop_dim))
            angles = loop_t * freqs
            emb_v = torch.cat([angles.sin(), angles.cos()], dim=-1)[:loop_dim]
            emb = torch.zeros(dim, device=device, dtype=dtype)
            emb[:loop_dim] = emb_v
        if len(_EMB_CACHE) > 4096:
            _EMB_CACHE.clear()
        _EMB_CACHE[key] = emb
    return emb


def get_A(log_A: torch.Tensor, log_dt: torch.Tensor) -> torch.Tensor:
    """Discretized diagonal state matrix, exactly open-mythos's ``LTIInjection.get_A``."""
    return torch.exp(-torch.exp((log_dt + log_A).clamp(-20, 20)))


def loop_input_reference(h: torch.Tensor, e: torch.Tensor, loop_t: int, norm_weight: torch.Tensor,
                         eps: float, loop_dim: int) -> torch.Tensor:
    """RMSNorm(loop_index_embedding(h, t) + e). h, e: [B, T, D] -> [B, T, D]."""
    return rms_norm_reference(loop_index_embedding(h, loop_t, loop_dim) + e, norm_weight, eps)


def lti_act_step_reference(h: torch.Tensor, e: torch.Tensor, out: torch.Tensor,
                           h_out: torch.Tensor, cum_p: torch.Tensor, log_A: torch.Tensor,
                           log_dt: torch.Tensor, B: torch.Tensor, w_halt: torch.Tensor,
                           b_halt: torch.Tensor, threshold: float, A: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LTI update + ACT accumulation (formula in the module docstring).

    Args:
        h, e, out: [B, T, D] hidden state, injected input, block output (LoRA delta included).
        h_out:     [B, T, D] ACT-weighted output accumulated so far (``acc_dtype(h.dtype)``).
        cum_p:     [B, T] cumulative halting probability (the same dtype).
        log_A [D], log_dt [1], B [D]: LTI parameters; w_halt [1, D] or [D], b_halt [1]: halting head.
        threshold: ACT threshold.
        A: ``get_A(log_A, log_dt)`` if the caller has it already (a decode plan computes it
           once per step, not once per loop); computed here otherwise.

    Returns:
        (h' [B, T, D] in h's dtype, h_out', cum_p' in ``acc_dtype(h.dtype)``)
    """
    if A is None:
        A = get_A(log_A, log_dt)
    h_new = A * h + B * e + out
    p = torch.sigmoid(torch.nn.functional.linear(h_new, w_halt.reshape(1, -1), b_halt)).squeeze(-1)
    return (h_new, *act_accumulate_reference(h_new, p, h_out, cum_p, threshold))


def act_accumulate_reference(h: torch.Tensor, p: torch.Tensor, h_out: torch.Tensor,
                             cum_p: torch.Tensor, threshold: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ACT's accumulation of one loop (open-mythos's remainder trick): a running position adds
    ``p`` [B, T] times h [B, T, D] to h_out, or the remainder ``1 - cum_p`` on the loop where
    ``cum_p + p`` reaches the threshold; a halted one (``cum_p >= threshold``) adds nothing.
    Returns (h_out', cum_p') in cum_p's dtype."""
    still = (cum_p < threshold).to(cum_p.dtype)
    remainder = (1.0 - cum_p).clamp(min=0)
    weight = torch.where(cum_p + p >= threshold, remainder, p) * still
    h_out = h_out + weight.unsqueeze(-1) * h
    cum_p = cum_p + p * still
    return h_out, cum_p


def lti_act_step_and_next_input_reference(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt,
                                          b_halt, threshold, next_loop, A=None):
    """:func:`lti_act_step_reference` followed by :func:`loop_input_reference` of the new h.

    ``next_loop = (t_next, norm_weight, eps, loop_dim)``. Returns (h', h_out', cum_p', x_next).
    """
    t_next, norm_w, eps, loop_dim = next_loop
    h_new, h_out, cum_p = lti_act_step_reference(h, e, out, h_out, cum_p, log_A, log_dt, B,
                                                 w_halt, b_halt, threshold, A)
    return h_new, h_out, cum_p, loop_input_reference(h_new, e, t_next, norm_w, eps, loop_dim)


def all_halted(cum_p: torch.Tensor, threshold: float) -> torch.Tensor:
    """Device-side 0-dim bool: every row has halted (``cum_p >= threshold``). No host sync; the
    caller decides when to read it (see ``docs/roofline_recurrent.md``, "early exit")."""
    return (cum_p >= threshold).all()


class HaltCheck:
    """The loop's "every row halted -> stop" test, with or without a device->host sync each
    iteration.

    ``lag=0`` (the default) answers for the current cum_p: one blocking read per iteration on
    CUDA, like open-mythos's ``halted.all()``, and the loop stops exactly where open-mythos does.
    ``lag=1`` copies the device flag of iteration t into pinned host memory asynchronously and
    answers, at iteration t, for the flag of iteration t-1, waiting only on that older copy -- by
    then iteration t's kernels are queued, so the GPU never idles on the check; the loop then
    stops one iteration later than open-mythos (same output: a halted row gets weight exactly 0,
    h_out and cum_p unchanged, zero gradient through that iteration).

    Lag 1 saves a few % of a forward when every loop runs and costs a whole extra iteration when every
    row halts early (``docs/performance-gpu.md``, "Early exit"), so lag 0 is the default and lag 1
    is for workloads where early exit is rare (large-batch training, a high ``act_threshold``):
    ``HaltCheck(device, lag=1)``, ``RecurrentBlock.halt_lag = 1`` or ``MYTHOS_HALT_LAG=1``::

        check = HaltCheck(cum_p.device)
        for t in range(n_loops):
            ...
            if kv_cache is None and check(cum_p, threshold):
                break
    """

    def __init__(self, device: torch.device | str, lag: int | None = None):
        # ``device`` stays in the signature for callers; the default lag no longer depends on it
        if lag is None:
            lag = env_int("MYTHOS_HALT_LAG", 0, 0, 1)
        self.lag = int(lag)
        if self.lag not in (0, 1):
            raise ValueError(f"lag must be 0 or 1, got {lag}")
        self._pending: tuple[torch.Tensor, object] | None = None
        self._host: list[torch.Tensor] = []   # two pinned flags, used in turn
        self._calls = 0

    def __call__(self, cum_p: torch.Tensor, threshold: float) -> bool:
        flag = all_halted(cum_p, threshold)
        if self.lag == 0:
            return bool(flag)
        prev, self._pending = self._pending, None
        if not self._host:
            self._host = [torch.empty((), dtype=torch.bool, device="cpu", pin_memory=flag.is_cuda)
                          for _ in range(2)]
        # buffer k % 2 was last read (after its event) at call k - 1: safe to overwrite
        host = self._host[self._calls % 2]
        self._calls += 1
        host.copy_(flag, non_blocking=True)
        event = None
        if flag.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (host, event)
        if prev is None:
            return False
        if prev[1] is not None:
            prev[1].synchronize()
        return bool(prev[0])


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _recurrent_fwd_kernel(
        H, E, OUT, DELTA, HOUT, CUMP,     # [N, D] act x4, [N, D] fp32, [N] fp32
        LOGA, LOGDT, BVEC, WH, BH,        # [D], [1], [D], [D], [1]
        NW, EMB,                          # [D] norm weight, [D] loop embedding (act dtype)
        HN, HOUT_N, CUMP_N, P_OUT, X,     # outputs: [N, D] act, [N, D] fp32, [N], [N], [N, D] act
        D, threshold, eps,
        BLOCK_D: tl.constexpr, STEP: tl.constexpr, NORM: tl.constexpr, STORE_P: tl.constexpr,
        HAS_DELTA: tl.constexpr,
    ):
        """One token row. STEP: h' = A h + B e + out (+ delta), p = sigmoid(h'.w + b), ACT
        weight, h_out, cum_p. NORM: x = RMSNorm(h' + emb + e) (h' = H when not STEP)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        offs = row * D + cols
        e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
        if STEP:
            h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            o = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_DELTA:   # the LoRA delta, added in the activation dtype as out + lora(out)
                o = (o + tl.load(DELTA + offs, mask=mask, other=0.0).to(tl.float32)) \
                    .to(OUT.dtype.element_ty).to(tl.float32)
            s = tl.load(LOGA + cols, mask=mask, other=0.0).to(tl.float32) \
                + tl.load(LOGDT).to(tl.float32)
            s = tl.minimum(tl.maximum(s, -20.0), 20.0)
            a = tl.exp(-tl.exp(s))
            b = tl.load(BVEC + cols, mask=mask, other=0.0).to(tl.float32)
            hn_st = (a * h + b * e + o).to(HN.dtype.element_ty)
            tl.store(HN + offs, hn_st, mask=mask)
            hn = hn_st.to(tl.float32)                    # downstream uses the stored h'
            w = tl.load(WH + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.sum(hn * w, axis=0) + tl.load(BH).to(tl.float32)
            p = 1.0 / (1.0 + tl.exp(-z))
            c = tl.load(CUMP + row)
            still = c < threshold
            rem = tl.maximum(1.0 - c, 0.0)
            wt = tl.where(c + p >= threshold, rem, p)
            wt = tl.where(still, wt, 0.0)
            acc = tl.load(HOUT + offs, mask=mask, other=0.0)
            tl.store(HOUT_N + offs, acc + wt * hn, mask=mask)
            tl.store(CUMP_N + row, c + tl.where(still, p, 0.0))
            if STORE_P:
                tl.store(P_OUT + row, p)
        else:
            hn = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            u = hn + tl.load(EMB + cols, mask=mask, other=0.0).to(tl.float32) + e
            r = tl.rsqrt(tl.sum(u * u, axis=0) / D + eps)
            nw = tl.load(NW + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(X + offs, (u * r * nw).to(X.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["N"])
    def _recurrent_bwd_kernel(
        H, E, HN, CUMP, P,                # saved: [N, D] act x3, [N] fp32 x2
        LOGA, LOGDT, BVEC, WH, NW, EMB,   # params
        GHN, GHOUT, GCUMP, GX,            # incoming grads: [N, D] act, [N, D] fp32, [N], [N, D] act
        DH, DE, DOUT, DCUMP,              # row grads: [N, D] act x3, [N] fp32
        PART,                             # [G, 5, D] fp32 column partials: A, B, w, nw; b at [4, 0]
        N, D, threshold, eps,
        BLOCK_D: tl.constexpr, STEP: tl.constexpr, NORM: tl.constexpr,
    ):
        """Persistent: program g takes rows g, g+G, ... and writes its column partials once."""
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        acc_a = tl.zeros([BLOCK_D], dtype=tl.float32)   # sum_rows dh' * h      (-> log_A, log_dt)
        acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)   # sum_rows dh' * e      (-> B)
        acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)   # sum_rows dz * h'      (-> w_halt)
        acc_nw = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum_rows gx * u * r   (-> norm weight)
        acc_db = 0.0                                    # sum_rows dz           (-> b_halt)
        row = pid.to(tl.int64)
        # Statement order keeps few rows live at once (the whole row sits in registers).
        for _ in range(pid, N, G):
            offs = row * D + cols
            e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
            if STEP:
                hn = tl.load(HN + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                hn = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            du = tl.zeros([BLOCK_D], dtype=tl.float32)
            if NORM:  # x = u r nw, u = h' + emb + e, r = rsqrt(mean(u^2) + eps)
                gx = tl.load(GX + offs, mask=mask, other=0.0).to(tl.float32)
                u = hn + tl.load(EMB + cols, mask=mask, other=0.0).to(tl.float32) + e
                r = tl.rsqrt(tl.sum(u * u, axis=0) / D + eps)
                acc_nw += gx * u * r
                g = gx * tl.load(NW + cols, mask=mask, other=0.0).to(tl.float32)
                du = r * g - u * (r * r * r * tl.sum(g * u, axis=0) / D)
            if STEP:
                c = tl.load(CUMP + row)
                p = tl.load(P + row)
                gc = tl.load(GCUMP + row)
                gho = tl.load(GHOUT + offs, mask=mask, other=0.0)
                still = c < threshold
                cond = c + p >= threshold
                rem = tl.maximum(1.0 - c, 0.0)
                wt = tl.where(still, tl.where(cond, rem, p), 0.0)
                dwt = tl.where(still, tl.sum(gho * hn, axis=0), 0.0)   # d weight
                dp = tl.where(still, gc, 0.0) + tl.where(cond, 0.0, dwt)
                drem = tl.where(cond, dwt, 0.0)
                tl.store(DCUMP + row, gc - tl.where(1.0 - c >= 0.0, drem, 0.0))
                dz = dp * p * (1.0 - p)
                acc_w += dz * hn
                acc_db += dz
                ghn = tl.load(GHN + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(WH + cols, mask=mask, other=0.0).to(tl.float32)
                dhn = ghn + wt * gho + dz * w + du
                tl.store(DOUT + offs, dhn.to(DOUT.dtype.element_ty), mask=mask)
                b = tl.load(BVEC + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DE + offs, (dhn * b + du).to(DE.dtype.element_ty), mask=mask)
                acc_b += dhn * e
                s = tl.load(LOGA + cols, mask=mask, other=0.0).to(tl.float32) \
                    + tl.load(LOGDT).to(tl.float32)
                s = tl.minimum(tl.maximum(s, -20.0), 20.0)
                a = tl.exp(-tl.exp(s))
                tl.store(DH + offs, (dhn * a).to(DH.dtype.element_ty), mask=mask)
                h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
                acc_a += dhn * h
            else:
                tl.store(DH + offs, du.to(DH.dtype.element_ty), mask=mask)
            row += G
        base = PART + pid.to(tl.int64) * 5 * D
        tl.store(base + cols, acc_a, mask=mask)
        tl.store(base + D + cols, acc_b, mask=mask)
        tl.store(base + 2 * D + cols, acc_w, mask=mask)
        tl.store(base + 3 * D + cols, acc_nw, mask=mask)
        tl.store(base + 4 * D, acc_db)


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _fwd_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def _bwd_warps(block_d: int, elem_size: int, step: bool) -> int:
    # whole row + column accumulators in registers: chosen so sm_80/sm_90 builds do not spill
    if block_d <= 512:
        return 4
    if block_d <= 2048 or not step:
        return 8
    return 16 if elem_size <= 2 else 32


_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _div(block_d: int) -> tuple[str, ...]:
    """The wide configs serve model widths (512..4096), multiples of 16 in every variant: the
    report compiles them with D specialized as the JIT does at launch."""
    return ("D",) if block_d >= 1024 else ()


def _register() -> None:
    """Register the shipped compile configurations (one per dtype x width x mode)."""
    if triton is None:
        return
    from ._registry import KernelConfig, register_kernel

    fwd, bwd = [], []
    for dt in ("fp32", "bf16", "fp16"):
        for block_d in (128, 1024, 2048, 4096):
            for step, norm, delta in ((True, True, True), (True, True, False),
                                      (True, False, True), (True, False, False),
                                      (False, True, False)):
                mode = ("step" if step else "") + ("+norm" if norm else "") + \
                    ("+delta" if delta else "")
                sig = {n: f"*{dt}" for n in ("H", "E", "OUT", "DELTA", "HN", "X", "EMB")}
                sig.update({n: "*fp32" for n in ("HOUT", "CUMP", "LOGA", "LOGDT", "BVEC", "WH",
                                                 "BH", "NW", "HOUT_N", "CUMP_N", "P_OUT")})
                sig.update({"D": "i32", "threshold": "fp32", "eps": "fp32"})
                fwd.append(KernelConfig(f"{dt}-B{block_d}-{mode}", sig,
                                        {"BLOCK_D": block_d, "STEP": step, "NORM": norm,
                                         "STORE_P": step, "HAS_DELTA": delta},
                                        num_warps=_fwd_warps(block_d),
                                        num_stages=1, divisible=_div(block_d)))
                sig = {n: f"*{dt}" for n in ("H", "E", "HN", "EMB", "GHN", "GX", "DH", "DE",
                                             "DOUT")}
                sig.update({n: "*fp32" for n in ("CUMP", "P", "LOGA", "LOGDT", "BVEC", "WH", "NW",
                                                 "GHOUT", "GCUMP", "DCUMP", "PART")})
                sig.update({"N": "i32", "D": "i32", "threshold": "fp32", "eps": "fp32"})
                warps = _bwd_warps(block_d, 4 if dt == "fp32" else 2, step)
                bwd.append(KernelConfig(f"{dt}-B{block_d}-{mode}", sig,
                                        {"BLOCK_D": block_d, "STEP": step, "NORM": norm},
                                        num_warps=warps,
                                        num_stages=1, divisible=_div(block_d)))
    register_kernel("recurrent_fwd", _recurrent_fwd_kernel, fwd)
    register_kernel("recurrent_bwd", _recurrent_bwd_kernel, bwd)


_register()


# ---------------------------------------------------------------------------------------------
# Launchers and autograd
# ---------------------------------------------------------------------------------------------

def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    return t.reshape(-1, D).contiguous()


def _num_bwd_programs(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(2 * sms, -(-n // 8)))
    return max(1, min(n, 3))  # interpreter: few programs, each looping over rows


def _param(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous()


def _fwd_launch(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, norm_w, emb,
                threshold, eps, step, norm, store_p, delta=None):
    D = h.shape[-1]
    h2, e2 = _rows(h, D), _rows(e, D)
    n = h2.shape[0]
    dev = h.device
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    hn = torch.empty_like(h2) if step else dummy
    hon = torch.empty((n, D), device=dev, dtype=torch.float32) if step else dummy
    cpn = torch.empty(n, device=dev, dtype=torch.float32) if step else dummy
    p = torch.empty(n, device=dev, dtype=torch.float32) if (step and store_p) else dummy
    x = torch.empty_like(h2) if norm else dummy
    if n > 0:
        block_d = _block_d(D)
        _recurrent_fwd_kernel[(n,)](
            h2, e2, _rows(out, D) if step else h2, _rows(delta, D) if delta is not None else h2,
            _rows(h_out, D) if step else dummy,
            cum_p.reshape(-1).contiguous() if step else dummy,
            _param(log_A) if step else dummy, _param(log_dt) if step else dummy,
            _param(B) if step else dummy, _param(w_halt) if step else dummy,
            _param(b_halt) if step else dummy,
            _param(norm_w) if norm else dummy, emb if norm else h2,
            hn, hon, cpn, p, x,
            D, float(threshold), float(eps),
            BLOCK_D=block_d, STEP=step, NORM=norm, STORE_P=store_p, HAS_DELTA=delta is not None,
            num_warps=_fwd_warps(block_d), num_stages=1)
    return hn, hon, cpn, p, x


def _bwd_launch(h2, e2, hn2, cum_p, p, log_A, log_dt, B, w_halt, norm_w, emb,
                g_hn, g_hout, g_cum, g_x, threshold, eps, step, norm):
    n, D = e2.shape
    dev = e2.device
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    G = _num_bwd_programs(n, dev)
    part = torch.empty((G, 5, D), device=dev, dtype=torch.float32)
    dh = torch.empty_like(h2)
    de = torch.empty_like(e2) if step else dh
    dout = torch.empty_like(e2) if step else dummy
    dcum = torch.empty(n, device=dev, dtype=torch.float32) if step else dummy
    if n > 0:
        block_d = _block_d(D)
        _recurrent_bwd_kernel[(G,)](
            h2, e2, hn2 if step else h2, cum_p if step else dummy, p if step else dummy,
            _param(log_A) if step else dummy, _param(log_dt) if step else dummy,
            _param(B) if step else dummy, _param(w_halt) if step else dummy,
            _param(norm_w) if norm else dummy, emb if norm else h2,
            g_hn if step else h2, g_hout if step else dummy, g_cum if step else dummy,
            g_x if norm else h2,
            dh, de, dout, dcum, part,
            n, D, float(threshold), float(eps),
            BLOCK_D=block_d, STEP=step, NORM=norm,
            num_warps=_bwd_warps(block_d, h2.element_size(), step), num_stages=1)
    else:
        part.zero_()
    sums = part.sum(0)  # [5, D]
    return dh, de, dout, dcum, sums


def _grad_like(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if g is None:
        return torch.zeros_like(like)
    return g.reshape(like.shape).to(like.dtype).contiguous()


class _LTIACTStepFn(torch.autograd.Function):
    """Autograd for the fused step (optionally + next loop input). Inputs as the public API."""

    @staticmethod
    def forward(ctx, h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, norm_w, emb,
                threshold, eps, fused, delta):
        D = h.shape[-1]
        need_grad = any(ctx.needs_input_grad[:12]) or ctx.needs_input_grad[15]
        hn, hon, cpn, p, x = _fwd_launch(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt,
                                         b_halt, norm_w, emb, threshold, eps, True, fused,
                                         need_grad, delta)
        ctx.threshold, ctx.eps, ctx.fused, ctx.shape = threshold, eps, fused, h.shape
        ctx.has_delta = delta is not None
        if need_grad:
            ctx.save_for_backward(_rows(h, D), _rows(e, D), hn, cum_p.reshape(-1).contiguous(), p,
                                  log_A, log_dt, B, w_halt, b_halt,
                                  norm_w if fused else None, emb if fused else None)
        shape = h.shape
        res = (hn.view(shape), hon.view(shape), cpn.view(shape[:-1]))
        if fused:
            res = res + (x.view(shape),)
        return res

    @staticmethod
    def backward(ctx, g_hn, g_hout, g_cum, g_x=None):
        h2, e2, hn2, cum2, p, log_A, log_dt, B, w_halt, b_halt, norm_w, emb = ctx.saved_tensors
        n, D = e2.shape
        fused = ctx.fused
        g_hn = _grad_like(g_hn, hn2)
        g_hout = _grad_like(g_hout, torch.empty((n, D), dtype=torch.float32, device=e2.device))
        g_cum = _grad_like(g_cum, cum2)
        g_x = _grad_like(g_x, hn2) if fused else None
        dh, de, dout, dcum, sums = _bwd_launch(h2, e2, hn2, cum2, p, log_A, log_dt, B, w_halt,
                                               norm_w, emb, g_hn, g_hout, g_cum, g_x,
                                               ctx.threshold, ctx.eps, True, fused)
        # A = exp(-exp(s)), s = clamp(log_dt + log_A, -20, 20): dA/ds = -A exp(s), clamp passes
        # the gradient where -20 <= s_raw <= 20 (as torch.clamp's backward does).
        s_raw = (log_dt.float() + log_A.float()).reshape(-1)
        s = s_raw.clamp(-20, 20)
        ds = sums[0] * (-torch.exp(-torch.exp(s)) * torch.exp(s))
        ds = torch.where((s_raw >= -20) & (s_raw <= 20), ds, torch.zeros_like(ds))
        shape = ctx.shape
        dout = dout.view(shape)   # one object for out and delta: autograd never adds in place
        grads = (dh.view(shape), de.view(shape), dout, g_hout.view(shape),
                 dcum.view(shape[:-1]),
                 ds.to(log_A.dtype).reshape(log_A.shape),
                 ds.sum().to(log_dt.dtype).reshape(log_dt.shape),
                 sums[1].to(B.dtype).reshape(B.shape),
                 sums[2].to(w_halt.dtype).reshape(w_halt.shape),
                 sums[4, 0].to(b_halt.dtype).reshape(b_halt.shape),
                 sums[3].to(norm_w.dtype).reshape(norm_w.shape) if fused else None,
                 None, None, None, None,
                 dout if ctx.has_delta else None)   # d delta = d out
        return grads


class _LoopInputFn(torch.autograd.Function):
    """Autograd for x = RMSNorm(h + emb + e) * norm_w."""

    @staticmethod
    def forward(ctx, h, e, norm_w, emb, eps):
        D = h.shape[-1]
        *_, x = _fwd_launch(h, e, None, None, None, None, None, None, None, None, norm_w, emb,
                            0.0, eps, False, True, False)
        ctx.eps, ctx.shape = eps, h.shape
        ctx.save_for_backward(_rows(h, D), _rows(e, D), norm_w, emb)
        return x.view(h.shape)

    @staticmethod
    def backward(ctx, g_x):
        h2, e2, norm_w, emb = ctx.saved_tensors
        g_x = _grad_like(g_x, h2)
        dh, _, _, _, sums = _bwd_launch(h2, e2, None, None, None, None, None, None, None, norm_w,
                                        emb, None, None, None, g_x, 0.0, ctx.eps, False, True)
        dh = dh.view(ctx.shape)
        return dh, dh, sums[3].to(norm_w.dtype).reshape(norm_w.shape), None, None


# ---------------------------------------------------------------------------------------------
# Validation and public entry points
# ---------------------------------------------------------------------------------------------

def _check_vec(name: str, t: torch.Tensor, n: int) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != n or not t.is_floating_point():
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating tensor with {n} elements, got {got}")


def _check_rows(h: torch.Tensor, e: torch.Tensor, norm_w: torch.Tensor | None) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.dtype not in _ACT_DTYPES:
        raise ValueError(f"h must be a float32/bfloat16/float16/float64 tensor [..., D], got "
                         f"{getattr(h, 'dtype', type(h).__name__)}")
    if not isinstance(e, torch.Tensor) or e.shape != h.shape or e.dtype != h.dtype:
        raise ValueError(f"e must match h: shape {tuple(h.shape)} dtype {h.dtype}, got "
                         f"{tuple(getattr(e, 'shape', ()))} {getattr(e, 'dtype', None)}")
    if norm_w is not None:
        _check_vec("norm_weight", norm_w, h.shape[-1])


def acc_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """The ACT state's dtype (h_out, cum_p) for activations of ``act_dtype``: fp32, or fp64 for
    fp64 (open-mythos accumulates in the activation dtype; fp64 models then match it exactly)."""
    return torch.float64 if act_dtype == torch.float64 else torch.float32


def _check_step(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold) -> None:
    _check_rows(h, e, None)
    D = h.shape[-1]
    if not isinstance(out, torch.Tensor) or out.shape != h.shape or out.dtype != h.dtype:
        raise ValueError(f"out must match h: shape {tuple(h.shape)} dtype {h.dtype}, got "
                         f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', None)}")
    acc = acc_dtype(h.dtype)
    if not isinstance(h_out, torch.Tensor) or h_out.shape != h.shape or h_out.dtype != acc:
        raise ValueError(f"h_out must be {acc} with shape {tuple(h.shape)}, got "
                         f"{tuple(getattr(h_out, 'shape', ()))} {getattr(h_out, 'dtype', None)}")
    if not isinstance(cum_p, torch.Tensor) or cum_p.shape != h.shape[:-1] or cum_p.dtype != acc:
        raise ValueError(f"cum_p must be {acc} with shape {tuple(h.shape[:-1])}, got "
                         f"{tuple(getattr(cum_p, 'shape', ()))} {getattr(cum_p, 'dtype', None)}")
    _check_vec("log_A", log_A, D)
    _check_vec("log_dt", log_dt, 1)
    _check_vec("B", B, D)
    _check_vec("w_halt", w_halt, D)
    _check_vec("b_halt", b_halt, 1)
    # +inf is a threshold no cum_p reaches: every loop runs (as in open-mythos)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or math.isnan(threshold) or threshold == -math.inf:
        raise ValueError(f"threshold must be a float, not NaN or -inf, got {threshold!r}")
    devs = {t.device for t in (h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt)}
    if len(devs) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")


def _unsupported(D: int, dtype: torch.dtype) -> str | None:
    if dtype not in _KERNEL_DTYPES:
        return f"{dtype} activations have no Triton kernel (the reference serves them)"
    if D > MAX_D:
        return f"D={D} exceeds the kernel's MAX_D={MAX_D} (whole row in registers)"
    return None


def loop_input_triton(h: torch.Tensor, e: torch.Tensor, loop_t: int, norm_weight: torch.Tensor,
                      eps: float, loop_dim: int) -> torch.Tensor:
    """Triton :func:`loop_input` (no dispatch): RMSNorm(h + loop_emb(t) + e) * norm_weight."""
    emb = loop_embedding_vector(loop_t, loop_dim, h.shape[-1], h.dtype, h.device)
    return _LoopInputFn.apply(h, e, norm_weight, emb, float(eps))


def loop_input(h: torch.Tensor, e: torch.Tensor, loop_t: int, norm_weight: torch.Tensor,
               eps: float, loop_dim: int) -> torch.Tensor:
    """x = RMSNorm(loop_index_embedding(h, t) + e). h, e: [B, T, D] -> [B, T, D] (h's dtype).

    Dispatches ("loop_input") to the Triton kernel or :func:`loop_input_reference`.
    """
    _check_rows(h, e, norm_weight)
    impl = choose("loop_input", h, e, norm_weight, supported=_unsupported(h.shape[-1], h.dtype))
    if impl == "triton":
        return loop_input_triton(h, e, loop_t, norm_weight, eps, loop_dim)
    # h's dtype as the kernel writes it (a wider norm weight would promote the reference's)
    return loop_input_reference(h, e, loop_t, norm_weight, eps, loop_dim).to(h.dtype)


def lti_act_step_triton(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold,
                        next_loop=None, delta=None):
    """Triton :func:`lti_act_step` (no dispatch, no validation); same arguments and returns."""
    if next_loop is None:
        return _LTIACTStepFn.apply(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                                   None, None, float(threshold), 0.0, False, delta)
    t_next, norm_w, eps, loop_dim = next_loop
    emb = loop_embedding_vector(t_next, loop_dim, h.shape[-1], h.dtype, h.device)
    return _LTIACTStepFn.apply(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                               norm_w, emb, float(threshold), float(eps), True, delta)


def lti_act_step(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold,
                 next_loop=None, delta=None):
    """One LTI update + ACT accumulation, optionally fused with the next iteration's input.

    Args:
        h, e, out: [B, T, D] (fp32/bf16/fp16, or fp64 on the reference; one dtype) hidden
                   state, injection, block output.
        h_out:     [B, T, D] ACT accumulator; cum_p: [B, T]; both fp32 (fp64 for fp64 h).
        log_A [D], log_dt [1], B [D], w_halt [1, D], b_halt [1]: parameters (any float dtype).
        threshold: ACT threshold.
        next_loop: None, or ``(t_next, norm_weight, eps, loop_dim)`` to also return
                   ``x_next = RMSNorm(h' + loop_emb(t_next) + e) * norm_weight``.
        delta:     None, or the [B, T, D] LoRA delta (h's dtype): the step uses ``out + delta``
                   (rounded to the activation dtype, as ``out = out + lora(out, t)`` is), so the
                   model need not materialize the sum.

    Returns:
        ``(h', h_out', cum_p')`` or ``(h', h_out', cum_p', x_next)``; h', x_next in h's dtype.

    Dispatches ("lti_act_step") to the Triton kernels or the references. Raises ValueError on
    mismatched shapes/dtypes before any compute.
    """
    _check_step(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold)
    if next_loop is not None:
        if len(next_loop) != 4:
            raise ValueError("next_loop must be (t_next, norm_weight, eps, loop_dim)")
        _check_vec("norm_weight", next_loop[1], h.shape[-1])
    if delta is not None and (not isinstance(delta, torch.Tensor) or delta.shape != h.shape
                              or delta.dtype != h.dtype or delta.device != h.device):
        raise ValueError(f"delta must match h: shape {tuple(h.shape)} dtype {h.dtype}, got "
                         f"{tuple(getattr(delta, 'shape', ()))} {getattr(delta, 'dtype', None)}")
    impl = choose("lti_act_step", h, e, out, h_out, cum_p, delta,
                  supported=_unsupported(h.shape[-1], h.dtype))
    if impl == "triton":
        return lti_act_step_triton(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                                   threshold, next_loop, delta)
    if delta is not None:
        out = out + delta
    if next_loop is None:
        res = lti_act_step_reference(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                                     threshold)
    else:
        res = lti_act_step_and_next_input_reference(h, e, out, h_out, cum_p, log_A, log_dt, B,
                                                    w_halt, b_halt, threshold, next_loop)
    # h' and x_next in h's dtype as the kernels write them (wider parameters would promote the
    # reference's); the ACT state keeps its own
    return tuple(t.to(h.dtype) if i in (0, 3) else t for i, t in enumerate(res))


def lti_act_step_and_next_input(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                                threshold, next_loop, delta=None):
    """:func:`lti_act_step` with ``next_loop`` required: returns (h', h_out', cum_p', x_next)."""
    return lti_act_step(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold,
                        next_loop, delta)


def lti_act_step_and_next_input_triton(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                                       threshold, next_loop, delta=None):
    """Triton fused step + next input (no dispatch) for the bench harness."""
    return lti_act_step_triton(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                               threshold, next_loop, delta)
