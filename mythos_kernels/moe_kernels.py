"""Triton kernels for the routed MoE FFN (see :mod:`mythos_kernels.moe` for the math and the API).

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

import triton
import triton.language as tl

from ._registry import KernelConfig, register_kernel

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


# --------------------------------------------------------------------------------------------
# Registration for the GPU-free compile report
# --------------------------------------------------------------------------------------------

def _register() -> None:
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
