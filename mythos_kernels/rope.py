"""Rotary position embeddings (Su et al., 2021) in open-mythos's complex form.

Pairs of adjacent features ``(x[2i], x[2i+1])`` are read as a complex number and multiplied by
``freqs_cis[pos, i] = exp(1j * pos * theta^(-2i/d))``; computed in fp32, cast back to x's dtype.
"""

from __future__ import annotations

import torch

from ._dispatch import _compiling, choose


def precompute_rope_freqs(dim: int, max_len: int, theta: float = 500000.0) -> torch.Tensor:
    """complex64 [max_len, dim//2] phasors, identical to open-mythos's."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope_reference(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, d] (d even); freqs_cis: complex [T, d//2] already sliced to the positions."""
    xf = x.float()
    # view_as_complex needs even strides and offset; under torch.compile always copy (the
    # compiler fuses the copy; reading storage_offset() there would break the graph)
    if _compiling() or xf.storage_offset() % 2 or not xf.is_contiguous():
        xf = xf.clone(memory_format=torch.contiguous_format)
    xc = torch.view_as_complex(xf.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(0).unsqueeze(2)).flatten(-2).to(x.dtype)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, d] by freqs_cis [T, d//2]. No Triton kernel yet: reference everywhere."""
    choose("rope", x, has_kernel=False)
    return apply_rope_reference(x, freqs_cis)
