"""CPU inference form of absorbed MLA decode (:func:`mythos_kernels.mla_decode.mla_decode`):
the two absorptions as per-head bmms (einsum's permutes and checks cost more than the products
at decode sizes). Variant ``mla_cpu`` (form of ``mla_decode``)."""

from __future__ import annotations

import torch

from .._dispatch import cpu_inference, register_cpu
from ..mla_decode import mla_absorb_weights, mla_decode_attention


def _cpu_inference(q_nope, q_rope, c_kv, k_rope, w_up, *_) -> bool:
    """One dtype and :func:`cpu_inference`: :func:`mla_decode_cpu` serves."""
    return (q_nope.dtype == q_rope.dtype == c_kv.dtype == w_up.dtype
            and cpu_inference(q_nope, q_rope, c_kv, w_up))


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, a], w [H, a, b] -> [B, T, H, b] with ``out[:, :, h] = x[:, :, h] @ w[h]``."""
    B, T, H, a = x.shape
    y = torch.bmm(x.permute(2, 0, 1, 3).reshape(H, B * T, a), w)             # [H, B*T, b]
    return y.view(H, B, T, -1).permute(1, 2, 0, 3)


def mla_decode_cpu(q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                   k_rope: torch.Tensor, w_up: torch.Tensor, nope_dim: int, v_dim: int,
                   seq_len: int | torch.Tensor, scale: float,
                   num_splits: int | None = None) -> torch.Tensor:
    """:func:`~mythos_kernels.mla_decode.mla_decode` with per-head bmm absorptions (arguments
    checked by the caller)."""
    w_uk, w_uv = mla_absorb_weights(w_up, q_nope.shape[2], nope_dim, v_dim)  # [H, dn|dv, r]
    q_lat = _per_head(q_nope, w_uk)                                            # [B, T, H, r]
    out_lat = mla_decode_attention(q_lat, q_rope, c_kv, k_rope, seq_len, scale,
                                   num_splits=num_splits)
    return _per_head(out_lat, w_uv.transpose(1, 2))                            # [B, T, H, dv]


register_cpu("mla_decode", "mla_cpu", mla_decode_cpu, serves=_cpu_inference,
             doc="absorbed decode's two absorptions as per-head bmms (off: einsums)")
