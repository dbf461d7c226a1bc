"""DeepSeek-style MoE: softmax router with aux-loss-free selection bias, and routed SwiGLU experts.

Routing (per token, open-mythos 0.5.0 ``MoEFFN.forward``)::

    scores = softmax(logits)                         # unbiased
    idx    = topk(logits + router_bias, k)           # the bias only picks experts
    w      = scores[idx] / sum(scores[idx])          # renormalized top-k weights

Routed experts, with weights stacked ``w13 = [E, D, 2F]`` (gate | up) and ``w2 = [E, F, D]``::

    y[n] = sum_j w[n, j] * (silu(x[n] @ Wg[e]) * (x[n] @ Wu[e])) @ Wd[e],   e = idx[n, j]

The reference dispatches by sorting the (token, slot) pairs by expert, so each expert runs one
matmul over its contiguous segment (one host sync for the segment sizes, not one per pair).
The CPU forms (inference, and grouped GEMMs for autograd) live in :mod:`mythos_kernels.cpu.moe`
and register themselves with the dispatch point.

The Triton path (kernels in :mod:`mythos_kernels.moe_kernels`): a fused router kernel, a
deterministic sync-free align (pairs stably sorted by expert, segments padded to the GEMM tile),
a grouped gate|up GEMM with the SwiGLU in its epilogue, a grouped down GEMM with the routing
weight in its epilogue, and a slot-order combine; the backward is four more grouped GEMMs
(dY·Wdᵀ with the SwiGLU backward and d weights in its epilogue, per-expert actᵀ·dY and xᵀ·d[g|u],
d[g|u]·W13ᵀ). Public: :func:`moe_route` / :func:`moe_experts` (dispatching),
:func:`moe_route_triton` / :func:`moe_experts_triton`, :func:`moe_align_triton` (the bench's
byte and FLOP counts live in ``bench/ops_moe.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import _compiling, choose, interpreter_active, pick


def _swiglu(hg: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a gate|up product [..., 2F] (the w13 layout) -> [..., F]."""
    Fh = hg.shape[-1] // 2
    return F.silu(hg[..., :Fh]) * hg[..., Fh:]


def _swiglu_in_place(hg: torch.Tensor) -> torch.Tensor:
    """:func:`_swiglu` (the same values) written over hg's gate half, returned as a strided
    [..., F] view of hg (no new buffer; hg's gate half is overwritten)."""
    Fh = hg.shape[-1] // 2
    return F.silu(hg[..., :Fh], inplace=True).mul_(hg[..., Fh:])


def moe_route_reference(logits: torch.Tensor, router_bias: torch.Tensor, topk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [N, E] (unbiased router output), router_bias: [E] ->
    (weights [N, k] in logits' dtype, idx [N, k] int64). Ties resolved as torch.topk does."""
    scores = F.softmax(logits, dim=-1)
    _, idx = (logits + router_bias).topk(topk, dim=-1)
    w = scores.gather(-1, idx)
    return w / w.sum(dim=-1, keepdim=True), idx


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: idx [N, k] -> int64 [E]."""
    flat = idx.reshape(-1).long()
    # scatter_add, not bincount: bincount reads the max on the host (a sync, no CUDA graphs)
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def moe_experts_reference(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts combined with the routing weights.

    Args:
        x: [N, D] tokens; weights: [N, k]; idx: [N, k] expert ids;
        w13: [E, D, 2F] gate|up; w2: [E, F, D].
    Returns:
        [N, D], the k slots summed in slot order (as open-mythos does).
    """
    N, k = idx.shape
    D = x.shape[-1]
    if N == 0:
        return x.new_zeros(0, D)
    flat = idx.reshape(-1)                                               # [N*k], pair n*k + j
    order = torch.argsort(flat, stable=True)                             # pairs sorted by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()      # the one host sync
    xs = x.index_select(0, order // k)                                   # [Nk, D] sorted rows
    segs = []
    start = 0
    # unbind once: indexing w13[e] per expert would make autograd build a full [E, D, 2F]
    # zero gradient for every expert; unbind's backward stacks the per-expert grads once.
    grads = torch.is_grad_enabled() and (w13.requires_grad or w2.requires_grad)
    w13s, w2s = (w13.unbind(0), w2.unbind(0)) if grads else (w13, w2)
    for e, c in enumerate(counts):
        if c:
            hg = xs[start:start + c] @ w13s[e]                               # [c, 2F]
            segs.append(_swiglu(hg) @ w2s[e])                                    # [c, D]
            start += c
    ys = torch.cat(segs) if len(segs) > 1 else segs[0]
    y = torch.empty_like(ys).index_copy_(0, order, ys).view(N, k, D)     # back to pair order
    y = y * weights.unsqueeze(-1).to(y.dtype)
    out = y[:, 0]
    for j in range(1, k):
        out = out + y[:, j]
    return out


# ============================================================================================
# Triton path: fused router, aligned grouped SwiGLU GEMMs, and their backward
# ============================================================================================

try:  # the kernels need triton; the references above do not
    from . import moe_kernels as _mk
    _mk_error = ""
except Exception as _exc:  # pragma: no cover - depends on the install
    _mk, _mk_error = None, f"{type(_exc).__name__}: {_exc}"

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_EXPERTS = 256  # the router and align kernels hold rows of E experts in registers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_route_inputs(logits: torch.Tensor, router_bias: torch.Tensor, topk: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"moe_route: logits must be [N, E], got shape {tuple(logits.shape)}")
    E = logits.shape[1]
    if router_bias.shape != (E,):
        raise ValueError(f"moe_route: router_bias must be [{E}], got {tuple(router_bias.shape)}")
    if not logits.is_floating_point() or not router_bias.is_floating_point():
        raise ValueError("moe_route: logits and router_bias must be floating point")
    if not (isinstance(topk, int) and 1 <= topk <= E):
        raise ValueError(f"moe_route: topk must be an int in [1, {E}], got {topk!r}")


def _check_expert_inputs(x, weights, idx, w13, w2) -> None:
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be [N, D], got shape {tuple(x.shape)}")
    N, D = x.shape
    if idx.dim() != 2 or idx.shape[0] != N:
        raise ValueError(f"moe_experts: idx must be [{N}, k], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe_experts: idx must be int64 or int32, got {idx.dtype}")
    if weights.shape != idx.shape:
        raise ValueError(f"moe_experts: weights {tuple(weights.shape)} must match idx "
                         f"{tuple(idx.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("moe_experts: w13 must be [E, D, 2F] and w2 [E, F, D]")
    E, F2 = w13.shape[0], w13.shape[2]
    if w13.shape[1] != D or F2 % 2 or w2.shape != (E, F2 // 2, D):
        raise ValueError(f"moe_experts: inconsistent shapes x {tuple(x.shape)}, w13 "
                         f"{tuple(w13.shape)} (want [E, {D}, 2F]), w2 {tuple(w2.shape)} "
                         f"(want [E, F, {D}])")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"moe_experts: x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, "
                         f"{w2.dtype}")
    if not weights.is_floating_point():
        raise ValueError("moe_experts: weights must be floating point")
    if idx.is_cpu and idx.numel() and not _compiling():
        # CPU only: a free host read there (on a GPU it would sync every call); the expert
        # stacks are indexed (and viewed with as_strided) by these ids
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= E:
            raise ValueError(f"moe_experts: expert ids must lie in [0, {E}), got values in "
                             f"[{lo}, {hi}]")


def _unsupported(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> str | None:
    """Why the Triton MoE path cannot take these inputs (a, b: the float inputs), or None."""
    if _mk is None:
        return f"mythos_kernels.moe_kernels failed to import ({_mk_error})"
    if a.dtype not in _FLOAT_DTYPES or b.dtype not in _FLOAT_DTYPES:
        return f"dtype {a.dtype}/{b.dtype} not in fp32/bf16/fp16"
    if n_experts > MAX_EXPERTS:
        return f"n_experts {n_experts} > {MAX_EXPERTS}"
    return None


# ------------------------------------------------------------------------------ routing ----

def _route_launch(logits: torch.Tensor, router_bias: torch.Tensor, topk: int):
    N, E = logits.shape
    logits = logits.contiguous()
    bias = router_bias.contiguous()
    w = torch.empty(N, topk, dtype=logits.dtype, device=logits.device)
    idx = torch.empty(N, topk, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    if N:
        BLOCK_E = max(16, _next_pow2(E))
        BLOCK_T = _mk.route_block_t(BLOCK_E)
        sel_dtype = torch.promote_types(logits.dtype, router_bias.dtype)
        _mk._moe_route_kernel[(_cdiv(N, BLOCK_T),)](
            logits, bias, w, idx, counts, N, E, logits.stride(0),
            TOPK=topk, K_PAD=_next_pow2(topk), BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
            SEL_ROUND={torch.bfloat16: 1, torch.float16: 2}.get(sel_dtype, 0),
            num_warps=4)
    return w, idx, counts


def _route_grad_logits(logits: torch.Tensor, idx: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """d logits through w = s[idx] / sum(s[idx]), s = softmax(logits)."""
    s = torch.softmax(logits.float(), dim=-1)                      # [N, E]
    sk = s.gather(-1, idx)                                         # [N, k]
    S = sk.sum(-1, keepdim=True)
    w = sk / S
    dwf = dw.float()
    g = (dwf - (dwf * w).sum(-1, keepdim=True)) / S                # d s[idx]
    ds = torch.zeros_like(s).scatter_(-1, idx, g)
    dl = s * (ds - (g * sk).sum(-1, keepdim=True))
    return dl.to(logits.dtype)


class _MoERouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, router_bias, topk):
        w, idx, counts = _route_launch(logits, router_bias, topk)
        ctx.save_for_backward(logits, idx)
        ctx.mark_non_differentiable(idx, counts)
        return w, idx, counts

    @staticmethod
    def backward(ctx, dw, _didx, _dcounts):
        logits, idx = ctx.saved_tensors
        dl = _route_grad_logits(logits, idx, dw) if ctx.needs_input_grad[0] else None
        return dl, None, None  # router_bias gets no gradient, as in open-mythos


def moe_route_triton(logits: torch.Tensor, router_bias: torch.Tensor, topk: int,
                     return_counts: bool = False):
    """Fused router kernel: softmax(logits), top-k of logits + router_bias, gather, renormalize.

    logits [N, E], router_bias [E] -> weights [N, k] (logits' dtype), idx [N, k] int64, and with
    ``return_counts`` also counts [E] int32 (pairs per expert). Ties in ``logits + bias`` go to
    the lowest expert id. Differentiable w.r.t. logits (not router_bias).
    """
    _check_route_inputs(logits, router_bias, topk)
    why = _unsupported(logits, router_bias, logits.shape[1])
    if why:
        raise ValueError(f"moe_route_triton: {why}")
    if torch.is_grad_enabled() and logits.requires_grad:
        w, idx, counts = _MoERouteFn.apply(logits, router_bias, topk)
    else:
        w, idx, counts = _route_launch(logits, router_bias, topk)
    return (w, idx, counts) if return_counts else (w, idx)


# -------------------------------------------------------------------------------- align ----

class MoEAlign:
    """Pairs sorted by expert, each expert's segment padded to ``block_m``.

    sorted_ids  [max_blocks*block_m] int32: pair id ``n*k + j`` per slot, ``N*k`` for padding
                (slots past ``n_post`` are never written nor read);
    expert_ids  [max_blocks] int32: the expert of each row tile (-1 past ``n_post``);
    seg         [E+1] int32: padded segment starts, seg[E] = n_post;
    n_post      [1] int32: padded length actually used (stays on the device);
    counts      [E] int32: pairs per expert; nk = N*k.
    """

    def __init__(self, sorted_ids, expert_ids, seg, n_post, counts, block_m, max_blocks, nk):
        self.sorted_ids, self.expert_ids, self.seg = sorted_ids, expert_ids, seg
        self.n_post, self.counts = n_post, counts
        self.block_m, self.max_blocks, self.nk = block_m, max_blocks, nk


def moe_align_triton(idx: torch.Tensor, n_experts: int, block_m: int) -> MoEAlign:
    """Stable counting sort of ``idx`` ([N, k] expert ids) by expert, padded to ``block_m``.

    Three launches (per-chunk histograms, one-program scan, scatter) and no host sync: the
    grid bound ``cdiv(N*k, block_m) + min(E, N*k)`` tiles is known from shapes alone.
    """
    flat = idx.reshape(-1).contiguous()
    NK = flat.numel()
    E = n_experts
    dev = idx.device
    BLOCK_E = max(16, _next_pow2(E))
    CHUNK = _mk.align_chunk(BLOCK_E)
    n_chunks = max(1, _cdiv(NK, CHUNK))
    max_blocks = _cdiv(NK, block_m) + min(E, NK)
    P = max_blocks * block_m
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    seg = torch.empty(E + 1, dtype=torch.int32, device=dev)
    n_post = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    cc = torch.empty(n_chunks, BLOCK_E, dtype=torch.int32, device=dev)
    off = torch.empty(n_chunks, BLOCK_E, dtype=torch.int32, device=dev)
    _mk._moe_count_kernel[(n_chunks,)](flat, cc, NK, E, CHUNK=CHUNK, BLOCK_E=BLOCK_E,
                                       num_warps=4)
    blk = _mk.scan_block(BLOCK_E)
    _mk._moe_scan_kernel[(1,)](cc, off, counts, seg, expert_ids, n_post, sorted_ids,
                               n_chunks, E, NK, max_blocks, BLOCK_M=block_m, BLOCK_E=BLOCK_E,
                               BLOCK_C=blk, BLOCK_B=blk, num_warps=_mk.SCAN_WARPS)
    _mk._moe_scatter_kernel[(n_chunks,)](flat, off, seg, sorted_ids, NK, E, CHUNK=CHUNK,
                                         BLOCK_E=BLOCK_E, num_warps=4)
    return MoEAlign(sorted_ids, expert_ids, seg, n_post, counts, block_m, max_blocks, NK)


def moe_align_reference(idx: torch.Tensor, n_experts: int, block_m: int):
    """Plain-torch version of :func:`moe_align_triton` (host loop; for tests):
    (sorted_ids up to n_post, expert_ids up to n_post/block_m, seg [E+1], counts [E])."""
    flat = idx.reshape(-1)
    NK = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    ids, eids, seg, start = [], [], [0], 0
    for e in range(n_experts):
        c = int(counts[e])
        p = _cdiv(c, block_m) * block_m
        ids.append(order[start:start + c])
        ids.append(torch.full((p - c,), NK, dtype=order.dtype, device=idx.device))
        eids += [e] * (p // block_m)
        seg.append(seg[-1] + p)
        start += c
    dev = idx.device
    return (torch.cat(ids).to(torch.int32), torch.tensor(eids, dtype=torch.int32, device=dev),
            torch.tensor(seg, dtype=torch.int32, device=dev), counts.to(torch.int32))


# ------------------------------------------------------------------------ grouped GEMMs ----

def _dot_f32(t: torch.Tensor) -> bool:
    """Upcast tl.dot operands to fp32: only under the interpreter, whose 16-bit dot is wrong."""
    return interpreter_active() and t.device.type == "cpu" and t.dtype != torch.float32


def _aligned(*ts: torch.Tensor) -> bool:
    """16-byte aligned base pointers and every non-unit stride a multiple of 16 elements."""
    for t in ts:
        if t.data_ptr() % 16 or any(st % 16 for st in t.stride() if st != 1):
            return False
    return True


def _gemm(mode: str, al: MoEAlign, A, B, C, N: int, K: int, topk: int, *, fast: bool,
          b_trans: bool = False, gather: bool, scale: bool = False, out_pair: bool = False,
          aux=None, dw=None, rw=None, block_m: int | None = None):
    """One grouped GEMM over every aligned row tile (all experts, one launch).

    B is the stacked weight [E, K, N] (or [E, N, K] read transposed with ``b_trans``)."""
    BM, BN, BK, GM, nw, ns = _mk.gemm_config(mode, al.nk, B.shape[0], fast=fast,
                                             align_m=al.block_m, block_m=block_m)
    ratio = al.block_m // BM
    epi = {"plain": 0, "swiglu": 1, "swiglu_bwd": 2}[mode]
    tiles = al.max_blocks * ratio
    aligned = fast and _aligned(A, B, C, *(t for t in (aux,) if t is not None)) and N % 16 == 0
    grid = (tiles * _cdiv(N, BN),)
    _mk._moe_gemm_kernel[grid](
        A, A.stride(0), B, B.stride(0), B.stride(1),
        C, C.stride(0),
        aux if aux is not None else C, aux.stride(0) if aux is not None else 0,
        dw if dw is not None else C, dw.stride(0) if dw is not None else 0,
        rw if rw is not None else C, al.sorted_ids, al.expert_ids, al.n_post,
        al.nk, N, K, tiles,
        TOPK=topk, A_GATHER=gather, EPI=epi, SCALE=scale, OUT_PAIR=out_pair,
        STORE_AUX=aux is not None and epi == 1, B_TRANS=b_trans, ALIGNED=aligned,
        EVEN_K=K % BK == 0, EVEN_N=N % BN == 0, ALIGN_RATIO=ratio,
        PREC="ieee" if A.dtype == torch.float32 else "tf32",
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, DOT_F32=_dot_f32(A),
        num_warps=nw, num_stages=ns)


def _wgrad(al: MoEAlign, A, B, C, MA: int, NB: int, topk: int, *, fast: bool, a_gather: bool,
           b_gather: bool, rw=None):
    """Per-expert weight gradient C[e] = A[rows of e]^T B[rows of e] (B scaled by rw)."""
    E = C.shape[0]
    BM, BN, BK, nw, ns = _mk.wgrad_config(al.nk, E, fast)
    aligned = fast and _aligned(A, B, C) and MA % BM == 0 and NB % BN == 0
    grid = (_cdiv(MA, BM) * _cdiv(NB, BN), E)
    _mk._moe_wgrad_kernel[grid](
        A, A.stride(0), B, B.stride(0), C, rw if rw is not None else C, al.sorted_ids, al.seg,
        al.nk, MA, NB, TOPK=topk, A_GATHER=a_gather, B_GATHER=b_gather, B_SCALE=rw is not None,
        ALIGNED=aligned, PREC="ieee" if A.dtype == torch.float32 else "tf32",
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_F32=_dot_f32(A), num_warps=nw, num_stages=ns)


def _combine(y: torch.Tensor, N: int, topk: int) -> torch.Tensor:
    """out[n] = sum_j y[n*k + j], slot order, fp32 accumulation."""
    D = y.shape[1]
    out = torch.empty(N, D, dtype=y.dtype, device=y.device)
    BLOCK_D = min(1024, max(16, _next_pow2(D)))
    _mk._moe_combine_kernel[(N, _cdiv(D, BLOCK_D))](y, out, D, TOPK=topk, BLOCK_D=BLOCK_D,
                                                   num_warps=4)
    return out


def _experts_forward(x, weights, idx, w13, w2, block_m, train: bool):
    """The forward launches; returns (out, saved state for the backward or None)."""
    N, D = x.shape
    k = idx.shape[1]
    E, Fh = w2.shape[0], w2.shape[1]
    NK = N * k
    x, rw = x.contiguous(), weights.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    # large tiles need 16-bit inputs and 16-byte aligned rows (D, F multiples of 16)
    fast = x.dtype != torch.float32 and D % 16 == 0 and Fh % 16 == 0
    BM = _mk.gemm_config("swiglu", NK, E, fast=fast, block_m=block_m)[0]
    al = moe_align_triton(idx, E, BM)
    P = al.max_blocks * BM
    act = torch.empty(P, Fh, dtype=x.dtype, device=x.device)                      # [P, F]
    gu = torch.empty(P, 2 * Fh, dtype=x.dtype, device=x.device) if train else None  # [P, 2F]
    _gemm("swiglu", al, x, w13, act, Fh, D, k, fast=fast, gather=True, aux=gu, block_m=block_m)
    y = torch.empty(NK, D, dtype=x.dtype, device=x.device)                        # [N*k, D]
    _gemm("plain", al, act, w2, y, D, Fh, k, fast=fast, gather=False, scale=True,
          out_pair=True, rw=rw)
    out = _combine(y, N, k)
    if not train:
        return out, None
    return out, ((x, rw, w13, w2, act, gu, al.sorted_ids, al.expert_ids, al.seg, al.n_post,
                  al.counts), (BM, al.max_blocks, NK, k, weights.dtype, fast))


class _MoEExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, idx, w13, w2, block_m):
        out, (saved, meta) = _experts_forward(x, weights, idx, w13, w2, block_m, train=True)
        ctx.save_for_backward(*saved)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, dout):
        x, rw, w13, w2, act, gu, sid, eid, seg, n_post, counts = ctx.saved_tensors
        BM, max_blocks, NK, k, wdtype, fast = ctx.meta
        al = MoEAlign(sid, eid, seg, n_post, counts, BM, max_blocks, NK)
        N, D = x.shape
        E, Fh = w2.shape[0], w2.shape[1]
        dout = dout.contiguous()
        need_x, need_w, _, need_13, need_2 = ctx.needs_input_grad[:5]
        P = max_blocks * BM
        BNb = _mk.gemm_config("swiglu_bwd", NK, E, fast=fast, align_m=BM)[1]
        dgu = torch.empty(P, 2 * Fh, dtype=x.dtype, device=x.device)              # [P, 2F]
        dwp = torch.empty(NK, _cdiv(Fh, BNb), dtype=torch.float32, device=x.device)
        # h = dY[t] Wd^T (w2 read transposed); epilogue: d weights partials, d gate | d up
        _gemm("swiglu_bwd", al, dout, w2, dgu, Fh, D, k, fast=fast, b_trans=True, gather=True,
              aux=gu, dw=dwp, rw=rw)
        dweights = dwp.sum(1).view(N, k).to(wdtype) if need_w else None
        dw2 = dw13 = dx = None
        if need_2:     # dWd[e] = act[e]^T (w * dY[t])
            dw2 = torch.empty_like(w2)
            _wgrad(al, act, dout, dw2, Fh, D, k, fast=fast, a_gather=False, b_gather=True,
                   rw=rw)
        if need_13:    # dW13[e] = x[t]^T [d gate | d up]
            dw13 = torch.empty_like(w13)
            _wgrad(al, x, dgu, dw13, D, 2 * Fh, k, fast=fast, a_gather=True, b_gather=False)
        if need_x:     # dx[n] = sum_j [d gate | d up] W13[e]^T
            dxp = torch.empty(NK, D, dtype=x.dtype, device=x.device)
            _gemm("plain", al, dgu, w13, dxp, D, 2 * Fh, k, fast=fast, b_trans=True,
                  gather=False, out_pair=True)
            dx = _combine(dxp, N, k)
        return dx, dweights, None, dw13, dw2, None


def moe_experts_triton(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, block_m: int | None = None
                       ) -> torch.Tensor:
    """Routed SwiGLU experts on the grouped-GEMM kernels (same contract as the reference).

    x [N, D], weights [N, k], idx [N, k], w13 [E, D, 2F] (gate|up), w2 [E, F, D] -> [N, D]::

        out[n] = sum_j w[n, j] * (silu(x[n] Wg[e]) * (x[n] Wu[e])) Wd[e],  e = idx[n, j]

    Launches: align (3), gate|up GEMM with SwiGLU epilogue (1), down GEMM with the routing
    weight in its epilogue (1), slot-order combine (1); no float atomics, no host sync.
    Differentiable w.r.t. x, weights, w13, w2. ``block_m`` forces the row tile (tests).
    Expert ids must lie in [0, E) (not checked: that would need a host sync).
    """
    _check_expert_inputs(x, weights, idx, w13, w2)
    why = _unsupported(x, weights, w13.shape[0])
    if why:
        raise ValueError(f"moe_experts_triton: {why}")
    if x.shape[0] == 0:
        return x.new_zeros(0, x.shape[1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w13, w2)):
        return _MoEExpertsFn.apply(x, weights, idx, w13, w2, block_m)
    return _experts_forward(x, weights, idx, w13, w2, block_m, train=False)[0]


# ------------------------------------------------------------------- dispatch entry points ----

def moe_route(logits: torch.Tensor, router_bias: torch.Tensor, topk: int):
    """Route tokens: logits [N, E], router_bias [E] -> (weights [N, k], idx [N, k] int64).

    Triton: :func:`moe_route_triton` (ties to the lowest expert id); reference:
    :func:`moe_route_reference` (torch.topk).
    """
    _check_route_inputs(logits, router_bias, topk)
    impl = choose("moe_route", logits, router_bias,
                  supported=_unsupported(logits, router_bias, logits.shape[1]))
    if impl == "triton":
        if _compiling() and not _needs_grad(logits):
            return torch.ops.mythos.moe_route(logits, router_bias, int(topk))
        return moe_route_triton(logits, router_bias, topk)
    return moe_route_reference(logits, router_bias, topk)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts, see :func:`moe_experts_reference`: the Triton kernels
    (:func:`moe_experts_triton`), a registered CPU form (:mod:`mythos_kernels.cpu.moe`) or the
    reference, as the dispatch point picks."""
    _check_expert_inputs(x, weights, idx, w13, w2)
    args = (x, weights, idx, w13, w2)
    impl, form = pick("moe_experts", x, weights, idx, w13, w2,
                      supported=_unsupported(x, weights, w13.shape[0]), cpu_args=args)
    if impl == "triton":
        if _compiling() and not _needs_grad(x, weights, w13, w2):
            return torch.ops.mythos.moe_experts(x, weights, idx, w13, w2)
        return moe_experts_triton(x, weights, idx, w13, w2)
    if impl == "cpu":
        return form(*args)
    if _gather_under_compile(x, weights, idx, w13, w2):
        return moe_experts_gathered(x, weights, idx, w13, w2)
    return moe_experts_reference(x, weights, idx, w13, w2)


def _gather_under_compile(x, weights, idx, w13, w2) -> bool:
    """Tracing under torch.compile without autograd, with no more (token, slot) pairs than
    experts (decode): :func:`moe_experts_gathered` instead of the reference, whose host read of
    the expert counts would break the graph."""
    return (_compiling() and not _needs_grad(x, weights, w13, w2)
            and 0 < idx.numel() <= w13.shape[0])


def moe_experts_gathered(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                         w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`moe_experts_reference` with no host read (traceable, e.g. a compiled decode
    step): every (token, slot) pair's expert weights gathered, one batched product per
    projection, the slots weighted and summed. Reads and copies N*k experts' weights, so it
    serves only while that is at most the whole stack (``N * k <= E``, see
    :func:`moe_experts`). x [N, D], weights/idx [N, k] -> [N, D]."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    hg = torch.bmm(x.repeat_interleave(k, dim=0).unsqueeze(1),
                   w13.index_select(0, flat))                                  # [N*k, 1, 2F]
    a = _swiglu(hg)
    y = torch.bmm(a, w2.index_select(0, flat)).view(N, k, -1)                   # [N, k, D]
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)


# Inference under torch.compile: the Triton paths as opaque torch.library ops (fake impls give
# the output shapes for tracing), so a compiled decode step has no graph break here. With
# gradients the autograd.Function paths run (a graph break under compile).

def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


@torch.library.custom_op("mythos::moe_route", mutates_args=())
def _moe_route_op(logits: torch.Tensor, router_bias: torch.Tensor,
                  topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, idx = moe_route_triton(logits, router_bias, topk)
    return w, idx.to(torch.int64)


@_moe_route_op.register_fake
def _(logits, router_bias, topk):
    N = logits.shape[0]
    return logits.new_empty(N, topk), logits.new_empty(N, topk, dtype=torch.int64)


@torch.library.custom_op("mythos::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    return moe_experts_triton(x, weights, idx, w13, w2)


@_moe_experts_op.register_fake
def _(x, weights, idx, w13, w2):
    return x.new_empty(x.shape[0], w2.shape[-1])
