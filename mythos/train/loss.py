"""The language-model loss on the model's final norm and tied head, and answer accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mythos.model import OpenMythos

from .data import IGNORE


def _head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head ``h [N, D] @ weight[V, D].T`` against targets [N]."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="mean")


def _selected(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of h [B, T, D] and targets [B, T] that carry a target (others take no head work)."""
    flat_t = targets.reshape(-1)
    keep = (flat_t != IGNORE).nonzero().squeeze(-1)
    return h.reshape(-1, h.shape[-1]).index_select(0, keep), flat_t.index_select(0, keep)


def lm_loss(model: OpenMythos, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with a target (``targets != -100``) of the logits
    ``head(norm(h))``; h [B, T, D] is the coda output (``train_forward(...).h``)."""
    hs, ts = _selected(h, targets)
    return _head_loss(model.norm(hs), model.head.weight, ts)


@torch.no_grad()
def answer_accuracy(model: OpenMythos, h: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(correct, total) argmax predictions over the positions with a target."""
    hs, ts = _selected(h, targets)
    pred = F.linear(model.norm(hs), model.head.weight).argmax(-1)
    return int((pred == ts).sum()), int(ts.numel())
