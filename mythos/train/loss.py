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


def _selected(h: torch.Tensor | ForwardOut, targets: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of h [B, T, D] (or a ForwardOut's ``.h``) and targets [B, T] that carry a target
    (others take no head work); a ValueError when targets is not an integer tensor of h's
    leading shape (e.g. targets shifted by one against h)."""
    if isinstance(h, ForwardOut):
        h = h.h
    if not isinstance(h, torch.Tensor) or h.dim() < 2:
        raise ValueError(f"h must be the hidden states [..., D] (a tensor or train_forward's "
                         f"ForwardOut), got {type(h).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        what = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an int64 or int32 tensor of token ids, got {what}")
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"targets must have h's leading shape {tuple(h.shape[:-1])} (one "
                         f"target per position, -100 for none), got {tuple(targets.shape)}")
    flat_t = targets.reshape(-1).long()
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
    if isinstance(h, ForwardOut) and h.head_weight is not None:
        weight, sink = h.head_weight, h.grad_sink
    hs, ts = _selected(h, targets)
    if model.head_called():          # hooked, patched, replaced or biased: as the model calls it
        logits = model.logits(hs)
        return F.cross_entropy(logits.float(), ts, ignore_index=IGNORE, reduction="mean")
    hs = model.norm(hs)                                                      # [N, D]
    if not fused:
        return _head_loss(hs, weight, ts)
    return K.linear_cross_entropy(hs, weight, ts, ignore_index=IGNORE, grad_sink=sink).float()


@torch.no_grad()
def answer_accuracy(model: OpenMythos, h: torch.Tensor | ForwardOut, targets: torch.Tensor
                    ) -> tuple[int, int]:
    """(correct, total) argmax predictions over the positions with a target; h as for
    :func:`lm_loss`."""
    hs, ts = _selected(h, targets)
    pred = model.logits(hs).argmax(-1)
    return int((pred == ts).sum()), int(ts.numel())
