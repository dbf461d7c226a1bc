"""Multi-latent attention (DeepSeek-V2) pieces that the kernels replace.

Latent decompression: from the normalized latent cache ``c [B, S, r]`` and the shared rope key
``k_rope [B, S, dr]``, with ``W_up = kv_up.weight [H*(dn+dv), r]``::

    kv            = c @ W_up^T  -> [B, S, H, dn + dv]
    K[b, s, h]    = concat(kv[..., :dn], k_rope[b, s])       # [B, S, H, dn + dr]
    V[b, s, h]    = kv[..., dn:]                             # [B, S, H, dv]
"""

from __future__ import annotations

import torch

from ._dispatch import choose


def mla_decompress_reference(c_kv: torch.Tensor, k_rope: torch.Tensor, w_up: torch.Tensor,
                             n_heads: int, nope_dim: int, v_dim: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv: [B, S, r] (already RMS-normalized), k_rope: [B, S, dr], w_up: [H*(dn+dv), r]
    -> (K [B, S, H, dn+dr], V [B, S, H, dv])."""
    B, S, _ = c_kv.shape
    kv = torch.nn.functional.linear(c_kv, w_up).view(B, S, n_heads, nope_dim + v_dim)
    k_nope, v = kv.split([nope_dim, v_dim], dim=-1)
    k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, n_heads, k_rope.shape[-1])], dim=-1)
    return k, v


def mla_decompress(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim):
    """Dispatching entry point for :func:`mla_decompress_reference`."""
    choose("mla_decompress", c_kv, k_rope, w_up, has_kernel=False)
    return mla_decompress_reference(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim)
