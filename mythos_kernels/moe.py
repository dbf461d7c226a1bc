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

The Triton path (kernels inline, below the references): a fused router kernel, a
deterministic sync-free align (pairs stably sorted by expert, segments padded to the GEMM tile),
a grouped gate|up GEMM with the SwiGLU in its epilogue, a grouped down GEMM with the routing
weight in its epilogue, and a slot-order combine; the backward is four more grouped GEMMs
(dY·Wdᵀ with the SwiGLU backward and d weights in its epilogue, per-expert actᵀ·dY and xᵀ·d[g|u],
d[g|u]·W13ᵀ). Public: :func:`moe_route` / :func:`moe_experts` (dispatching),
:func:`moe_route_triton` / :func:`moe_experts_triton`, :func:`moe_align_triton` (the bench's
byte and FLOP counts live in ``bench/ops_moe.py``).

Pipeline for ``N`` tokens, ``k`` slots each, ``E`` experts (pair ``p = n*k + j``)::

    route    logits [N, E] -> w [N, k], idx [N, k], counts [E]     1 launch (softmax/top-k/renorm)
    align    idx -> sorted_ids [P], expert_ids [P/BM], seg [E+1]   3 launches (count, scan, scatter)
    gemm1    act[P, F] = silu(x[t(p)] Wg[e]) * (x[t(p)] Wu[e])       1 launch over all experts
    gemm2    y[p] = w[p] * act Wd[e]          (stored per pair)      1 launch over all experts
    combine  out[n] = sum_j y[n*k + j]        (slot order, no atomics)

Backward (same alignment, all deterministic)::

    gemm     h = dY[t(p)] Wd[e]^T; dw[p] = <h, act>; d[g|u] = SwiGLU'(g, u) * w[p] h
    wgrad    dWd[e]  = act[e]^T (w dY[t])          dW13[e] = x[t]^T d[g|u][e]
    gemm     dx pairs = d[g|u] W13[e]^T            combine  dx[n] = sum_j dx pairs

Align (vLLM ``moe_align_block_size`` layout, made deterministic and sync-free): the pairs are
stably sorted by expert (a counting sort: per-chunk histograms, a scan, a scatter with in-chunk
ranks) and each expert's segment is padded to the GEMM's ``BLOCK_M`` with the sentinel ``N*k``.
Every GEMM row tile then belongs to one expert, so the tile loop is a plain dense GEMM with
gathered A rows. The padded length is bounded on the host by ``cdiv(N*k, BM) + min(E, N*k)``
blocks, so the grid is fixed without reading expert counts back; tiles past the real padded
length exit at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import _compiling, choose, interpreter_active, pick
from ._registry import KernelConfig, register_kernel

try:
    import triton
    import triton.language as tl
    _triton_error = ""
except Exception as _exc:  # pragma: no cover - depends on the install
    triton = tl = None
    _triton_error = f"{type(_exc).__name__}: {_exc}"


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


def moe_experts_gathered(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                         w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`moe_experts_reference` with no host read (traceable, e.g. a compiled decode
    step): every (token, slot) pair's expert weights gathered, one batched product per
    projection, the slots weighted and summed. Reads and copies N*k experts' weights, so it
    serves only while that is at most the whole stack (``N * k <= E``, see
    :func:`moe_experts`). A reference-like form, device-agnostic plain torch (not a CPU form),
    so it sits with the references; :func:`moe_experts` takes it while tracing decode.
    x [N, D], weights/idx [N, k] -> [N, D]."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    hg = torch.bmm(x.repeat_interleave(k, dim=0).unsqueeze(1),
                   w13.index_select(0, flat))                                  # [N*k, 1, 2F]
    a = _swiglu(hg)
    y = torch.bmm(a, w2.index_select(0, flat)).view(N, k, -1)                   # [N, k, D]
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)


# ============================================================================================
# Triton path: fused router, aligned grouped SwiGLU GEMMs, and their backward
# ============================================================================================

if triton is not None:

    # --------------------------------------------------------------------------------------------
    # Routing: softmax (unbiased) + top-k on logits + bias + gather + renormalize + expert counts
    # --------------------------------------------------------------------------------------------


    @triton.jit
    def _moe_route_kernel(L_ptr, B_ptr, W_ptr, I_ptr, CNT_ptr, N, E, stride_l,
                          TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_E: tl.constexpr, SEL_ROUND: tl.constexpr):
        """One program per BLOCK_T tokens. Ties in ``logits + bias`` go to the lowest expert id."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < N
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        l_ptrs = L_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
        lraw = tl.load(l_ptrs, mask=m2, other=0.0)
        logit = lraw.to(tl.float32)
        logit = tl.where(cmask[None, :], logit, float("-inf"))
        bias = tl.load(B_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        # softmax over the unbiased logits
        mx = tl.max(logit, axis=1)
        p = tl.exp(logit - mx[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        # selection scores, rounded to the dtype torch would add them in
        sel = logit + bias[None, :]
        if SEL_ROUND == 1:  # bf16, round to nearest even by hand (the interpreter truncates)
            u = sel.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            sel = u.to(tl.float32, bitcast=True)
        elif SEL_ROUND == 2:
            sel = sel.to(tl.float16).to(tl.float32)
        sel = tl.where(cmask[None, :], sel, float("-inf"))
        kcols = tl.arange(0, K_PAD)
        ks = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        ws = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        for j in tl.static_range(TOPK):
            best = tl.max(sel, axis=1)
            cand = tl.where(sel == best[:, None], cols[None, :], BLOCK_E)
            ij = tl.min(cand, axis=1)
            hit = cols[None, :] == ij[:, None]
            wj = tl.sum(tl.where(hit, p, 0.0), axis=1)
            ks = tl.where(kcols[None, :] == j, ij[:, None], ks)
            ws = tl.where(kcols[None, :] == j, wj[:, None], ws)
            chosen += hit.to(tl.int32)
            sel = tl.where(hit, float("-inf"), sel)
        ws = ws / tl.sum(ws, axis=1)[:, None]
        kmask = rmask[:, None] & (kcols[None, :] < TOPK)
        o_off = rows.to(tl.int64)[:, None] * TOPK + kcols[None, :]
        tl.store(W_ptr + o_off, ws.to(W_ptr.dtype.element_ty), mask=kmask)
        tl.store(I_ptr + o_off, ks.to(tl.int64), mask=kmask)
        cnt = tl.sum(tl.where(rmask[:, None], chosen, 0), axis=0)
        tl.atomic_add(CNT_ptr + cols, cnt, mask=cmask)  # integer atomics: deterministic


    # --------------------------------------------------------------------------------------------
    # Align: stable counting sort of the (token, slot) pairs by expert, segments padded to BLOCK_M
    # --------------------------------------------------------------------------------------------


    @triton.jit
    def _moe_count_kernel(I_ptr, CC_ptr, NK, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
        """Histogram of expert ids for pairs [pid*CHUNK, (pid+1)*CHUNK) -> CC[pid, :]."""
        pid = tl.program_id(0)
        offs = pid * CHUNK + tl.arange(0, CHUNK)
        e = tl.load(I_ptr + offs, mask=offs < NK, other=-1).to(tl.int32)
        cols = tl.arange(0, BLOCK_E)
        oh = ((e[:, None] == cols[None, :]) & (cols[None, :] < E)).to(tl.int32)
        tl.store(CC_ptr + pid * BLOCK_E + cols, tl.sum(oh, axis=0))


    @triton.jit
    def _moe_scan_kernel(CC_ptr, OFF_ptr, CNT_ptr, SEG_ptr, EID_ptr, NPOST_ptr, SID_ptr,
                         n_chunks, E, NK, max_blocks,
                         BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_B: tl.constexpr):
        """Single program: per-chunk exclusive offsets, expert counts, padded segment starts, the
        expert of every BLOCK_M tile, and the sentinel NK in every padding slot."""
        cols = tl.arange(0, BLOCK_E)
        cm = cols < E
        running = tl.zeros([BLOCK_E], dtype=tl.int32)
        for c0 in range(0, n_chunks, BLOCK_C):
            crow = c0 + tl.arange(0, BLOCK_C)
            rm = crow < n_chunks
            ptrs = crow[:, None] * BLOCK_E + cols[None, :]
            cc = tl.load(CC_ptr + ptrs, mask=rm[:, None], other=0)
            incl = tl.cumsum(cc, axis=0)
            tl.store(OFF_ptr + ptrs, incl - cc + running[None, :], mask=rm[:, None])
            running += tl.sum(cc, axis=0)
        counts = running
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        total = tl.sum(padded, axis=0)
        tl.store(CNT_ptr + cols, counts, mask=cm)
        tl.store(SEG_ptr + cols, starts, mask=cm)
        tl.store(SEG_ptr + E, total)
        tl.store(NPOST_ptr, total)
        for b0 in range(0, max_blocks, BLOCK_B):
            blk = b0 + tl.arange(0, BLOCK_B)
            pos = blk * BLOCK_M
            eid = tl.sum(((ends[None, :] <= pos[:, None]) & cm[None, :]).to(tl.int32), axis=1)
            eid = tl.where(pos < total, eid, -1)
            tl.store(EID_ptr + blk, eid, mask=blk < max_blocks)
        npad = padded - counts
        for j0 in tl.static_range(0, BLOCK_M, 16):
            j = j0 + tl.arange(0, 16)
            pad_pos = (starts + counts)[:, None] + j[None, :]
            pad_mask = cm[:, None] & (j[None, :] < npad[:, None])
            tl.store(SID_ptr + pad_pos, tl.zeros([BLOCK_E, 16], dtype=tl.int32) + NK, mask=pad_mask)


    @triton.jit
    def _moe_scatter_kernel(I_ptr, OFF_ptr, SEG_ptr, SID_ptr, NK, E,
                            CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
        """sorted_ids[seg[e] + off[chunk, e] + rank in chunk] = pair (stable order)."""
        pid = tl.program_id(0)
        offs = pid * CHUNK + tl.arange(0, CHUNK)
        valid = offs < NK
        e = tl.load(I_ptr + offs, mask=valid, other=-1).to(tl.int32)
        cols = tl.arange(0, BLOCK_E)
        cm = cols < E
        oh = ((e[:, None] == cols[None, :]) & cm[None, :]).to(tl.int32)
        rank = tl.sum((tl.cumsum(oh, axis=0) - oh) * oh, axis=1)
        base = tl.load(OFF_ptr + pid * BLOCK_E + cols) + tl.load(SEG_ptr + cols, mask=cm, other=0)
        pos = tl.sum(oh * base[None, :], axis=1) + rank
        tl.store(SID_ptr + pos, offs, mask=valid & (e >= 0) & (e < E))


    # --------------------------------------------------------------------------------------------
    # Grouped GEMM over expert-aligned row tiles, three epilogues
    # --------------------------------------------------------------------------------------------

    EPI_PLAIN, EPI_SWIGLU, EPI_SWIGLU_BWD = 0, 1, 2


    @triton.jit
    def _moe_gemm_kernel(A_ptr, stride_am, B_ptr, stride_be, stride_br,
                         C_ptr, stride_cm, AUX_ptr, stride_xm, DW_ptr, stride_dwm,
                         RW_ptr, SID_ptr, EID_ptr, NPOST_ptr,
                         NK, N, K, max_blocks,
                         TOPK: tl.constexpr, A_GATHER: tl.constexpr, EPI: tl.constexpr,
                         SCALE: tl.constexpr, OUT_PAIR: tl.constexpr, STORE_AUX: tl.constexpr,
                         B_TRANS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr,
                         EVEN_N: tl.constexpr, ALIGN_RATIO: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, DOT_F32: tl.constexpr = False):
        """C[tile] = A[rows] @ B[expert(tile)] with row tiles from the aligned (sorted, padded) pairs.

        B[e] is [K, N] row-major with row stride ``stride_br`` or, with B_TRANS, [N, K] row-major
        (read transposed). A and C rows are contiguous. ALIGNED: the launcher checked that every
        base pointer is 16-byte aligned and every row stride and N are multiples of 16 elements;
        EVEN_K / EVEN_N: K % BLOCK_K == 0 / N % BLOCK_N == 0 (no masks on those dims).
        ALIGN_RATIO: the align step padded segments to ALIGN_RATIO * BLOCK_M rows, so a tile's
        expert is ``EID[pid_m // ALIGN_RATIO]``; ``max_blocks`` counts BLOCK_M tiles.

        A rows: ``A[pair // TOPK]`` (A_GATHER, token rows) or ``A[padded position]``.
        EPI_PLAIN:      C = acc (* routing weight if SCALE); rows at pair (OUT_PAIR) or position.
        EPI_SWIGLU:     gate = A B[:, n], up = A B[:, N + n]; C = silu(gate) * up; AUX = gate|up.
        EPI_SWIGLU_BWD: h = acc = dY B^T; AUX holds gate|up; DW[pair, pid_n] = sum_n h * act;
                        C[:, n] = d gate, C[:, N + n] = d up, with d act = w * h.
        """
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_in_group = GROUP_M * num_pid_n
        group_id = pid // num_in_group
        first_m = group_id * GROUP_M
        gsz = tl.minimum(max_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % num_in_group) % gsz
        pid_n = (pid % num_in_group) // gsz
        npost = tl.load(NPOST_ptr)
        if pid_m * BLOCK_M >= npost:
            return
        e = tl.load(EID_ptr + pid_m // ALIGN_RATIO).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SID_ptr + offs_m)
        valid = pair < NK
        if A_GATHER:
            arow = (pair // TOPK).to(tl.int64)
        else:
            arow = offs_m.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        a_ptrs = A_ptr + arow[:, None] * stride_am + offs_k[None, :]
        b_base = B_ptr + e * stride_be
        if B_TRANS:
            b_ptrs = b_base + offs_n[None, :].to(tl.int64) * stride_br + offs_k[:, None]
        else:
            b_ptrs = b_base + offs_k[:, None].to(tl.int64) * stride_br + offs_n[None, :]
        if ALIGNED:  # what Triton's own specialization would prove for 16-byte aligned inputs
            a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [1, 16]), [1, BLOCK_K])
            if B_TRANS:
                b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 1]), [BLOCK_K, 1])
            else:
                b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [1, 16]), [1, BLOCK_N])
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
                if EVEN_N:
                    b = tl.load(b_ptrs)
                else:
                    b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
            else:
                kmask = offs_k < K - k0
                a = tl.load(a_ptrs, mask=valid[:, None] & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong (Triton 3.6)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            if EPI == 1:
                tl.static_assert(not B_TRANS)
                if EVEN_K and EVEN_N:
                    b2 = tl.load(b_ptrs + N)
                elif EVEN_K:
                    b2 = tl.load(b_ptrs + N, mask=nmask[None, :], other=0.0)
                else:
                    b2 = tl.load(b_ptrs + N, mask=kmask[:, None] & nmask[None, :], other=0.0)
                if DOT_F32:
                    b2 = b2.to(tl.float32)
                acc2 = tl.dot(a, b2, acc2, input_precision=PREC)
            a_ptrs += BLOCK_K
            if B_TRANS:
                b_ptrs += BLOCK_K
            else:
                b_ptrs += BLOCK_K * stride_br
        pos = offs_m.to(tl.int64)
        if OUT_PAIR:
            crow = pair.to(tl.int64)
            cmask = valid[:, None] & nmask[None, :]
        else:
            crow = pos
            cmask = nmask[None, :] & (offs_m[:, None] >= 0)
        c_ptrs = C_ptr + crow[:, None] * stride_cm + offs_n[None, :]
        if ALIGNED:
            c_ptrs = tl.max_contiguous(tl.multiple_of(c_ptrs, [1, 16]), [1, BLOCK_N])
        if EPI == 0:
            out = acc
            if SCALE:
                rw = tl.load(RW_ptr + pair, mask=valid, other=0.0).to(tl.float32)
                out = out * rw[:, None]
            tl.store(c_ptrs, out.to(C_ptr.dtype.element_ty), mask=cmask)
        elif EPI == 1:
            act = acc * tl.sigmoid(acc) * acc2
            tl.store(c_ptrs, act.to(C_ptr.dtype.element_ty), mask=cmask)
            if STORE_AUX:
                x_ptrs = AUX_ptr + pos[:, None] * stride_xm + offs_n[None, :]
                tl.store(x_ptrs, acc.to(AUX_ptr.dtype.element_ty), mask=cmask)
                tl.store(x_ptrs + N, acc2.to(AUX_ptr.dtype.element_ty), mask=cmask)
        else:
            lmask = valid[:, None] & nmask[None, :]
            x_ptrs = AUX_ptr + pos[:, None] * stride_xm + offs_n[None, :]
            g = tl.load(x_ptrs, mask=lmask, other=0.0).to(tl.float32)
            u = tl.load(x_ptrs + N, mask=lmask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            silu = g * sig
            act = (silu * u).to(AUX_ptr.dtype.element_ty).to(tl.float32)  # as stored in forward
            dwp = tl.sum(acc * act, axis=1)
            tl.store(DW_ptr + pair.to(tl.int64) * stride_dwm + pid_n, dwp, mask=valid)
            rw = tl.load(RW_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            dact = acc * rw[:, None]
            dg = dact * u * sig * (1.0 + g * (1.0 - sig))
            du = dact * silu
            tl.store(c_ptrs, dg.to(C_ptr.dtype.element_ty), mask=cmask)
            tl.store(c_ptrs + N, du.to(C_ptr.dtype.element_ty), mask=cmask)


    @triton.jit
    def _moe_wgrad_kernel(A_ptr, stride_am, B_ptr, stride_bm, C_ptr, RW_ptr, SID_ptr, SEG_ptr,
                          NK, MA, NB,
                          TOPK: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
                          B_SCALE: tl.constexpr, ALIGNED: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_F32: tl.constexpr = False):
        """Per-expert weight gradient C[e] = A[rows of e]^T @ (B[rows of e] (* w)), [MA, NB].

        Rows are the expert's aligned segment; gathered operands read token ``pair // TOPK``.
        An expert without tokens gets zeros.
        """
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_pid_n = tl.cdiv(NB, BLOCK_N)
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n
        start = tl.load(SEG_ptr + e)
        end = tl.load(SEG_ptr + e + 1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = offs_m < MA
        nmask = offs_n < NB
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(start, end, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            pair = tl.load(SID_ptr + rows, mask=rows < end, other=NK)
            valid = pair < NK
            tok = (pair // TOPK).to(tl.int64)
            if A_GATHER:
                arow = tok
            else:
                arow = rows.to(tl.int64)
            if B_GATHER:
                brow = tok
            else:
                brow = rows.to(tl.int64)
            at_ptrs = A_ptr + arow[None, :] * stride_am + offs_m[:, None]
            b_ptrs = B_ptr + brow[:, None] * stride_bm + offs_n[None, :]
            if ALIGNED:  # 16-byte aligned rows and MA, NB multiples of the tiles: no feature masks
                at_ptrs = tl.max_contiguous(tl.multiple_of(at_ptrs, [16, 1]), [BLOCK_M, 1])
                b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [1, 16]), [1, BLOCK_N])
                at = tl.load(at_ptrs, mask=valid[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=valid[:, None], other=0.0)
            else:
                at = tl.load(at_ptrs, mask=valid[None, :] & mmask[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=valid[:, None] & nmask[None, :], other=0.0)
            if B_SCALE:
                rw = tl.load(RW_ptr + pair, mask=valid, other=0.0).to(tl.float32)
                b = (b.to(tl.float32) * rw[:, None]).to(B_ptr.dtype.element_ty)
            if DOT_F32:  # interpreter only, see _moe_gemm_kernel
                at = at.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(at, b, acc, input_precision=PREC)
        c_ptrs = C_ptr + e.to(tl.int64) * MA * NB + offs_m[:, None] * NB + offs_n[None, :]
        if ALIGNED:
            c_ptrs = tl.max_contiguous(tl.multiple_of(c_ptrs, [1, 16]), [1, BLOCK_N])
            tl.store(c_ptrs, acc.to(C_ptr.dtype.element_ty))
        else:
            tl.store(c_ptrs, acc.to(C_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


    @triton.jit
    def _moe_combine_kernel(Y_ptr, O_ptr, D, TOPK: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[n] = sum_j Y[n*TOPK + j] in slot order, fp32 accumulation (deterministic)."""
        n = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = offs < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            acc += tl.load(Y_ptr + (n * TOPK + j) * D + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(O_ptr + n * D + offs, acc.to(O_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# Shipped launch configurations
# --------------------------------------------------------------------------------------------

# (max average pairs per expert, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
# Small decode batches take BLOCK_M=16 (one mma tile: the weight stream dominates); large
# prefill/training batches take 128-row tiles (wgmma on sm_90). SwiGLU keeps two accumulators,
# so its BLOCK_N is half of the plain GEMM's; the SwiGLU-backward epilogue (gate, up, d gate,
# d up live at once) stops at 64-row tiles over 8 warps -- a 128-padded segment is also
# 64-padded, so it runs on the forward's alignment (ALIGN_RATIO=2). All rows compile without
# spills for sm_90 and sm_80 (tools/kernel_report.py).
GEMM_CONFIGS = {
    "plain": [(16, 16, 64, 64, 1, 4, 4), (32, 32, 64, 64, 4, 4, 4), (96, 64, 128, 64, 8, 4, 4),
              (None, 128, 128, 64, 8, 8, 3)],
    "swiglu": [(16, 16, 64, 64, 1, 4, 4), (32, 32, 64, 64, 4, 4, 4), (96, 64, 64, 64, 8, 4, 4),
               (None, 128, 64, 64, 8, 8, 3)],
    "swiglu_bwd": [(16, 16, 64, 64, 1, 4, 4), (32, 32, 64, 64, 4, 4, 4),
                   (None, 64, 64, 64, 8, 8, 3)],
}
# Shapes that are not 16-byte aligned (odd D or F) or fp32 inputs: small tiles, 2 stages
# (the fp32 SwiGLU's two accumulators spill at 32x64 on sm_80, hence its 32x32).
SMALL_CONFIGS = {
    "plain": [(16, 16, 64, 32, 1, 4, 2), (None, 32, 64, 32, 4, 4, 2)],
    "swiglu": [(16, 16, 64, 32, 1, 4, 2), (None, 32, 32, 32, 4, 4, 2)],
    "swiglu_bwd": [(16, 16, 64, 32, 1, 4, 2), (None, 32, 64, 32, 4, 4, 2)],
}


def gemm_config(mode: str, n_pairs: int, n_experts: int, *, fast: bool = True,
                align_m: int | None = None, block_m: int | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for a grouped GEMM.

    Chosen by the average pairs per expert; ``fast`` (16-bit inputs with 16-byte aligned rows)
    selects the large-tile table. ``align_m``: the row padding already used (BLOCK_M must
    divide it); ``block_m``: force the row tile, or the largest table tile below it (tests)."""
    rows = (GEMM_CONFIGS if fast else SMALL_CONFIGS)[mode]
    if block_m is not None:
        return ([r for r in rows if r[1] <= block_m] or rows[:1])[-1][1:]
    if align_m is not None:
        rows = [r for r in rows if r[1] <= align_m] or rows[:1]
    avg = n_pairs / max(n_experts, 1)
    for r in rows:
        if r[0] is None or avg <= r[0]:
            return r[1:]
    return rows[-1][1:]


# weight-gradient tiles (K runs over each expert's tokens):
# (max average pairs per expert, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
WGRAD_CONFIGS = [(128, 64, 64, 32, 4, 3), (None, 128, 128, 64, 8, 3)]
WGRAD_SMALL = (32, 32, 32, 4, 2)


def wgrad_config(n_pairs: int, n_experts: int, fast: bool = True):
    if not fast:
        return WGRAD_SMALL
    avg = n_pairs / max(n_experts, 1)
    for r in WGRAD_CONFIGS:
        if r[0] is None or avg <= r[0]:
            return r[1:]


SCAN_WARPS = 8


def route_block_t(block_e: int) -> int:
    """Tokens per router program: [BLOCK_T, BLOCK_E] <= 1K elements."""
    return max(1, min(16, 1024 // block_e))


def scan_block(block_e: int) -> int:
    """Chunks (and row tiles) per step of the one-program scan: [BLOCK_C, BLOCK_E] <= 2K."""
    return max(1, 2048 // block_e)


def align_chunk(block_e: int) -> int:
    """Pairs per count/scatter program: keeps the [CHUNK, BLOCK_E] one-hot at 8K elements."""
    return max(16, min(1024, 8192 // block_e))

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
    if idx.dim() != 2 or idx.shape[0] != N or idx.shape[1] < 1:
        raise ValueError(f"moe_experts: idx must be [{N}, k] with k >= 1 experts per token, got "
                         f"{tuple(idx.shape)}")
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
    if triton is None:
        return f"triton failed to import ({_triton_error})"
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
        BLOCK_T = route_block_t(BLOCK_E)
        sel_dtype = torch.promote_types(logits.dtype, router_bias.dtype)
        _moe_route_kernel[(_cdiv(N, BLOCK_T),)](
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
    CHUNK = align_chunk(BLOCK_E)
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
    _moe_count_kernel[(n_chunks,)](flat, cc, NK, E, CHUNK=CHUNK, BLOCK_E=BLOCK_E,
                                       num_warps=4)
    blk = scan_block(BLOCK_E)
    _moe_scan_kernel[(1,)](cc, off, counts, seg, expert_ids, n_post, sorted_ids,
                               n_chunks, E, NK, max_blocks, BLOCK_M=block_m, BLOCK_E=BLOCK_E,
                               BLOCK_C=blk, BLOCK_B=blk, num_warps=SCAN_WARPS)
    _moe_scatter_kernel[(n_chunks,)](flat, off, seg, sorted_ids, NK, E, CHUNK=CHUNK,
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
    BM, BN, BK, GM, nw, ns = gemm_config(mode, al.nk, B.shape[0], fast=fast,
                                             align_m=al.block_m, block_m=block_m)
    ratio = al.block_m // BM
    epi = {"plain": 0, "swiglu": 1, "swiglu_bwd": 2}[mode]
    tiles = al.max_blocks * ratio
    aligned = fast and _aligned(A, B, C, *(t for t in (aux,) if t is not None)) and N % 16 == 0
    grid = (tiles * _cdiv(N, BN),)
    _moe_gemm_kernel[grid](
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
    BM, BN, BK, nw, ns = wgrad_config(al.nk, E, fast)
    aligned = fast and _aligned(A, B, C) and MA % BM == 0 and NB % BN == 0
    grid = (_cdiv(MA, BM) * _cdiv(NB, BN), E)
    _moe_wgrad_kernel[grid](
        A, A.stride(0), B, B.stride(0), C, rw if rw is not None else C, al.sorted_ids, al.seg,
        al.nk, MA, NB, TOPK=topk, A_GATHER=a_gather, B_GATHER=b_gather, B_SCALE=rw is not None,
        ALIGNED=aligned, PREC="ieee" if A.dtype == torch.float32 else "tf32",
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_F32=_dot_f32(A), num_warps=nw, num_stages=ns)


def _combine(y: torch.Tensor, N: int, topk: int) -> torch.Tensor:
    """out[n] = sum_j y[n*k + j], slot order, fp32 accumulation."""
    D = y.shape[1]
    out = torch.empty(N, D, dtype=y.dtype, device=y.device)
    BLOCK_D = min(1024, max(16, _next_pow2(D)))
    _moe_combine_kernel[(N, _cdiv(D, BLOCK_D))](y, out, D, TOPK=topk, BLOCK_D=BLOCK_D,
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
    BM = gemm_config("swiglu", NK, E, fast=fast, block_m=block_m)[0]
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
        BNb = gemm_config("swiglu_bwd", NK, E, fast=fast, align_m=BM)[1]
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


# --------------------------------------------------------------------------------------------
# Registration for the GPU-free compile report
# --------------------------------------------------------------------------------------------

def _register() -> None:
    if triton is None:  # pragma: no cover
        return
    route = []
    for dt in ("bf16", "fp32"):
        for E, TOPK, K_PAD in ((64, 4, 4), (128, 8, 8), (256, 8, 8)):
            route.append(KernelConfig(
                f"{dt}-E{E}-k{TOPK}",
                {"L_ptr": f"*{dt}", "B_ptr": f"*{dt}", "W_ptr": f"*{dt}", "I_ptr": "*i64",
                 "CNT_ptr": "*i32", "N": "i32", "E": "i32", "stride_l": "i32"},
                {"TOPK": TOPK, "K_PAD": K_PAD, "BLOCK_T": route_block_t(E), "BLOCK_E": E,
                 "SEL_ROUND": 1 if dt == "bf16" else 0}, num_warps=4, num_stages=1))
    register_kernel("moe_route", _moe_route_kernel, route)

    count, scan, scatter = [], [], []
    for BE in (64, 256):
        ch = align_chunk(BE)
        count.append(KernelConfig(f"E{BE}", {"I_ptr": "*i64", "CC_ptr": "*i32", "NK": "i32",
                                             "E": "i32"},
                                  {"CHUNK": ch, "BLOCK_E": BE}, num_warps=4, num_stages=1))
        scatter.append(KernelConfig(f"E{BE}", {"I_ptr": "*i64", "OFF_ptr": "*i32",
                                               "SEG_ptr": "*i32", "SID_ptr": "*i32",
                                               "NK": "i32", "E": "i32"},
                                    {"CHUNK": ch, "BLOCK_E": BE}, num_warps=4, num_stages=1))
        for BM in (16, 128):
            scan.append(KernelConfig(
                f"E{BE}-BM{BM}",
                {"CC_ptr": "*i32", "OFF_ptr": "*i32", "CNT_ptr": "*i32", "SEG_ptr": "*i32",
                 "EID_ptr": "*i32", "NPOST_ptr": "*i32", "SID_ptr": "*i32", "n_chunks": "i32",
                 "E": "i32", "NK": "i32", "max_blocks": "i32"},
                {"BLOCK_M": BM, "BLOCK_E": BE, "BLOCK_C": scan_block(BE),
                 "BLOCK_B": scan_block(BE)}, num_warps=SCAN_WARPS, num_stages=1))
    register_kernel("moe_align_count", _moe_count_kernel, count)
    register_kernel("moe_align_scan", _moe_scan_kernel, scan)
    register_kernel("moe_align_scatter", _moe_scatter_kernel, scatter)

    gemm = []
    variants = [("bf16", True, GEMM_CONFIGS), ("bf16", False, SMALL_CONFIGS),
                ("fp32", False, SMALL_CONFIGS)]
    for dt, fast, table in variants:
        for mode, tag, (epi, gather, scale, out_pair, aux, trans) in (
                ("swiglu", "fwd13-train", (1, True, False, False, True, False)),  # saves g|u
                ("swiglu", "fwd13", (1, True, False, False, False, False)),       # inference
                ("plain", "fwd2", (0, False, True, True, False, False)),          # down, weighted
                ("swiglu_bwd", "bwd2", (2, True, False, False, False, True)),     # dY Wd^T
                ("plain", "bwd-dx", (0, False, False, True, False, True)),        # dgu W13^T
        ):
            rows = table[mode]
            for _, BM, BN, BK, GM, nw, ns in rows:
                gemm.append(KernelConfig(
                    f"{dt}-{tag}-{'fast' if fast else 'odd'}-BM{BM}-BN{BN}-BK{BK}",
                    {"A_ptr": f"*{dt}", "stride_am": "i32", "B_ptr": f"*{dt}",
                     "stride_be": "i32", "stride_br": "i32",
                     "C_ptr": f"*{dt}", "stride_cm": "i32", "AUX_ptr": f"*{dt}",
                     "stride_xm": "i32", "DW_ptr": "*fp32", "stride_dwm": "i32",
                     "RW_ptr": f"*{dt}", "SID_ptr": "*i32", "EID_ptr": "*i32",
                     "NPOST_ptr": "*i32", "NK": "i32", "N": "i32", "K": "i32",
                     "max_blocks": "i32"},
                    {"TOPK": 4, "A_GATHER": gather, "EPI": epi, "SCALE": scale,
                     "OUT_PAIR": out_pair, "STORE_AUX": aux, "B_TRANS": trans, "ALIGNED": fast,
                     "EVEN_K": fast, "EVEN_N": fast,
                     "ALIGN_RATIO": 2 if fast and BM == 64 and mode == "swiglu_bwd" else 1,
                     "PREC": "ieee" if dt == "fp32" else "tf32", "BLOCK_M": BM, "BLOCK_N": BN,
                     "BLOCK_K": BK, "GROUP_M": GM, "DOT_F32": False},
                    num_warps=nw, num_stages=ns, expect_hgmma=(fast and BM >= 64)))
    register_kernel("moe_gemm", _moe_gemm_kernel, gemm)

    wgrad = []
    for dt, fast in (("bf16", True), ("bf16", False), ("fp32", False)):
        cfgs = [r[1:] for r in WGRAD_CONFIGS] if fast else [WGRAD_SMALL]
        for BM, BN, BK, nw, ns in cfgs:
            for tag, (ag, bg, bs) in (("dw13", (True, False, False)), ("dw2", (False, True, True))):
                wgrad.append(KernelConfig(
                    f"{dt}-{tag}-{'fast' if fast else 'odd'}-BM{BM}-BN{BN}-BK{BK}",
                    {"A_ptr": f"*{dt}", "stride_am": "i32", "B_ptr": f"*{dt}",
                     "stride_bm": "i32", "C_ptr": f"*{dt}", "RW_ptr": f"*{dt}",
                     "SID_ptr": "*i32", "SEG_ptr": "*i32", "NK": "i32", "MA": "i32",
                     "NB": "i32"},
                    {"TOPK": 4, "A_GATHER": ag, "B_GATHER": bg, "B_SCALE": bs, "ALIGNED": fast,
                     "PREC": "ieee" if dt == "fp32" else "tf32",
                     "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_K": BK, "DOT_F32": False},
                    num_warps=nw, num_stages=ns, expect_hgmma=fast))
    register_kernel("moe_wgrad", _moe_wgrad_kernel, wgrad)

    register_kernel("moe_combine", _moe_combine_kernel, [
        KernelConfig(f"{dt}-k{k}", {"Y_ptr": f"*{dt}", "O_ptr": f"*{dt}", "D": "i32"},
                     {"TOPK": k, "BLOCK_D": 1024}, num_warps=4, num_stages=1)
        for dt in ("bf16", "fp32") for k in (4,)])


_register()
