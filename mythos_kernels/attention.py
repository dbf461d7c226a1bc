"""Scaled dot-product attention with a causal mask aligned to the end of the key sequence.

``out[b, h, i] = softmax(q[b, h, i] . k[b, g(h), :S]^T * scale + mask) @ v[b, g(h)]`` where query i
(absolute position S - T + i) sees keys j <= S - T + i. This is what open-mythos computes for a
prefill (T == S) and for one-token decode (T == 1); for a multi-token chunk appended to a
non-empty cache it is the correct causal mask (open-mythos's T x T mask fails there).

Backends: flash-attn when installed (CUDA, bf16/fp16, equal head dims), else PyTorch SDPA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._dispatch import _transformed, choose

try:  # optional extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - flash-attn is not installable here
    _flash_attn_func = None


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, S] mask (True = attend) for queries at the last T of S positions; None if T==1."""
    if T == 1:
        return None
    i = torch.arange(T, device=device).unsqueeze(1) + (S - T)
    return torch.arange(S, device=device).unsqueeze(0) <= i


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        causal: bool = True, dropout_p: float = 0.0,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, T, Hq, dq], k: [B, S, Hkv, dq], v: [B, S, Hkv, dv] -> [B, T, Hq, dv].

    Hkv must divide Hq (grouped-query attention: query head h reads kv head h // (Hq // Hkv)).
    ``attn_mask`` replaces the causal mask when given: bool (True = attend) or additive float,
    broadcastable to [B, Hq, T, S] (open-mythos's components take an additive [1, 1, T, S] mask;
    the static decode step a bool [T, S] one). ``causal=False`` and no mask: every query sees
    every key.
    """
    B, T, Hq, dq = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = dq ** -0.5 if scale is None else scale
    if attn_mask is not None:
        causal = False
        if attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
    if (attn_mask is None and _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and dq == v.shape[-1] and (not causal or T == S or T == 1)):
        return _flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale,
                                causal=causal and T > 1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hkv != Hq:
        kt = kt.repeat_interleave(Hq // Hkv, dim=1)
        vt = vt.repeat_interleave(Hq // Hkv, dim=1)
    # forward-mode AD (torch.func.jvp, dual tensors): SDPA's fused kernels have no formula for
    # it, its math backend (plain matmuls and softmax) has
    with sdpa_kernel(SDPBackend.MATH) if _transformed() else contextlib.nullcontext():
        if causal and T == S and T > 1:
            out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p,
                                                 is_causal=True, scale=scale)
        else:
            mask = causal_mask(T, S, q.device) if causal else attn_mask
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                 dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)



def attention(q, k, v, scale=None, causal=True, dropout_p=0.0, attn_mask=None):
    """Dispatching entry point for :func:`attention_reference`."""
    choose("attention", q, k, v, has_kernel=False)
    return attention_reference(q, k, v, scale, causal, dropout_p, attn_mask)


__all__ = ["attention", "attention_reference", "causal_mask"]
