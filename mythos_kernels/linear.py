"""Linear layers: ``dense`` (every projection of the model, ``F.linear``) and the LM head
``logits = x @ W^T`` (W the tied embedding, [V, D]). No Triton kernel: cuBLAS serves the GPU.
On the CPU without autograd the registered CPU forms (:mod:`mythos_kernels.cpu.linear`: split
few-row products, oneDNN, the head's transposed copy) serve where they apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import cpu_form, pick

VOCAB_BLOCK = 4096   # the head's CPU forms serve vocabularies over this (column blocks of it)


def dense_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., K], weight [N, K] -> [..., N]."""
    return F.linear(x, weight, bias)


def lm_head_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., D], weight [V, D] -> [..., V]: ``x @ weight^T``."""
    return F.linear(x, weight)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dense_reference`, or the first enabled CPU form of ``dense`` that serves the call.
    Called for every projection, so it asks the registry directly and is not recorded."""
    form = cpu_form("dense", (x, weight, bias))
    if form is not None:
        return form(x, weight, bias)
    return F.linear(x, weight, bias)


def lm_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dispatching entry point of :func:`lm_head_reference` (no Triton kernel)."""
    _, form = pick("lm_head", x, weight, has_kernel=False, cpu_args=(x, weight))
    if form is not None:
        return form(x, weight)
    return lm_head_reference(x, weight)
