"""The language-model loss on the model's final norm and tied head, and answer accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mythos_kernels as K
from mythos.model import OpenMythos

from .data import IGNORE
from .recurrence import ForwardOut


def _head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head ``h [N, D] @ weight[V, D].T`` against targets [N]."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="mean")


def _selected(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of h [B, T, D] and targets [B, T] that carry a target (others take no head work)."""
    flat_t = targets.reshape(-1)
    keep = (flat_t != IGNORE).nonzero().squeeze(-1)
    return h.reshape(-1, h.shape[-1]).index_select(0, keep), flat_t.index_select(0, keep)


def lm_loss(model: OpenMythos, h: torch.Tensor | ForwardOut, targets: torch.Tensor,
            fused: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the positions with a target (``targets != -100``) of the logits
    ``head(norm(h))``; h [B, T, D] is the coda output: ``train_forward``'s :class:`ForwardOut`
    (best: its tied-weight gradient sink is used, see :func:`train_forward`) or its ``.h``.

    ``fused=True`` computes it with :func:`mythos_kernels.linear_cross_entropy` (the logits are
    never whole: chunked on the CPU, the Triton row kernel on CUDA); ``fused=False`` builds the
    full logits and calls ``F.cross_entropy`` (the same value up to fp32 rounding).
    """
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
    weight, sink = model.head.weight, None
    if isinstance(h, ForwardOut):
        if h.head_weight is not None:
            weight, sink = h.head_weight, h.grad_sink
        h = h.h
    hs, ts = _selected(h, targets)
    hs = model.norm(hs)                                                      # [N, D]
    if not fused:
        return _head_loss(hs, weight, ts)
    return K.linear_cross_entropy(hs, weight, ts, ignore_index=IGNORE, grad_sink=sink).float()


@torch.no_grad()
def answer_accuracy(model: OpenMythos, h: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions over the positions with a target."""
    hs, ts = _selected(h, targets)
    pred = F.linear(model.norm(hs), model.head.weight).argmax(-1)
    return int((pred == ts).sum()), int(ts.numel())
