"""Multi-latent attention (DeepSeek-V2): latent decompression for prefill and training.

From the latent ``c [B, S, r]`` (raw, with the kv_norm weight given, or already normalized), the
shared rope key ``k_rope [B, S, dr]`` and ``W_up = kv_up.weight [H*(dn+dv), r]``::

    y             = c * rsqrt(mean(c^2, -1) + eps) * norm_weight   (or y = c without a norm)
    kv            = y @ W_up^T  -> [B, S, H, dn + dv]
    K[b, s, h]    = concat(kv[..., :dn], k_rope[b, s])              # [B, S, H, dn + dr]
    V[b, s, h]    = kv[..., dn:]                                    # [B, S, H, dv]

The Triton kernel fuses the RMSNorm into the GEMM (the row scale ``rsqrt(mean(c^2)+eps)`` is
accumulated alongside the k-loop and applied in the epilogue) and writes K (nope columns plus
the broadcast rope key) and V straight into the ``[B, S, H, d]`` layout attention reads. The
backward is two kernels: ``dY = G @ W_up`` with the RMSNorm backward and the rope-key reduction
fused (G = dK_nope | dV gathered on the fly), and ``dW_up = G^T @ Y`` with Y recomputed.

The absorbed decode path (attention directly over the latent cache) is in :mod:`.mla_decode`.
"""

from __future__ import annotations

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
    def _kv_up_columns(offs_n, H, DN, DV, DR):
        """kv_up output column n (head h = n // (DN+DV), j = n % (DN+DV)) -> its column in K
        [.., H, DN+DR] (j < DN) or in V [.., H, DV] (j >= DN); returns (k_col, v_col, is_k)."""
        DKV = DN + DV
        hh = offs_n // DKV
        jj = offs_n % DKV
        return hh * (DN + DR) + jj, hh * DV + jj - DN, jj < DN

    @triton.jit
    def _mla_decompress_fwd_kernel(
        X, KR, W, NW, K, V, RSTD,
        stride_xb, stride_xs, stride_krb, stride_krs, stride_wn, stride_km, stride_vm,
        M, S, R, H, DN, DV, DR, eps,
        HAS_NORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """Tile [BLOCK_M rows (b, s)] x [BLOCK_N columns of one head's k_nope or v] of y @ W^T.

        Grid axis 1 enumerates (head h, column tile t): t < cdiv(dn, BLOCK_N) are k_nope tiles,
        the rest v tiles; the t == 0 program also copies the shared rope key into K[..., h, dn:].
        """
        pid_m = tl.program_id(0)
        pid_ht = tl.program_id(1)
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
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            k_ok = offs_k < R - k0
            if EVEN_K:  # no mask along the contiguous dim: vector loads
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)                  # [BM, BK]
                w = tl.load(w_ptrs, mask=c_ok[None, :], other=0.0)                  # [BK, BN]
            else:
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=c_ok[None, :] & k_ok[:, None], other=0.0)
            if HAS_NORM:
                xf = x.to(tl.float32)
                sumsq += tl.sum(xf * xf, 1)
                nw = tl.load(NW + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                x = (xf * nw[None, :]).to(W.dtype.element_ty)
            acc = _dot(x, w, acc, IEEE, UPCAST)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_NORM:
            rstd = tl.rsqrt(sumsq / R + eps)
            acc = acc * rstd[:, None]
            if pid_ht == 0:
                tl.store(RSTD + offs_m, rstd, mask=m_ok)
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
    def _mla_decompress_bwd_dx_kernel(
        X, W, NW, RSTD, GK, GV, DX, DKR, DNW_PART,
        stride_xb, stride_xs, stride_wn,
        M, S, H, DN, DV, DR,
        R: tl.constexpr, HAS_NORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """Rows [BLOCK_M]: dY = G @ W (G = dK nope | dV, gathered), dk_rope = sum_h dK rope, and
        with a norm dX = rstd * (dY*w - xhat * mean(dY*w*xhat)), dw partial = sum_rows dY*xhat."""
        pid_m = tl.program_id(0)
        DK = DN + DR
        DKV = DN + DV
        N = H * DKV
        offs_m32 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m32 < M
        offs_m = offs_m32.to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        gk_row = GK + offs_m * (H * DK)
        gv_row = GV + offs_m * (H * DV)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            k_col, v_col, is_k = _kv_up_columns(offs_n, H, DN, DV, DR)
            gk = tl.load(gk_row[:, None] + k_col[None, :],
                         mask=m_ok[:, None] & (n_ok & is_k)[None, :], other=0.0)
            gv = tl.load(gv_row[:, None] + v_col[None, :],
                         mask=m_ok[:, None] & (n_ok & ~is_k)[None, :], other=0.0)
            g = gk + gv                                                              # [BM, BN]
            w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_r[None, :],
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)              # [BN, BR]
            acc = _dot(g.to(W.dtype.element_ty), w, acc, IEEE, UPCAST)
        # rope key: the one copy was broadcast to every head, its gradient is the head sum
        offs_d = tl.arange(0, BLOCK_DR)
        d_ok = offs_d < DR
        dkr = tl.zeros([BLOCK_M, BLOCK_DR], dtype=tl.float32)
        for h in range(H):
            dkr += tl.load(gk_row[:, None] + h * DK + DN + offs_d[None, :],
                           mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        tl.store(DKR + offs_m[:, None] * DR + offs_d[None, :], dkr.to(DKR.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])
        mr_mask = m_ok[:, None] & r_ok[None, :]
        if HAS_NORM:
            bb = (offs_m32 // S).to(tl.int64)
            ss = (offs_m32 % S).to(tl.int64)
            x = tl.load(X + (bb * stride_xb + ss * stride_xs)[:, None] + offs_r[None, :],
                        mask=mr_mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)
            nw = tl.load(NW + offs_r, mask=r_ok, other=0.0).to(tl.float32)
            xhat = x * rstd[:, None]
            dyw = acc * nw[None, :]
            c1 = tl.sum(dyw * xhat, 1) / R
            dx = rstd[:, None] * (dyw - xhat * c1[:, None])
            tl.store(DNW_PART + pid_m * R + offs_r, tl.sum(acc * xhat, 0), mask=r_ok)
        else:
            dx = acc
        tl.store(DX + offs_m[:, None] * R + offs_r[None, :], dx.to(DX.dtype.element_ty),
                 mask=mr_mask)

    @triton.jit
    def _mla_decompress_bwd_dw_kernel(
        X, NW, RSTD, GK, GV, DW,
        stride_xb, stride_xs,
        M, S, R, H, DN, DV, DR,
        HAS_NORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, EVEN_R: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """dW[n, k] = sum_m G[m, n] * y[m, k], y the (recomputed) normalized latent."""
        pid_n = tl.program_id(0)
        pid_r = tl.program_id(1)
        DK = DN + DR
        DKV = DN + DV
        N = H * DKV
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_col, v_col, is_k = _kv_up_columns(offs_n, H, DN, DV, DR)                   # [BN]
        k_sel = n_ok & is_k
        v_sel = n_ok & ~is_k
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        if HAS_NORM:
            nw = tl.load(NW + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_K):
            offs_k32 = m0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k32 < M
            offs_k = offs_k32.to(tl.int64)
            gk = tl.load(GK + offs_k[None, :] * (H * DK) + k_col[:, None],
                         mask=k_sel[:, None] & k_ok[None, :], other=0.0)
            gv = tl.load(GV + offs_k[None, :] * (H * DV) + v_col[:, None],
                         mask=v_sel[:, None] & k_ok[None, :], other=0.0)
            gt = gk + gv                                                             # [BN, BK]
            bb = (offs_k32 // S).to(tl.int64)
            ss = (offs_k32 % S).to(tl.int64)
            y_ptrs = X + (bb * stride_xb + ss * stride_xs)[:, None] + offs_r[None, :]
            if EVEN_R:
                y = tl.load(y_ptrs, mask=k_ok[:, None], other=0.0)                   # [BK, BR]
            else:
                y = tl.load(y_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            if HAS_NORM:
                rstd = tl.load(RSTD + offs_k, mask=k_ok, other=0.0)
                y = (y.to(tl.float32) * rstd[:, None] * nw[None, :]).to(gt.dtype)
            acc = _dot(gt, y.to(gt.dtype), acc, IEEE, UPCAST)
        tl.store(DW + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                 acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & r_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------

_MAX_R = 1024     # the dX kernel holds a full [BLOCK_M, r] fp32 row block
_MAX_DR = 256


def _flags(dtype: torch.dtype) -> dict:
    return {"IEEE": dtype == torch.float32,
                "UPCAST": dtype == torch.bfloat16 and interpreter_active()}


def _x_strides(x: torch.Tensor) -> tuple[int, int]:
    return x.stride(0), x.stride(1)


def _fwd_blocks(dtype: torch.dtype, dn: int, dv: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward GEMM (registered configs match)."""
    bn = min(64, _p2(max(dn, dv)))
    if dtype == torch.float32:
        return 32, bn, 32, 4
    return 64, bn, 32, 8


def _fwd(c, k_rope, w_up, norm_weight, H, dn, dv, eps):
    B, S, R = c.shape
    DR = k_rope.shape[-1]
    M = B * S
    K = torch.empty(B, S, H, dn + DR, device=c.device, dtype=c.dtype)
    V = torch.empty(B, S, H, dv, device=c.device, dtype=c.dtype)
    has_norm = norm_weight is not None
    rstd = torch.empty(M if has_norm else 1, device=c.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N, BLOCK_K, warps = _fwd_blocks(c.dtype, dn, dv)
    n_tiles = triton.cdiv(dn, BLOCK_N) + triton.cdiv(dv, BLOCK_N)
    grid = (triton.cdiv(M, BLOCK_M), H * n_tiles)
    _mla_decompress_fwd_kernel[grid](
        c, k_rope, w_up, norm_weight if has_norm else w_up, K, V, rstd,
        *_x_strides(c), *_x_strides(k_rope), w_up.stride(0), K.stride(1), V.stride(1),
        M, S, R, H, dn, dv, DR, float(eps),
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
    dx = torch.empty(B, S, R, device=c.device, dtype=c.dtype)
    dkr = torch.empty(B, S, DR, device=c.device, dtype=c.dtype)
    BLOCK_M = 16 if R > 256 else 32
    n_mb = triton.cdiv(M, BLOCK_M)
    dnw_part = torch.empty(n_mb if has_norm else 1, R, device=c.device, dtype=torch.float32)
    _mla_decompress_bwd_dx_kernel[(n_mb,)](
        c, w_up, norm_weight if has_norm else w_up, rstd, gK, gV, dx, dkr, dnw_part,
        *_x_strides(c), w_up.stride(0),
        M, S, H, dn, dv, DR,
        R=R, HAS_NORM=has_norm, **_flags(c.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=32, BLOCK_R=_p2(R), BLOCK_DR=_p2(DR),
        num_warps=8 if R > 256 else 4, num_stages=2,
    )
    if not need_dw:
        return dx, dkr, None, (dnw_part.sum(0).to(norm_weight.dtype) if has_norm else None)
    dw = torch.empty(N, R, device=c.device, dtype=w_up.dtype)
    BLOCK_N, BLOCK_R = 64, 64
    _mla_decompress_bwd_dw_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(R, BLOCK_R))](
        c, norm_weight if has_norm else w_up, rstd, gK, gV, dw,
        *_x_strides(c),
        M, S, R, H, dn, dv, DR,
        HAS_NORM=has_norm, **_flags(c.dtype), EVEN_R=R % BLOCK_R == 0,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, BLOCK_K=32,
        num_warps=4, num_stages=3,
    )
    dnw = dnw_part.sum(0).to(norm_weight.dtype) if has_norm else None
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
    if c_kv.shape[2] > _MAX_R or k_rope.shape[2] > _MAX_DR:
        return f"r={c_kv.shape[2]} > {_MAX_R} or dr={k_rope.shape[2]} > {_MAX_DR}"
    return None


def mla_decompress_triton(c_kv: torch.Tensor, k_rope: torch.Tensor, w_up: torch.Tensor,
                          n_heads: int, nope_dim: int, v_dim: int,
                          norm_weight: torch.Tensor | None = None, eps: float = 1e-6
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton decompression (differentiable; no dispatch: see :func:`mla_decompress`)."""
    _check(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight)
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
        return mla_decompress_triton(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim,
                                     norm_weight, eps)
    return mla_decompress_reference(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim,
                                    norm_weight, eps)


# ----------------------------------------------------------------------------------------------
# Bytes / FLOPs for the benchmark harness
# ----------------------------------------------------------------------------------------------

def mla_decompress_bytes(B: int, S: int, r: int, dr: int, H: int, nope_dim: int, v_dim: int,
                         dtype: torch.dtype = torch.bfloat16) -> int:
    """Forward bytes: c and k_rope read, W_up read, K and V written (each once)."""
    e = torch.empty(0, dtype=dtype).element_size()
    return e * (B * S * (r + dr) + H * (nope_dim + v_dim) * r
                + B * S * H * (nope_dim + dr + v_dim))


def mla_decompress_flops(B: int, S: int, r: int, H: int, nope_dim: int, v_dim: int) -> int:
    """Forward FLOPs of the kv_up GEMM (the backward is twice this)."""
    return 2 * B * S * r * H * (nope_dim + v_dim)


# ----------------------------------------------------------------------------------------------
# Compile-report registration
# ----------------------------------------------------------------------------------------------

def _register() -> None:
    if triton is None:  # pragma: no cover
        return
    i32 = "i32"
    fwd, dx, dw = [], [], []
    for dt, ty in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        for has_norm in (True, False):
            tag = f"{dt}-r512-dr64-{'norm' if has_norm else 'nonorm'}"
            flags = {"HAS_NORM": has_norm, "IEEE": dt == "fp32", "UPCAST": False}
            bm, bn, bk, warps = _fwd_blocks(torch.float32 if dt == "fp32" else torch.bfloat16,
                                            128, 128)
            fwd.append(KernelConfig(
                name=f"{tag}-BM{bm}-BN{bn}-BK{bk}",
                signature={"X": ty, "KR": ty, "W": ty, "NW": "*fp32", "K": ty, "V": ty,
                           "RSTD": "*fp32", "stride_xb": i32, "stride_xs": i32,
                           "stride_krb": i32, "stride_krs": i32, "stride_wn": i32,
                           "stride_km": i32, "stride_vm": i32, "M": i32, "S": i32, "R": i32,
                           "H": i32, "DN": i32, "DV": i32,
                           "DR": i32, "eps": "fp32"},
                constexprs=dict(flags, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                BLOCK_DR=64),
                num_warps=warps, num_stages=3, expect_hgmma=dt != "fp32"))
            dx.append(KernelConfig(
                name=f"{tag}-BM16-BN32-BR512",
                signature={"X": ty, "W": ty, "NW": "*fp32", "RSTD": "*fp32", "GK": ty, "GV": ty,
                           "DX": ty, "DKR": ty, "DNW_PART": "*fp32", "stride_xb": i32,
                           "stride_xs": i32, "stride_wn": i32, "M": i32, "S": i32,
                           "H": i32, "DN": i32, "DV": i32, "DR": i32},
                constexprs=dict(flags, R=512, BLOCK_M=16, BLOCK_N=32, BLOCK_R=512, BLOCK_DR=64),
                num_warps=8, num_stages=2))
            dw.append(KernelConfig(
                name=f"{tag}-BN64-BR64-BK32",
                signature={"X": ty, "NW": "*fp32", "RSTD": "*fp32", "GK": ty, "GV": ty, "DW": ty,
                           "stride_xb": i32, "stride_xs": i32, "M": i32, "S": i32, "R": i32,
                           "H": i32, "DN": i32, "DV": i32, "DR": i32},
                constexprs=dict(flags, EVEN_R=True, BLOCK_N=64, BLOCK_R=64, BLOCK_K=32),
                num_warps=4, num_stages=3, expect_hgmma=dt != "fp32"))
    register_kernel("mla_decompress_fwd", _mla_decompress_fwd_kernel, fwd)
    register_kernel("mla_decompress_bwd_dx", _mla_decompress_bwd_dx_kernel, dx)
    register_kernel("mla_decompress_bwd_dw", _mla_decompress_bwd_dw_kernel, dw)


_register()

__all__ = [
    "mla_decompress",
    "mla_decompress_bytes",
    "mla_decompress_flops",
    "mla_decompress_reference",
    "mla_decompress_triton",
]
