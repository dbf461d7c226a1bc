"""Multi-latent attention (DeepSeek-V2): latent decompression for prefill and training.

From the latent ``c [B, S, r]`` (raw, with the kv_norm weight given, or already normalized), the
shared rope key ``k_rope [B, S, dr]`` and ``W_up = kv_up.weight [H*(dn+dv), r]``::

    y             = c * rsqrt(mean(c^2, -1) + eps) * norm_weight   (or y = c without a norm)
    kv            = y @ W_up^T  -> [B, S, H, dn + dv]
    K[b, s, h]    = concat(kv[..., :dn], k_rope[b, s])              # [B, S, H, dn + dr]
    V[b, s, h]    = kv[..., dn:]                                    # [B, S, H, dv]

The Triton forward fuses the RMSNorm into the GEMM: a small kernel computes the row scale
``rstd = rsqrt(mean(c^2)+eps)``, the norm weight is folded into W_up (``RMSNorm(c) @ W^T = rstd *
(c @ (W * norm_weight)^T)``, so the main loop is a plain product), rstd is applied in the
epilogue, and K (nope columns plus the broadcast rope key) and V are written straight into the
``[B, S, H, d]`` layout attention reads. The backward: ``dY = G @ W_up`` (G = dK_nope | dV, read
tile by tile) with the norm weight's gradient and the RMSNorm backward's row sums in its
epilogue; a row kernel that finishes dX and sums the rope key's gradient over heads; and
``dW_up = G^T @ Y`` with Y recomputed.

The absorbed decode path (attention directly over the latent cache) is in :mod:`.mla_decode`.
"""

from __future__ import annotations

import dataclasses

import torch

from ._dispatch import choose, interpreter_active
from ._registry import KernelConfig, register_kernel
from ._tl import next_pow2 as _p2
from .linear import dense
from .rmsnorm import rms_norm_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing
    triton = None
    tl = None


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def mla_decompress_reference(c_kv: torch.Tensor, k_rope: torch.Tensor, w_up: torch.Tensor,
                             n_heads: int, nope_dim: int, v_dim: int,
                             norm_weight: torch.Tensor | None = None, eps: float = 1e-6
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv: [B, S, r] (RMS-normalized, or raw when ``norm_weight`` is given: open-mythos's
    ``kv_norm`` is applied first), k_rope: [B, S, dr], w_up: [H*(dn+dv), r]
    -> (K [B, S, H, dn+dr], V [B, S, H, dv])."""
    if norm_weight is not None:
        c_kv = rms_norm_reference(c_kv, norm_weight, eps)
    B, S, _ = c_kv.shape
    kv = dense(c_kv, w_up).view(B, S, n_heads, nope_dim + v_dim)       # F.linear (CPU: oneDNN)
    k_nope, v = kv.split([nope_dim, v_dim], dim=-1)
    k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, n_heads, k_rope.shape[-1])], dim=-1)
    return k, v


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from ._tl import dot_f32 as _dot

    @triton.jit
    def _row_rstd_kernel(X, RSTD, stride_xb, stride_xs, M, S, R, eps,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
        """rstd[m] = rsqrt(mean(x[m]^2) + eps) over rows m = (b, s) of the latent (fp32)."""
        offs_m32 = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m32 < M
        row = (offs_m32 // S).to(tl.int64) * stride_xb + (offs_m32 % S).to(tl.int64) * stride_xs
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            x = tl.load(X + row[:, None] + offs_r[None, :],
                        mask=m_ok[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)
            sumsq += tl.sum(x * x, 1)
        tl.store(RSTD + offs_m32.to(tl.int64), tl.rsqrt(sumsq / R + eps), mask=m_ok)

    @triton.jit
    def _mla_decompress_fwd_kernel(
        X, KR, W, K, V, RSTD,
        stride_xb, stride_xs, stride_krb, stride_krs, stride_wn, stride_km, stride_vm,
        M, S, R, H, DN, DV, DR,
        HAS_NORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """Tile [BLOCK_M rows (b, s)] x [BLOCK_N columns of one head's k_nope or v] of x @ W^T,
        a plain GEMM main loop (the norm weight is folded into W by the launcher); with a norm
        the epilogue scales rows by rstd.

        Grid axis 0 (fastest) enumerates (head h, column tile t): t < cdiv(dn, BLOCK_N) are
        k_nope tiles, the rest v tiles, so the programs sharing one row block of x run together
        and read it from L2; the t == 0 program also copies the shared rope key into K[.., h, dn:].
        """
        pid_ht = tl.program_id(0)
        pid_m = tl.program_id(1)
        NK = tl.cdiv(DN, BLOCK_N)
        NT = NK + tl.cdiv(DV, BLOCK_N)
        h = pid_ht // NT
        t = pid_ht % NT
        DK = DN + DR
        DKV = DN + DV
        offs_m32 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m32 < M
        bb = (offs_m32 // S).to(tl.int64)     # int32 division: int64 division costs ~100 regs
        ss = (offs_m32 % S).to(tl.int64)
        offs_m = offs_m32.to(tl.int64)
        offs_c = tl.arange(0, BLOCK_N)
        if t < NK:
            out_base = K + h * DK + t * BLOCK_N
            row_stride = stride_km
            ncol = DN - t * BLOCK_N
            w_row0 = h * DKV + t * BLOCK_N
        else:
            out_base = V + h * DV + (t - NK) * BLOCK_N
            row_stride = stride_vm
            ncol = DV - (t - NK) * BLOCK_N
            w_row0 = h * DKV + DN + (t - NK) * BLOCK_N
        c_ok = offs_c < ncol
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = (X + bb * stride_xb + ss * stride_xs)[:, None] + offs_k[None, :]   # [BM, BK]
        w_ptrs = W + (w_row0 + offs_c)[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            if EVEN_K:  # no mask along the contiguous dim: vector loads
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)                  # [BM, BK]
                w = tl.load(w_ptrs, mask=c_ok[None, :], other=0.0)                  # [BK, BN]
            else:
                k_ok = offs_k < R - k0
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=c_ok[None, :] & k_ok[:, None], other=0.0)
            acc = _dot(x, w, acc, IEEE, UPCAST)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_NORM:
            acc = acc * tl.load(RSTD + offs_m, mask=m_ok, other=0.0)[:, None]
        tl.store(out_base + offs_m[:, None] * row_stride + offs_c[None, :],
                 acc.to(K.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
        if t == 0:
            # the one rope key, broadcast: K[b, s, h, dn:] = k_rope[b, s]
            offs_d = tl.arange(0, BLOCK_DR)
            d_ok = offs_d < DR
            kr = tl.load(KR + (bb * stride_krb + ss * stride_krs)[:, None] + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            tl.store(K + offs_m[:, None] * stride_km + h * DK + DN + offs_d[None, :],
                     kr.to(K.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _dy_accumulate(acc, g_rows, W, m_ok, offs_r, r_ok, offs_n, H, D, G_HEAD, W_COL0, DKV,
                       stride_wn, EVEN_R: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
        """acc += G[rows, head h's D columns] @ W_up[h*DKV + W_COL0 + column, r tile] over every
        head h, BLOCK_N columns at a time: the k_nope part (D = dn, head stride dn + dr in dK,
        W_COL0 = 0) or the v part (D = dv, head stride dv, W_COL0 = dn). One flat loop, so it
        pipelines."""
        NC = tl.cdiv(D, BLOCK_N)
        for j in range(H * NC):
            h = j // NC
            col = (j % NC) * BLOCK_N + offs_n
            c_ok = col < D
            g = tl.load(g_rows[:, None] + h * G_HEAD + col[None, :],
                        mask=m_ok[:, None] & c_ok[None, :], other=0.0)               # [BM, BN]
            w_ptrs = W + (h * DKV + W_COL0 + col)[:, None].to(tl.int64) * stride_wn + \
                offs_r[None, :]
            if EVEN_R:
                w = tl.load(w_ptrs, mask=c_ok[:, None], other=0.0)                  # [BN, BR]
            else:
                w = tl.load(w_ptrs, mask=c_ok[:, None] & r_ok[None, :], other=0.0)
            acc = _dot(g.to(W.dtype.element_ty), w, acc, IEEE, UPCAST)
        return acc

    @triton.jit
    def _mla_decompress_bwd_dy_kernel(
        X, W, NW, RSTD, GK, GV, T, PART, DNW_PART, DX,
        stride_xb, stride_xs, stride_wn,
        M, S, R, H, DN, DV, DR,
        HAS_NORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """dY[rows, r tile] = G @ W_up with G = (dK_nope | dV): two flat loops over the k_nope
        and the v column tiles of every head (contiguous loads of dK and dV, no gather).

        With a norm the epilogue writes T = dY * norm_weight (fp32 [M, R]) for the finishing
        kernel, T's row sums with xhat = x * rstd for this r tile (PART [n r tiles, M]) and the
        norm weight's partial gradient, sum over these rows of dY * xhat (DNW_PART [n m tiles,
        R]); without one it writes dX = dY. Grid axis 0 (fastest) is the r tile, so the programs
        reading one row block of dK / dV run together and share it through L2."""
        pid_r = tl.program_id(0)
        pid_m = tl.program_id(1)
        DK = DN + DR
        DKV = DN + DV
        offs_m32 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m32 < M
        offs_m = offs_m32.to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        offs_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        acc = _dy_accumulate(acc, GK + offs_m * (H * DK), W, m_ok, offs_r, r_ok, offs_n, H, DN,
                             DK, 0, DKV, stride_wn, EVEN_R, IEEE, UPCAST, BLOCK_N)
        acc = _dy_accumulate(acc, GV + offs_m * (H * DV), W, m_ok, offs_r, r_ok, offs_n, H, DV,
                             DV, DN, DKV, stride_wn, EVEN_R, IEEE, UPCAST, BLOCK_N)
        mr_mask = m_ok[:, None] & r_ok[None, :]
        if HAS_NORM:
            bb = (offs_m32 // S).to(tl.int64)
            ss = (offs_m32 % S).to(tl.int64)
            x = tl.load(X + (bb * stride_xb + ss * stride_xs)[:, None] + offs_r[None, :],
                        mask=mr_mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
            nw = tl.load(NW + offs_r, mask=r_ok, other=0.0).to(tl.float32)
            xhat = x * rstd[:, None]
            tt = acc * nw[None, :]
            tl.store(T + offs_m[:, None] * R + offs_r[None, :], tt, mask=mr_mask)
            tl.store(PART + pid_r * M + offs_m, tl.sum(tt * xhat, 1), mask=m_ok)
            tl.store(DNW_PART + pid_m * R + offs_r, tl.sum(acc * xhat, 0), mask=r_ok)
        else:
            tl.store(DX + offs_m[:, None] * R + offs_r[None, :], acc.to(DX.dtype.element_ty),
                     mask=mr_mask)

    @triton.jit
    def _mla_decompress_bwd_finish_kernel(
        X, RSTD, T, PART, GK, DX, DKR,
        stride_xb, stride_xs,
        M, S, R, H, DN, DR, N_RT,
        HAS_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """Rows [BLOCK_M]: dk_rope = sum_h dK[.., h, dn:] (the one rope key was broadcast to every
        head), and with a norm dX = rstd * (T - xhat * mean_r(T * xhat)) (the mean from PART)."""
        offs_m32 = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m32 < M
        offs_m = offs_m32.to(tl.int64)
        DK = DN + DR
        offs_d = tl.arange(0, BLOCK_DR)
        d_ok = offs_d < DR
        gk_rows = GK + offs_m * (H * DK) + DN
        dkr = tl.zeros([BLOCK_M, BLOCK_DR], dtype=tl.float32)
        for h in range(H):
            dkr += tl.load(gk_rows[:, None] + h * DK + offs_d[None, :],
                           mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(DKR + offs_m[:, None] * DR + offs_d[None, :], dkr.to(DKR.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        if HAS_NORM:
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for i in range(N_RT):
                c1 += tl.load(PART + i * M + offs_m, mask=m_ok, other=0.0)
            rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
            c1 = c1 / R * rstd                                  # mean(T * xhat) * rstd
            row = (offs_m32 // S).to(tl.int64) * stride_xb + (offs_m32 % S).to(tl.int64) * stride_xs
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask = m_ok[:, None] & (offs_r < R)[None, :]
                x = tl.load(X + row[:, None] + offs_r[None, :], mask=mask, other=0.0)
                tt = tl.load(T + offs_m[:, None] * R + offs_r[None, :], mask=mask, other=0.0)
                dx = rstd[:, None] * (tt - x.to(tl.float32) * c1[:, None])
                tl.store(DX + offs_m[:, None] * R + offs_r[None, :],
                         dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _mla_decompress_bwd_dw_kernel(
        X, NW, RSTD, GK, GV, DW,
        stride_xb, stride_xs,
        M, S, R, H, DN, DV, DR,
        HAS_NORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dW[tile's kv_up rows, r tile] = G[:, tile]^T @ Y[:, r tile] over every row, Y the
        recomputed normalized latent. Grid axis 0 = (head, column tile) as in the forward (k_nope
        tiles, then v tiles: contiguous dK / dV loads), axis 1 = r tile."""
        pid_ht = tl.program_id(0)
        pid_r = tl.program_id(1)
        NK = tl.cdiv(DN, BLOCK_N)
        NT = NK + tl.cdiv(DV, BLOCK_N)
        h = pid_ht // NT
        t = pid_ht % NT
        DK = DN + DR
        DKV = DN + DV
        if t < NK:
            g_base = GK + h * DK + t * BLOCK_N
            g_stride = H * DK
            ncol = DN - t * BLOCK_N
            w_row0 = h * DKV + t * BLOCK_N
        else:
            g_base = GV + h * DV + (t - NK) * BLOCK_N
            g_stride = H * DV
            ncol = DV - (t - NK) * BLOCK_N
            w_row0 = h * DKV + DN + (t - NK) * BLOCK_N
        offs_c = tl.arange(0, BLOCK_N)
        c_ok = offs_c < ncol
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        if HAS_NORM:
            nw = tl.load(NW + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_K):
            offs_k32 = m0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k32 < M
            offs_k = offs_k32.to(tl.int64)
            g = tl.load(g_base + offs_k[:, None] * g_stride + offs_c[None, :],
                        mask=k_ok[:, None] & c_ok[None, :], other=0.0)              # [BK, BN]
            bb = (offs_k32 // S).to(tl.int64)
            ss = (offs_k32 % S).to(tl.int64)
            y_ptrs = X + (bb * stride_xb + ss * stride_xs)[:, None] + offs_r[None, :]
            if EVEN_R:
                y = tl.load(y_ptrs, mask=k_ok[:, None], other=0.0)                   # [BK, BR]
            else:
                y = tl.load(y_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if HAS_NORM:
                rstd = tl.load(RSTD + offs_k, mask=k_ok, other=0.0)
                y = y.to(tl.float32) * rstd[:, None] * nw[None, :]
            acc = _dot(tl.trans(g), y.to(g.dtype), acc, IEEE, UPCAST)
        tl.store(DW + (w_row0 + offs_c)[:, None].to(tl.int64) * R + offs_r[None, :],
                 acc.to(DW.dtype.element_ty), mask=c_ok[:, None] & r_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------

_MAX_DR = 256     # the rope key is one [BLOCK_M, BLOCK_DR] block
_MAX_GRID_Y = 65535   # CUDA's cap on grid axis 1, where the forward and dY kernels put row tiles


def _flags(dtype: torch.dtype) -> dict:
    return {"IEEE": dtype == torch.float32,
            "UPCAST": dtype == torch.bfloat16 and interpreter_active()}


def _x_strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _fwd_blocks(dtype: torch.dtype, dn: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward GEMM (registered configs match).
    Half precision: 128 x 128 x 64 tiles, 8 warps (wgmma on Hopper); the column tile is at most
    one head's dn / dv (a tile never spans the k_nope | v boundary). fp32 (exact products):
    small tiles, spill-free."""
    if dtype == torch.float32:
        return 32, min(64, _p2(max(dn, dv))), 32, 4
    return 128, min(128, _p2(max(dn, dv))), 64, 8


def _bwd_blocks(dtype: torch.dtype, R: int, dn: int, dv: int, has_norm: bool) -> dict:
    """Block sizes of the three backward kernels (registered configs match)."""
    dkv = _p2(max(dn, dv))
    if dtype == torch.float32:
        return {"dy": (32, min(32, dkv), min(64, _p2(R)), 4, 2),    # BM, BN, BR, warps, stages
                "dw": (min(32, dkv), min(32, _p2(R)), 32, 4, 2),    # BN, BR, BK, warps, stages
                "fin": (32, min(64, _p2(R)), 4)}                    # BM, BR, warps
    # dy's r tile 64, not 128: its norm epilogue (x, xhat, T and two row sums) then fits 130
    # registers instead of 254 (sm_90 compile report); without the norm 4 warps (8 spill on
    # sm_80, where ptxas caps them at 128 registers)
    return {"dy": (128, min(64, dkv), min(64, _p2(R)), 8 if has_norm else 4, 3),
            "dw": (min(128, dkv), min(128, _p2(R)), 64, 8, 3),
            "fin": (32, min(64, _p2(R)), 4)}


def _row_rstd(c: torch.Tensor, eps: float) -> torch.Tensor:
    B, S, R = c.shape
    M = B * S
    rstd = torch.empty(M, device=c.device, dtype=torch.float32)
    BLOCK_M = 32
    _row_rstd_kernel[(triton.cdiv(M, BLOCK_M),)](
        c, rstd, *_x_strides(c), M, S, R, float(eps),
        BLOCK_M=BLOCK_M, BLOCK_R=min(128, _p2(R)), num_warps=4)
    return rstd


def _fwd(c, k_rope, w_up, norm_weight, H, dn, dv, eps):
    B, S, R = c.shape
    DR = k_rope.shape[-1]
    M = B * S
    K = torch.empty(B, S, H, dn + DR, device=c.device, dtype=c.dtype)
    V = torch.empty(B, S, H, dv, device=c.device, dtype=c.dtype)
    has_norm = norm_weight is not None
    if has_norm:
        rstd = _row_rstd(c, eps)
        # RMSNorm(c) @ W^T = rstd * (c @ (W * norm_weight)^T): the GEMM's main loop stays a plain
        # product (the norm weight folded into W once per call, [N, r]), rstd in the epilogue
        w = (w_up.float() * norm_weight.float()).to(w_up.dtype)
    else:
        rstd = torch.empty(1, device=c.device, dtype=torch.float32)
        w = w_up
    BLOCK_M, BLOCK_N, BLOCK_K, warps = _fwd_blocks(c.dtype, dn, dv)
    n_tiles = triton.cdiv(dn, BLOCK_N) + triton.cdiv(dv, BLOCK_N)
    grid = (H * n_tiles, triton.cdiv(M, BLOCK_M))
    _mla_decompress_fwd_kernel[grid](
        c, k_rope, w, K, V, rstd,
        *_x_strides(c), *_x_strides(k_rope), w.stride(0), K.stride(1), V.stride(1),
        M, S, R, H, dn, dv, DR,
        HAS_NORM=has_norm, **_flags(c.dtype), EVEN_K=R % BLOCK_K == 0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_DR=_p2(DR),
        num_warps=warps, num_stages=3,
    )
    return K, V, rstd


def _bwd(c, w_up, norm_weight, rstd, gK, gV, H, dn, dv, DR, need_dw=True):
    B, S, R = c.shape
    M = B * S
    N = H * (dn + dv)
    has_norm = norm_weight is not None
    gK = gK.contiguous()
    gV = gV.contiguous()
    blocks = _bwd_blocks(c.dtype, R, dn, dv, has_norm)
    dx = torch.empty(B, S, R, device=c.device, dtype=c.dtype)
    dkr = torch.empty(B, S, DR, device=c.device, dtype=c.dtype)
    # dY = G @ W (with a norm: T = dY * norm_weight and its row sums, finished below)
    bm, bn, br, warps, stages = blocks["dy"]
    n_mt, n_rt = triton.cdiv(M, bm), triton.cdiv(R, br)
    if has_norm:
        t_buf = torch.empty(M, R, device=c.device, dtype=torch.float32)
        part = torch.empty(n_rt, M, device=c.device, dtype=torch.float32)
        dnw_part = torch.empty(n_mt, R, device=c.device, dtype=torch.float32)
    else:
        t_buf = part = dnw_part = dx            # unused
    _mla_decompress_bwd_dy_kernel[(n_rt, n_mt)](
        c, w_up, norm_weight if has_norm else w_up, rstd, gK, gV, t_buf, part, dnw_part, dx,
        *_x_strides(c), w_up.stride(0),
        M, S, R, H, dn, dv, DR,
        HAS_NORM=has_norm, **_flags(c.dtype), EVEN_R=R % br == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=warps, num_stages=stages,
    )
    fbm, fbr, fwarps = blocks["fin"]
    _mla_decompress_bwd_finish_kernel[(triton.cdiv(M, fbm),)](
        c, rstd, t_buf, part, gK, dx, dkr,
        *_x_strides(c), M, S, R, H, dn, DR, n_rt,
        HAS_NORM=has_norm, BLOCK_M=fbm, BLOCK_R=fbr, BLOCK_DR=_p2(DR), num_warps=fwarps,
    )
    dnw = dnw_part.sum(0).to(norm_weight.dtype) if has_norm else None
    if not need_dw:
        return dx, dkr, None, dnw
    dw = torch.empty(N, R, device=c.device, dtype=w_up.dtype)
    wbn, wbr, wbk, warps, stages = blocks["dw"]
    n_tiles = triton.cdiv(dn, wbn) + triton.cdiv(dv, wbn)
    _mla_decompress_bwd_dw_kernel[(H * n_tiles, triton.cdiv(R, wbr))](
        c, norm_weight if has_norm else w_up, rstd, gK, gV, dw,
        *_x_strides(c),
        M, S, R, H, dn, dv, DR,
        HAS_NORM=has_norm, **_flags(c.dtype), EVEN_R=R % wbr == 0,
        BLOCK_N=wbn, BLOCK_R=wbr, BLOCK_K=wbk, num_warps=warps, num_stages=stages,
    )
    return dx, dkr, dw, dnw


class _MLADecompress(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, k_rope, w_up, norm_weight, H, dn, dv, eps):
        K, V, rstd = _fwd(c, k_rope, w_up, norm_weight, H, dn, dv, eps)
        ctx.save_for_backward(c, w_up, norm_weight, rstd)
        ctx.dims = (H, dn, dv, k_rope.shape[-1])
        return K, V

    @staticmethod
    def backward(ctx, gK, gV):
        c, w_up, norm_weight, rstd = ctx.saved_tensors
        H, dn, dv, DR = ctx.dims
        B, S, _ = c.shape
        if gK is None:
            gK = torch.zeros(B, S, H, dn + DR, device=c.device, dtype=c.dtype)
        if gV is None:
            gV = torch.zeros(B, S, H, dv, device=c.device, dtype=c.dtype)
        dx, dkr, dw, dnw = _bwd(c, w_up, norm_weight, rstd, gK.to(c.dtype), gV.to(c.dtype),
                                H, dn, dv, DR, need_dw=ctx.needs_input_grad[2])
        return dx, dkr, dw, dnw, None, None, None, None


def _check(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight):
    if c_kv.dim() != 3 or k_rope.dim() != 3 or w_up.dim() != 2:
        raise ValueError(f"need c_kv [B, S, r], k_rope [B, S, dr], w_up [H*(dn+dv), r]; got "
                         f"{tuple(c_kv.shape)}, {tuple(k_rope.shape)}, {tuple(w_up.shape)}")
    if min(n_heads, nope_dim, v_dim) < 1:
        raise ValueError(f"n_heads, nope_dim, v_dim must be >= 1, got {n_heads}, {nope_dim}, "
                         f"{v_dim}")
    if c_kv.shape[:2] != k_rope.shape[:2]:
        raise ValueError(f"c_kv {tuple(c_kv.shape)} and k_rope {tuple(k_rope.shape)} differ in "
                         f"[B, S]")
    if w_up.shape != (n_heads * (nope_dim + v_dim), c_kv.shape[2]):
        raise ValueError(f"w_up must be [{n_heads * (nope_dim + v_dim)}, {c_kv.shape[2]}], got "
                         f"{tuple(w_up.shape)}")
    if norm_weight is not None and norm_weight.shape != (c_kv.shape[2],):
        raise ValueError(f"norm_weight must be [{c_kv.shape[2]}], got {tuple(norm_weight.shape)}")


def _unsupported(c_kv, k_rope, w_up, norm_weight) -> str | None:
    if triton is None:
        return "triton is not importable"
    if c_kv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {c_kv.dtype} is not supported"
    if not (c_kv.dtype == k_rope.dtype == w_up.dtype):
        return (f"dtypes differ: c_kv {c_kv.dtype}, k_rope {k_rope.dtype}, w_up {w_up.dtype} "
                f"(the kernel takes one dtype)")
    if norm_weight is not None and not norm_weight.dtype.is_floating_point:
        return f"norm_weight dtype {norm_weight.dtype}"
    if k_rope.shape[2] > _MAX_DR:
        return f"dr={k_rope.shape[2]} > {_MAX_DR}"
    rows = c_kv.shape[0] * c_kv.shape[1]
    bm = min(_fwd_blocks(c_kv.dtype, 1, 1)[0],
             _bwd_blocks(c_kv.dtype, c_kv.shape[2], 1, 1, True)["dy"][0])
    if triton.cdiv(rows, bm) > _MAX_GRID_Y:
        return (f"B*S = {rows} rows: more than {_MAX_GRID_Y} row tiles of {bm} (the forward and "
                f"dY kernels' second grid axis); decompress in chunks of S")
    return None


def mla_decompress_triton(c_kv: torch.Tensor, k_rope: torch.Tensor, w_up: torch.Tensor,
                          n_heads: int, nope_dim: int, v_dim: int,
                          norm_weight: torch.Tensor | None = None, eps: float = 1e-6
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton decompression (differentiable; no dispatch: see :func:`mla_decompress`)."""
    _check(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight)
    why = _unsupported(c_kv, k_rope, w_up, norm_weight)
    if why:
        raise ValueError(f"mla_decompress_triton: {why}")
    return _decompress_launch(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight, eps)


def _decompress_launch(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight, eps):
    """:func:`mla_decompress_triton` on inputs already checked (the dispatcher checked them)."""
    if c_kv.stride(-1) != 1:
        c_kv = c_kv.contiguous()
    if k_rope.stride(-1) != 1:
        k_rope = k_rope.contiguous()
    w_up = w_up.contiguous()
    if norm_weight is not None:
        norm_weight = norm_weight.contiguous()
    return _MLADecompress.apply(c_kv, k_rope, w_up, norm_weight, n_heads, nope_dim, v_dim, eps)


def mla_decompress(c_kv: torch.Tensor, k_rope: torch.Tensor, w_up: torch.Tensor, n_heads: int,
                   nope_dim: int, v_dim: int, norm_weight: torch.Tensor | None = None,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompress the latent into per-head keys and values (see the module docstring).

    Args:
        c_kv:        [B, S, r] latent; normalized already, or raw when ``norm_weight`` is given.
                     May be a strided prefix view of a preallocated cache (last dim contiguous).
        k_rope:      [B, S, dr] rotary key shared by all heads (RoPE applied).
        w_up:        kv_up.weight [H*(dn+dv), r].
        norm_weight: kv_norm.weight [r] to fuse RMSNorm, or None.
        eps:         RMSNorm epsilon (open-mythos: 1e-6).

    Returns:
        K [B, S, H, dn+dr], V [B, S, H, dv] (contiguous), differentiable in c_kv, k_rope, w_up,
        norm_weight.
    """
    _check(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight)
    impl = choose("mla_decompress", c_kv, k_rope, w_up, norm_weight,
                  supported=_unsupported(c_kv, k_rope, w_up, norm_weight))
    if impl == "triton":
        return _decompress_launch(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight, eps)
    return mla_decompress_reference(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim,
                                    norm_weight, eps)


# ----------------------------------------------------------------------------------------------
# Compile-report registration
# ----------------------------------------------------------------------------------------------

def _register() -> None:
    if triton is None:  # pragma: no cover
        return
    i32 = "i32"
    # integer arguments Triton specializes as multiples of 16 at the registered shape (r=512,
    # dn=dv=128, dr=64, contiguous or cache-prefix strides), as a real launch there does
    div = ("stride_xb", "stride_xs", "stride_krb", "stride_krs", "stride_wn", "stride_km",
           "stride_vm", "R", "DN", "DV", "DR")
    fwd, dy, fin, dw = [], [], [], []
    R, dn, dv = 512, 128, 128
    for dt, ty in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        tdt = torch.float32 if dt == "fp32" else torch.bfloat16
        for has_norm in (True, False):
            b = _bwd_blocks(tdt, R, dn, dv, has_norm)
            tag = f"{dt}-r{R}-dr64-{'norm' if has_norm else 'nonorm'}"
            flags = {"HAS_NORM": has_norm, "IEEE": dt == "fp32", "UPCAST": False}
            bm, bn, bk, warps = _fwd_blocks(tdt, dn, dv)
            fwd.append(KernelConfig(
                name=f"{tag}-BM{bm}-BN{bn}-BK{bk}",
                signature={"X": ty, "KR": ty, "W": ty, "K": ty, "V": ty, "RSTD": "*fp32",
                           "stride_xb": i32, "stride_xs": i32, "stride_krb": i32,
                           "stride_krs": i32, "stride_wn": i32, "stride_km": i32,
                           "stride_vm": i32, "M": i32, "S": i32, "R": i32, "H": i32,
                           "DN": i32, "DV": i32, "DR": i32},
                constexprs=dict(flags, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                BLOCK_DR=64),
                num_warps=warps, num_stages=3, expect_hgmma=dt != "fp32"))
            bm, bn, br, warps, stages = b["dy"]
            dy.append(KernelConfig(
                name=f"{tag}-BM{bm}-BN{bn}-BR{br}",
                signature={"X": ty, "W": ty, "NW": ty, "RSTD": "*fp32", "GK": ty, "GV": ty,
                           "T": "*fp32", "PART": "*fp32", "DNW_PART": "*fp32", "DX": ty,
                           "stride_xb": i32, "stride_xs": i32, "stride_wn": i32, "M": i32,
                           "S": i32, "R": i32, "H": i32, "DN": i32, "DV": i32, "DR": i32},
                constexprs=dict(flags, EVEN_R=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br),
                num_warps=warps, num_stages=stages, expect_hgmma=dt != "fp32"))
            bn, br, bk, warps, stages = b["dw"]
            dw.append(KernelConfig(
                name=f"{tag}-BN{bn}-BR{br}-BK{bk}",
                signature={"X": ty, "NW": ty, "RSTD": "*fp32", "GK": ty, "GV": ty, "DW": ty,
                           "stride_xb": i32, "stride_xs": i32, "M": i32, "S": i32, "R": i32,
                           "H": i32, "DN": i32, "DV": i32, "DR": i32},
                constexprs=dict(flags, EVEN_R=True, BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk),
                num_warps=warps, num_stages=stages, expect_hgmma=dt != "fp32"))
            bm, br, warps = b["fin"]
            fin.append(KernelConfig(
                name=f"{tag}-BM{bm}-BR{br}",
                signature={"X": ty, "RSTD": "*fp32", "T": "*fp32", "PART": "*fp32", "GK": ty,
                           "DX": ty, "DKR": ty, "stride_xb": i32, "stride_xs": i32, "M": i32,
                           "S": i32, "R": i32, "H": i32, "DN": i32, "DR": i32, "N_RT": i32},
                constexprs={"HAS_NORM": has_norm, "BLOCK_M": bm, "BLOCK_R": br, "BLOCK_DR": 64},
                num_warps=warps))
    rstd = [KernelConfig(name=f"{dt}-BM32-BR128",
                         signature={"X": ty, "RSTD": "*fp32", "stride_xb": i32, "stride_xs": i32,
                                    "M": i32, "S": i32, "R": i32, "eps": "fp32"},
                         constexprs={"BLOCK_M": 32, "BLOCK_R": 128}, num_warps=4)
            for dt, ty in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32"))]
    def spec(cfgs):
        return [dataclasses.replace(c, divisible=tuple(a for a in div if a in c.signature))
                for c in cfgs]

    register_kernel("mla_decompress_row_rstd", _row_rstd_kernel, spec(rstd))
    register_kernel("mla_decompress_fwd", _mla_decompress_fwd_kernel, spec(fwd))
    register_kernel("mla_decompress_bwd_dy", _mla_decompress_bwd_dy_kernel, spec(dy))
    register_kernel("mla_decompress_bwd_finish", _mla_decompress_bwd_finish_kernel, spec(fin))
    register_kernel("mla_decompress_bwd_dw", _mla_decompress_bwd_dw_kernel, spec(dw))


_register()

__all__ = [
    "mla_decompress",
    "mla_decompress_reference",
    "mla_decompress_triton",
]
