"""The LM head ``logits = x @ W^T`` (W the tied embedding, [V, D]) for large vocabularies.

On CPU (MKL), one [M, D] x [D, V] product with V = 32000 runs at about half the rate of the same
product split into column blocks of 4096 (measured on this project's 2-core machine: 158 ms ->
120 ms at M=512, D=512). Each output column is the same dot product either way, so the blocked
version gives the same numbers; it writes each block into the preallocated output.

Decode (at most ``DECODE_ROWS`` rows, CPU, no autograd) is a matrix-vector product bound by
reading W: MKL reads W [V, D] through ``x @ W^T`` at about 11 GB/s on that machine and a
[D, V] copy through ``x @ W_t`` at about 27 GB/s (V=32000, D=512, one row: 6.1 ms -> 2.4 ms).
So decode keeps a transposed copy of the head weight (V x D more memory), made on first use and
remade whenever the weight changes (its version counter or storage moves). The sums run in a
different order, so logits may differ from ``F.linear`` in the last bits.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ._dispatch import choose

VOCAB_BLOCK = 4096
DECODE_ROWS = 64
_TRANSPOSED: dict[int, tuple[int, int, torch.Tensor]] = {}


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous [D, V] copy of ``weight``, cached per tensor until it changes."""
    key = id(weight)
    ent = _TRANSPOSED.get(key)
    ver, ptr = weight._version, weight.data_ptr()
    if ent is None or ent[0] != ver or ent[1] != ptr or ent[2].shape != weight.shape[::-1]:
        if ent is None:
            weakref.finalize(weight, _TRANSPOSED.pop, key, None)
        ent = (ver, ptr, weight.detach().t().contiguous())
        _TRANSPOSED[key] = ent
    return ent[2]


def lm_head_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D], weight [V, D] -> [..., V]. Column-blocked on CPU without autograd."""
    V = weight.shape[0]
    if (x.device.type != "cpu" or V <= VOCAB_BLOCK
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.compiler.is_compiling()):
        return F.linear(x, weight)
    if x.numel() <= DECODE_ROWS * x.shape[-1]:
        if x.dtype != weight.dtype or weight.is_inference():   # inference tensors: no version
            return F.linear(x, weight)
        return x @ _transposed(weight)
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], V, dtype=torch.result_type(x2, weight), device=x.device)
    for i in range(0, V, VOCAB_BLOCK):
        torch.mm(x2, weight[i:i + VOCAB_BLOCK].t(), out=out[:, i:i + VOCAB_BLOCK])
    return out.view(*x.shape[:-1], V)


def lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dispatching entry point (no Triton kernel: cuBLAS serves the GPU)."""
    choose("lm_head", x, weight, has_kernel=False)
    return lm_head_reference(x, weight)
