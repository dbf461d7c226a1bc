"""Absorbed multi-latent attention for decode (DeepSeek-V2 weight absorption, flash-decoding).

With ``W_up = kv_up.weight`` viewed as ``[H, dn + dv, r]`` and split into ``W_UK [H, dn, r]`` and
``W_UV [H, dv, r]``, the decompressed keys/values of open-mythos are ``k_nope = c @ W_UK^T`` and
``v = c @ W_UV^T`` (``c`` the RMS-normalized latent). Folding them into the query and the output::

    q_lat[h]   = q_nope[h] @ W_UK[h]                                   # [r]
    score[h,s] = (q_lat[h] . c[s] + q_rope[h] . k_rope[s]) * scale     # = q[h] . K[s, h] * scale
    out_lat[h] = softmax_s(score[h]) @ c                               # [r]
    out[h]     = out_lat[h] @ W_UV[h]^T                                # [dv] = softmax @ V[:, h]

so one decode step is multi-query attention over the latent cache: every head of a token reads
the same ``c [S, r]`` and ``k_rope [S, dr]`` rows. The Triton kernel (flash-decoding, Dao et al.
2023) gives each program a block of (token, head) query rows and one split of the sequence;
all rows of the block share each cache tile it loads; the splits are merged by log-sum-exp.

Queries: ``T`` tokens per sequence (``T = 1`` for decode). Query token ``t`` sits at absolute
position ``S - T + t`` and sees keys ``0 .. S - T + t`` (causal, aligned to the end of the cache).
"""

from __future__ import annotations

import functools
import operator

import torch

from ._dispatch import _compiling, choose, cpu_form, interpreter_active
from ._registry import KernelConfig, register_kernel
from ._tl import next_pow2 as _p2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing
    triton = None
    tl = None

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def mla_absorb_weights(w_up: torch.Tensor, n_heads: int, nope_dim: int, v_dim: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """w_up = kv_up.weight [H*(dn+dv), r] -> (W_UK [H, dn, r], W_UV [H, dv, r]) (views, no copy)."""
    if w_up.dim() != 2 or w_up.shape[0] != n_heads * (nope_dim + v_dim):
        raise ValueError(f"w_up must be [n_heads*(nope_dim+v_dim), r] = "
                         f"[{n_heads * (nope_dim + v_dim)}, r], got {tuple(w_up.shape)}")
    w = w_up.view(n_heads, nope_dim + v_dim, w_up.shape[1])
    return w[:, :nope_dim], w[:, nope_dim:]


def _lengths(seq_len: int | torch.Tensor, B: int, device: torch.device) -> torch.Tensor:
    """seq_len (int, 0-d or [B] tensor) -> int64 [B] tensor on ``device``."""
    if isinstance(seq_len, torch.Tensor):
        return seq_len.to(device=device, dtype=torch.int64).reshape(-1).expand(B)
    return torch.full((B,), int(seq_len), device=device, dtype=torch.int64)


def _math(x: torch.Tensor) -> torch.Tensor:
    """The references' math dtype: fp32, or fp64 for fp64 inputs (an fp64 model stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _valid_prefix(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """x [B, Smax, d] in fp32 (fp64 stays) with rows at positions >= lens[b] zeroed (never read
    garbage)."""
    pos = torch.arange(x.shape[1], device=x.device)
    return torch.where((pos[None, :] < lens[:, None])[..., None], _math(x), 0.0)


def mla_decode_attention_reference(q_lat: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                                   k_rope: torch.Tensor, seq_len: int | torch.Tensor,
                                   scale: float) -> torch.Tensor:
    """Latent attention in plain torch (fp32 math; fp64 for fp64 inputs).

    q_lat: [B, H, r] or [B, T, H, r]; q_rope: same with dr; c_kv: [B, Smax, r] (normalized latent);
    k_rope: [B, Smax, dr]; seq_len: valid length S (int, or int tensor 0-d / [B]);
    returns out_lat with q_lat's shape and dtype.
    """
    squeeze = q_lat.dim() == 3
    if squeeze:
        q_lat, q_rope = q_lat.unsqueeze(1), q_rope.unsqueeze(1)
    B, T, H, _ = q_lat.shape
    if not isinstance(seq_len, torch.Tensor):  # host length: slice, mask only causally
        S = int(seq_len)
        c, kr = _math(c_kv[:, :S]), _math(k_rope[:, :S])
        q, qr = _math(q_lat).reshape(B, T * H, -1), _math(q_rope).reshape(B, T * H, -1)
        # (q . c + q_rope . k_rope) * scale, the rope product added into the latent one
        s = torch.baddbmm(torch.bmm(qr, kr.transpose(1, 2)), q, c.transpose(1, 2)).mul_(scale)
        s = s.view(B, T, H, S)                                              # [B, T, H, S]
        if T > 1:
            keep = torch.arange(S, device=c.device) <= (S - T + torch.arange(
                T, device=c.device))[:, None]                               # [T, S]
            s = s.masked_fill(~keep[None, :, None, :], float("-inf"))
        out = torch.bmm(torch.softmax(s, dim=-1).view(B, T * H, S), c).view(B, T, H, -1)
        out = out.to(q_lat.dtype)
        return out.squeeze(1) if squeeze else out
    Smax = c_kv.shape[1]
    lens = _lengths(seq_len, B, c_kv.device)                                # [B]
    c, kr = _valid_prefix(c_kv, lens), _valid_prefix(k_rope, lens)          # zeros past S
    s = (torch.einsum("bthr,bsr->bths", _math(q_lat), c)
         + torch.einsum("bthd,bsd->bths", _math(q_rope), kr)) * scale      # [B, T, H, Smax]
    pos = torch.arange(Smax, device=c_kv.device)
    limit = lens[:, None] - T + torch.arange(T, device=c_kv.device)[None, :]  # [B, T] last key
    allowed = pos[None, None, :] <= limit[:, :, None]                       # [B, T, Smax]
    s = s.masked_fill(~allowed[:, :, None, :], float("-inf"))
    out = torch.einsum("bths,bsr->bthr", torch.softmax(s, dim=-1), c).to(q_lat.dtype)
    return out.squeeze(1) if squeeze else out


def mla_decode_reference(q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                         k_rope: torch.Tensor, w_up: torch.Tensor, nope_dim: int, v_dim: int,
                         seq_len: int | torch.Tensor, scale: float) -> torch.Tensor:
    """The decompressed path open-mythos takes, restricted to the valid cache prefix.

    q_nope: [B, T, H, dn]; q_rope: [B, T, H, dr] (RoPE applied); c_kv: [B, Smax, r] (normalized);
    k_rope: [B, Smax, dr] (RoPE applied); w_up: [H*(dn+dv), r] -> out [B, T, H, dv]:
    ``K = [c @ W_UK^T | k_rope]``, ``V = c @ W_UV^T``, ``softmax(q K^T * scale + causal) V``.
    """
    B, T, H, _ = q_nope.shape
    Smax = c_kv.shape[1]
    lens = _lengths(seq_len, B, c_kv.device)
    c, kr = _valid_prefix(c_kv, lens), _valid_prefix(k_rope, lens)
    kv = torch.nn.functional.linear(c, _math(w_up)).view(B, Smax, H, nope_dim + v_dim)
    k = torch.cat([kv[..., :nope_dim], kr[:, :, None, :].expand(B, Smax, H, kr.shape[-1])], dim=-1)
    v = kv[..., nope_dim:]
    q = _math(torch.cat([q_nope, q_rope], dim=-1))
    s = torch.einsum("bthd,bshd->bths", q, k) * scale
    limit = lens[:, None] - T + torch.arange(T, device=c_kv.device)[None, :]
    allowed = torch.arange(Smax, device=c_kv.device)[None, None, :] <= limit[:, :, None]
    s = s.masked_fill(~allowed[:, :, None, :], float("-inf"))
    return torch.einsum("bths,bshd->bthd", torch.softmax(s, dim=-1), v).to(q_nope.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from ._tl import dot_f32 as _dot

    @triton.jit(do_not_specialize=["seq_len", "num_splits"])   # no recompile as S grows
    def _mla_decode_split_kernel(
        Q, QR, C, KR, LENS, OUT, O_PART, L_PART,
        stride_qb, stride_qm, stride_qrb, stride_qrm,
        stride_cb, stride_cs, stride_krb, stride_krs,
        stride_ob, stride_om,
        stride_pb, stride_ps, stride_pm,
        stride_lb, stride_ls,
        M, H, T, seq_len, num_splits, qk_scale,
        R: tl.constexpr, DR: tl.constexpr,
        LEN_FROM_PTR: tl.constexpr, LEN_PER_BATCH: tl.constexpr, DIRECT: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
    ):
        """One (batch, split, row block): partial softmax(q.K^T) @ c over keys of this split.

        Rows m = t * H + h of the flattened query [B, T*H, r]; qk_scale = scale * log2(e).
        Writes the split's normalized partial output and its log2-sum-exp, or (DIRECT, a single
        split) the final output.
        """
        pid_b = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)

        if LEN_FROM_PTR:
            if LEN_PER_BATCH:
                S = tl.load(LENS + pid_b).to(tl.int32)
            else:
                S = tl.load(LENS).to(tl.int32)
            # seq_len is then the capacity: a device length past it reads no key beyond it
            S_keys = tl.minimum(S, seq_len)
        else:
            S = seq_len
            S_keys = S

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_DR)
        offs_n = tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        r_ok = offs_r < R
        d_ok = offs_d < DR
        # number of keys row m sees: S - T + t + 1 with t = m // H (none past the keys there are)
        kv_lim = tl.minimum(S - T + offs_m // H + 1, S_keys)

        q = tl.load(Q + pid_b * stride_qb + offs_m[:, None] * stride_qm + offs_r[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)                  # [BM, BR]
        qr = tl.load(QR + pid_b * stride_qrb + offs_m[:, None] * stride_qrm + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)                 # [BM, BD]

        # this split's key range, a whole number of tiles
        chunk = tl.cdiv(tl.cdiv(S_keys, num_splits), BLOCK_N) * BLOCK_N
        start = pid_s * chunk
        end = tl.minimum(start + chunk, S_keys)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        c_base = C + pid_b * stride_cb
        kr_base = KR + pid_b * stride_krb
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            n_ok = n < end
            c = tl.load(c_base + n[:, None].to(tl.int64) * stride_cs + offs_r[None, :],
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)              # [BN, BR]
            kr = tl.load(kr_base + n[:, None].to(tl.int64) * stride_krs + offs_d[None, :],
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)             # [BN, BD]
            s = _dot(q, tl.trans(c), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, UPCAST)
            s = _dot(qr, tl.trans(kr), s, IEEE, UPCAST)
            s = s * qk_scale
            s = tl.where(n[None, :] < kv_lim[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p.to(c.dtype), c, acc * alpha[:, None], IEEE, UPCAST)
            m_i = m_new

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        st_mask = m_ok[:, None] & r_ok[None, :]
        if DIRECT:
            tl.store(OUT + pid_b * stride_ob + offs_m[:, None] * stride_om + offs_r[None, :],
                     out.to(OUT.dtype.element_ty), mask=st_mask)
        else:
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(O_PART + pid_b * stride_pb + pid_s * stride_ps + offs_m[:, None] * stride_pm
                     + offs_r[None, :], out, mask=st_mask)
            tl.store(L_PART + pid_b * stride_lb + pid_s * stride_ls + offs_m, lse, mask=m_ok)

    @triton.jit
    def _mla_decode_merge_kernel(
        O_PART, L_PART, OUT,
        stride_pb, stride_ps, stride_pm,
        stride_lb, stride_ls,
        stride_ob, stride_om,
        num_splits,
        R: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """out[b, m, r-block] = sum_s 2^(lse_s - lse) * o_s over the splits (log-sum-exp merge).
        All splits are loaded at once ([BLOCK_SPLIT, BLOCK_R] tile): no serial chain of loads."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        pid_r = tl.program_id(2)
        offs_s = tl.arange(0, BLOCK_SPLIT)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        s_ok = offs_s < num_splits
        r_ok = offs_r < R
        lse = tl.load(L_PART + pid_b * stride_lb + pid_m + offs_s * stride_ls, mask=s_ok,
                      other=float("-inf"))                                          # [BS]
        lmax = tl.max(lse, 0)
        lmax = tl.where(lmax == float("-inf"), 0.0, lmax)
        w = tl.exp2(lse - lmax)                                                     # 0 if empty
        o = tl.load(O_PART + pid_b * stride_pb + pid_m * stride_pm
                    + offs_s[:, None] * stride_ps + offs_r[None, :],
                    mask=s_ok[:, None] & r_ok[None, :], other=0.0)                  # [BS, BR]
        acc = tl.sum(w[:, None] * o, 0)
        out = acc / tl.maximum(tl.sum(w, 0), 1e-30)
        tl.store(OUT + pid_b * stride_ob + pid_m * stride_om + offs_r, out.to(OUT.dtype.element_ty),
                 mask=r_ok)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_MAX_SPLITS = 256
_MIN_SPLIT_TILES = 2
_MAX_R = 1024
_MAX_DR = 256


def _block_m(M: int, R: int) -> int:
    """Rows per program: all heads of a token share a tile; fp32 acc [BM, BR] must fit registers."""
    bm = 16 if M <= 16 or R > 256 else 32
    return bm


def _merge_block_r(block_split: int, block_r: int) -> int:
    """Columns per merge program: the [splits, columns] fp32 tile stays at 4096 elements (32 per
    thread at 4 warps)."""
    return max(16, min(block_r, 4096 // block_split))


def _interp_upcast(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET the Triton 3.6 interpreter's tl.dot is wrong for bf16 operands."""
    return dtype == torch.bfloat16 and interpreter_active()


@functools.lru_cache(maxsize=16)
def _num_sms_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """SM count of a CUDA device; an H100's 132 elsewhere (interpreter runs, planning)."""
    if device.type == "cuda":
        return _num_sms_cuda(device.index if device.index is not None
                             else torch.cuda.current_device())
    return 132


def mla_decode_num_splits(B: int, M: int, S: int, R: int, device: torch.device,
                          block_n: int = 32) -> int:
    """Default sequence split count: at most one wave of programs (the shipped configs fit one
    program per SM by registers, so a second, partial wave would idle most SMs), each split at
    least two key tiles. Few programs (B=1) are latency-bound: two tiles per split put a 4k
    cache on 64 SMs instead of 16 (eight tiles per split leave most SMs idle); the
    fp32 partial each split writes ([M, R], about half the bytes of its two tiles) only matters
    where the grid is already full, and there ``want`` is small anyway."""
    programs = B * triton.cdiv(M, _block_m(M, R))
    want = max(1, _num_sms(device) // programs)
    most = max(1, triton.cdiv(S, _MIN_SPLIT_TILES * block_n))
    return int(max(1, min(want, most, _MAX_SPLITS)))


def _check(q_lat, q_rope, c_kv, k_rope, seq_len):
    if q_lat.dim() not in (3, 4) or q_rope.dim() != q_lat.dim():
        raise ValueError(f"q_lat/q_rope must both be [B, H, *] or [B, T, H, *], got "
                         f"{tuple(q_lat.shape)} and {tuple(q_rope.shape)}")
    if c_kv.dim() != 3 or k_rope.dim() != 3:
        raise ValueError(f"c_kv must be [B, Smax, r] and k_rope [B, Smax, dr], got "
                         f"{tuple(c_kv.shape)} and {tuple(k_rope.shape)}")
    B, R = q_lat.shape[0], q_lat.shape[-1]
    T = q_lat.shape[1] if q_lat.dim() == 4 else 1
    if q_rope.shape[:-1] != q_lat.shape[:-1]:
        raise ValueError(f"q_rope {tuple(q_rope.shape)} does not match q_lat {tuple(q_lat.shape)}")
    if c_kv.shape[0] != B or k_rope.shape[0] != B or c_kv.shape[1] != k_rope.shape[1]:
        raise ValueError(f"batch/capacity mismatch: q_lat {tuple(q_lat.shape)}, c_kv "
                         f"{tuple(c_kv.shape)}, k_rope {tuple(k_rope.shape)}")
    if c_kv.shape[2] != R or k_rope.shape[2] != q_rope.shape[-1]:
        raise ValueError(f"latent dims differ: q_lat r={R}, c_kv r={c_kv.shape[2]}, q_rope "
                         f"dr={q_rope.shape[-1]}, k_rope dr={k_rope.shape[2]}")
    if not (q_lat.dtype == q_rope.dtype and c_kv.dtype == k_rope.dtype):
        raise ValueError(f"dtype mismatch: q_lat {q_lat.dtype}, q_rope {q_rope.dtype}, "
                         f"c_kv {c_kv.dtype}, k_rope {k_rope.dtype}")
    if isinstance(seq_len, torch.Tensor):
        if seq_len.dim() > 1 or (seq_len.dim() == 1 and seq_len.numel() not in (1, B)):
            raise ValueError(f"seq_len tensor must be 0-d, [1] or [B={B}], got "
                             f"{tuple(seq_len.shape)}")
        if seq_len.dtype.is_floating_point or seq_len.dtype == torch.bool:
            raise ValueError(f"seq_len tensor must be an integer tensor, got {seq_len.dtype}")
    else:
        try:
            if isinstance(seq_len, bool):
                raise TypeError
            S = operator.index(seq_len)
        except TypeError:
            raise ValueError(f"seq_len must be an int or an integer tensor, got "
                             f"{type(seq_len).__name__} {seq_len!r}") from None
        if not T <= S <= c_kv.shape[1]:
            raise ValueError(f"seq_len must satisfy T={T} <= seq_len <= capacity "
                             f"{c_kv.shape[1]}, got {S}")


def _unsupported(q_lat, q_rope, c_kv, k_rope, seq_len) -> str | None:
    if triton is None:
        return "triton is not importable"
    if q_lat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q_lat.dtype} is not supported"
    if c_kv.dtype != q_lat.dtype:
        return f"q_lat dtype {q_lat.dtype} differs from cache dtype {c_kv.dtype}"
    if q_lat.shape[-1] > _MAX_R or q_rope.shape[-1] > _MAX_DR:
        return f"r={q_lat.shape[-1]} > {_MAX_R} or dr={q_rope.shape[-1]} > {_MAX_DR}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_lat, q_rope, c_kv, k_rope)):
        return "the absorbed decode kernel is inference-only (an input requires grad)"
    if isinstance(seq_len, torch.Tensor) and seq_len.device != c_kv.device:
        return f"seq_len tensor is on {seq_len.device}, cache on {c_kv.device}"
    if c_kv.stride(-1) != 1 or k_rope.stride(-1) != 1:
        return "c_kv / k_rope last dim must be contiguous"
    return None


def mla_decode_attention_triton(q_lat: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                                k_rope: torch.Tensor, seq_len: int | torch.Tensor, scale: float,
                                num_splits: int | None = None, block_n: int | None = None,
                                num_warps: int | None = None) -> torch.Tensor:
    """Flash-decoding over the latent cache (no dispatch; see :func:`mla_decode_attention`)."""
    _check(q_lat, q_rope, c_kv, k_rope, seq_len)
    squeeze = q_lat.dim() == 3
    if squeeze:
        q_lat, q_rope = q_lat.unsqueeze(1), q_rope.unsqueeze(1)
    B, T, H, R = q_lat.shape
    DR = q_rope.shape[-1]
    M = T * H
    Smax = c_kv.shape[1]
    q = q_lat.reshape(B, M, R)
    qr = q_rope.reshape(B, M, DR)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if qr.stride(-1) != 1:
        qr = qr.contiguous()
    if isinstance(seq_len, torch.Tensor):
        lens = seq_len.reshape(-1).to(torch.int32)
        len_ptr, per_batch, s_int = lens, lens.numel() > 1, Smax
        s_for_split = Smax
    else:
        len_ptr, per_batch, s_int = c_kv, False, int(seq_len)  # LENS unused
        s_for_split = s_int
    if block_n is None:
        block_n = 16 if q.dtype == torch.float32 else 32   # fp32: keeps registers spill-free
    BLOCK_M = _block_m(M, R)
    BLOCK_R = _p2(R)
    BLOCK_DR = _p2(DR)
    if num_splits is None:
        num_splits = mla_decode_num_splits(B, M, s_for_split, R, c_kv.device, block_n)
    num_splits = int(max(1, min(num_splits, _MAX_SPLITS)))
    if num_warps is None:
        num_warps = 8 if BLOCK_R >= 256 else 4
    out = torch.empty(B, M, R, device=q.device, dtype=q.dtype)
    direct = num_splits == 1
    if direct:
        o_part = out
        l_part = out
        sp = (0, 0, 0)
        sl = (0, 0)
    else:
        o_part = torch.empty(B, num_splits, M, R, device=q.device, dtype=torch.float32)
        l_part = torch.empty(B, num_splits, M, device=q.device, dtype=torch.float32)
        sp = (o_part.stride(0), o_part.stride(1), o_part.stride(2))
        sl = (l_part.stride(0), l_part.stride(1))
    grid = (B, num_splits, triton.cdiv(M, BLOCK_M))
    _mla_decode_split_kernel[grid](
        q, qr, c_kv, k_rope, len_ptr, out, o_part, l_part,
        q.stride(0), q.stride(1), qr.stride(0), qr.stride(1),
        c_kv.stride(0), c_kv.stride(1), k_rope.stride(0), k_rope.stride(1),
        out.stride(0), out.stride(1), *sp, *sl,
        M, H, T, s_int, num_splits, float(scale) * _LOG2E,
        R=R, DR=DR, LEN_FROM_PTR=isinstance(seq_len, torch.Tensor), LEN_PER_BATCH=per_batch,
        DIRECT=direct,
        IEEE=q.dtype == torch.float32, UPCAST=_interp_upcast(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=BLOCK_R, BLOCK_DR=BLOCK_DR,
        num_warps=num_warps, num_stages=2 if q.dtype == torch.float32 else 3,
    )
    if not direct:
        block_split = _p2(num_splits, 2)
        block_rm = _merge_block_r(block_split, BLOCK_R)
        _mla_decode_merge_kernel[(B, M, triton.cdiv(R, block_rm))](
            o_part, l_part, out, *sp, *sl, out.stride(0), out.stride(1), num_splits,
            R=R, BLOCK_SPLIT=block_split, BLOCK_R=block_rm, num_warps=4,
        )
    out = out.view(B, T, H, R)
    return out.squeeze(1) if squeeze else out


def mla_decode_attention(q_lat: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                         k_rope: torch.Tensor, seq_len: int | torch.Tensor, scale: float,
                         num_splits: int | None = None) -> torch.Tensor:
    """Attention over the latent cache: ``softmax((q_lat c^T + q_rope k_rope^T) * scale) @ c``.

    Args:
        q_lat:   [B, H, r] (or [B, T, H, r]) absorbed queries ``q_nope @ W_UK``.
        q_rope:  [B, H, dr] (or [B, T, H, dr]) rotary query part (RoPE applied).
        c_kv:    [B, Smax, r] RMS-normalized latent cache (last dim contiguous).
        k_rope:  [B, Smax, dr] shared rotary key cache (RoPE applied).
        seq_len: valid length S (int, or int32 tensor 0-d / [B] on the cache's device, so a CUDA
                 graph can replay with new lengths; then pass a fixed ``num_splits`` too).
                 Query token t of T sees keys 0 .. S - T + t. Keys >= S are never read, nor
                 any past the capacity (a tensor length is not checked on the host: one past
                 the capacity attends to every key there is).
        scale:   softmax scale (open-mythos: ``(nope_dim + rope_dim) ** -0.5``).
        num_splits: sequence splits (default: about 2 programs per SM).

    Returns:
        out_lat, shaped and typed like q_lat.
    """
    _check(q_lat, q_rope, c_kv, k_rope, seq_len)
    impl = choose("mla_decode_attention", q_lat, q_rope, c_kv, k_rope,
                  supported=_unsupported(q_lat, q_rope, c_kv, k_rope, seq_len))
    if impl == "triton":
        if _compiling():  # an opaque op for torch.compile: no graph break
            lens = seq_len if isinstance(seq_len, torch.Tensor) else torch.full(
                (1,), int(seq_len), dtype=torch.int32, device=c_kv.device)
            splits = num_splits if num_splits is not None else mla_decode_num_splits(
                q_lat.shape[0], q_lat.shape[-2] * (q_lat.shape[1] if q_lat.dim() == 4 else 1),
                c_kv.shape[1], c_kv.shape[2], c_kv.device)
            return torch.ops.mythos.mla_decode_attention(q_lat, q_rope, c_kv, k_rope, lens,
                                                         float(scale), int(splits))
        return mla_decode_attention_triton(q_lat, q_rope, c_kv, k_rope, seq_len, scale,
                                           num_splits=num_splits)
    return mla_decode_attention_reference(q_lat, q_rope, c_kv, k_rope, seq_len, scale)


@torch.library.custom_op("mythos::mla_decode_attention", mutates_args=())
def _mla_decode_attention_op(q_lat: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                             k_rope: torch.Tensor, seq_len: torch.Tensor, scale: float,
                             num_splits: int) -> torch.Tensor:
    """The Triton decode as a torch.library op (used under torch.compile; inference only)."""
    return mla_decode_attention_triton(q_lat, q_rope, c_kv, k_rope, seq_len, scale,
                                       num_splits=num_splits)


@_mla_decode_attention_op.register_fake
def _(q_lat, q_rope, c_kv, k_rope, seq_len, scale, num_splits):
    # contiguous, as the kernel writes it (empty_like would copy a permuted q_lat's strides, and
    # inductor's stride assertion then fails on the real output)
    return q_lat.new_empty(q_lat.shape)


def mla_decode(q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
               k_rope: torch.Tensor, w_up: torch.Tensor, nope_dim: int, v_dim: int,
               seq_len: int | torch.Tensor, scale: float,
               num_splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode: equals :func:`mla_decode_reference` (the decompressed path).

    q_nope: [B, T, H, dn]; q_rope: [B, T, H, dr]; c_kv: [B, Smax, r]; k_rope: [B, Smax, dr];
    w_up: kv_up.weight [H*(dn+dv), r] -> out [B, T, H, dv] (then ``wo(out.reshape(B, T, -1))``).
    """
    if q_nope.dim() != 4:
        raise ValueError(f"q_nope must be [B, T, H, dn], got {tuple(q_nope.shape)}")
    H = q_nope.shape[2]
    if q_nope.shape[-1] != nope_dim:
        raise ValueError(f"q_nope last dim {q_nope.shape[-1]} != nope_dim {nope_dim}")
    args = (q_nope, q_rope, c_kv, k_rope, w_up, nope_dim, v_dim, seq_len, scale, num_splits)
    form = cpu_form("mla_decode", args)          # mythos_kernels.cpu.mla_decode
    if form is not None:
        return form(*args)
    w_uk, w_uv = mla_absorb_weights(w_up, H, nope_dim, v_dim)               # [H, dn|dv, r]
    q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk.to(q_nope.dtype))   # [B, T, H, r]
    out_lat = mla_decode_attention(q_lat, q_rope.to(q_lat.dtype), c_kv, k_rope, seq_len, scale,
                                   num_splits=num_splits)                    # [B, T, H, r]
    return torch.einsum("bthr,hvr->bthv", out_lat, w_uv.to(out_lat.dtype))  # [B, T, H, dv]


# ----------------------------------------------------------------------------------------------
# Compile-report registration
# ----------------------------------------------------------------------------------------------

def _register() -> None:
    if triton is None:  # pragma: no cover
        return
    split_sig_base = {
        "Q": None, "QR": None, "C": None, "KR": None, "LENS": "*i32", "OUT": None,
        "O_PART": "*fp32", "L_PART": "*fp32",
        "stride_qb": "i32", "stride_qm": "i32", "stride_qrb": "i32", "stride_qrm": "i32",
        "stride_cb": "i32", "stride_cs": "i32", "stride_krb": "i32", "stride_krs": "i32",
        "stride_ob": "i32", "stride_om": "i32",
        "stride_pb": "i32", "stride_ps": "i32", "stride_pm": "i32",
        "stride_lb": "i32", "stride_ls": "i32",
        "M": "i32", "H": "i32", "T": "i32", "seq_len": "i32",
        "num_splits": "i32", "qk_scale": "fp32",
    }
    configs = []
    for dt, ty in (("bf16", "*bf16"), ("fp16", "*fp16"), ("fp32", "*fp32")):
        for (R, DR, bm, warps, direct, from_ptr) in ((512, 64, 16, 8, False, False),
                                                     (512, 64, 16, 8, True, True),
                                                     (128, 64, 32, 4, False, False)):
            if dt != "bf16" and R != 512:
                continue
            sig = {k: (ty if v is None else v) for k, v in split_sig_base.items()}
            bn = 16 if dt == "fp32" else 32
            configs.append(KernelConfig(
                name=f"{dt}-r{R}-dr{DR}-BM{bm}-BN{bn}-w{warps}-{'direct' if direct else 'split'}",
                signature=sig,
                constexprs={"R": R, "DR": DR, "LEN_FROM_PTR": from_ptr, "LEN_PER_BATCH": from_ptr,
                                "DIRECT": direct, "IEEE": dt == "fp32", "UPCAST": False, "BLOCK_M": bm,
                                "BLOCK_N": bn, "BLOCK_R": _p2(R), "BLOCK_DR": _p2(DR)},
                num_warps=warps, num_stages=2 if dt == "fp32" else 3, expect_hgmma=False))
    register_kernel("mla_decode_split", _mla_decode_split_kernel, configs)
    merge_configs = []
    for dt, ty in (("bf16", "*bf16"), ("fp32", "*fp32")):
        merge_configs.append(KernelConfig(
            name=f"{dt}-r512-splits256",
            signature={"O_PART": "*fp32", "L_PART": "*fp32", "OUT": ty,
                       "stride_pb": "i32", "stride_ps": "i32", "stride_pm": "i32",
                       "stride_lb": "i32", "stride_ls": "i32", "stride_ob": "i32",
                       "stride_om": "i32", "num_splits": "i32"},
            constexprs={"R": 512, "BLOCK_SPLIT": 256, "BLOCK_R": _merge_block_r(256, 512)},
            num_warps=4, num_stages=1))
        merge_configs.append(KernelConfig(
            name=f"{dt}-r512-splits64",
            signature=dict(merge_configs[-1].signature),
            constexprs={"R": 512, "BLOCK_SPLIT": 64, "BLOCK_R": _merge_block_r(64, 512)},
            num_warps=4, num_stages=1))
    register_kernel("mla_decode_merge", _mla_decode_merge_kernel, merge_configs)


_register()

__all__ = [
    "mla_absorb_weights", "mla_decode", "mla_decode_attention", "mla_decode_attention_reference",
    "mla_decode_attention_triton",
    "mla_decode_num_splits", "mla_decode_reference",
]
