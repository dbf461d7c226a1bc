"""Linear layers on the CPU: ``dense`` (every projection of the model) and the LM head
``logits = x @ W^T`` (W the tied embedding, [V, D]) for large vocabularies.

A product of a few rows (decode) is a matrix-vector product bound by reading the weight, and MKL
runs it on one core at about 10 GB/s on this project's 2-core machine. ``dense`` with at most
``SPLIT_ROWS`` rows, on the CPU and without autograd, multiplies the two row halves of the weight
in one ``bmm`` instead, which runs one half per core: measured by tools/cpu_linear_probe.py
(weights read from memory, rows in bench/results/cpu/linear_probe.jsonl) 1.4-2.1x faster for one
row at N x K from 160 x 512 to 2048 x 512 and 1.1-1.5x at 8 rows. No copy is made; each output is
the same dot product, summed in MKL's matrix-vector order, so results may differ from
``F.linear`` in the last bits.

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
SPLIT_ROWS = 8       # at most this many rows: the split (two-core) matrix-vector product
SPLIT_MIN_OUT = 64   # smaller weights: the bmm's own overhead outweighs the second core
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


def _split_rows_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``dense`` takes the split matrix-vector path (see the module docstring)."""
    N = weight.shape[0]
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and N % 2 == 0 and N >= SPLIT_MIN_OUT and weight.is_contiguous()
            and 0 < x.numel() <= SPLIT_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling())


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., K], weight [N, K] -> [..., N]. No Triton kernel
    (cuBLAS serves the GPU); a CPU product of at most ``SPLIT_ROWS`` rows without autograd
    multiplies the weight's two row halves in one bmm, one per core."""
    if not _split_rows_ok(x, weight):
        return F.linear(x, weight, bias)
    N, Kd = weight.shape
    x2 = x.reshape(-1, Kd)
    M = x2.shape[0]
    halves = weight.view(2, N // 2, Kd).transpose(1, 2)              # [2, K, N/2], no copy
    y = torch.bmm(x2.expand(2, M, Kd), halves)                        # [2, M, N/2]
    y = y.view(M, N) if M == 1 else y.transpose(0, 1).reshape(M, N)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], N)
