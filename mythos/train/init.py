"""Weight initialisation for training from scratch.

``open-mythos`` keeps the weights :class:`~mythos.OpenMythos` is built with: every matrix and the
embedding N(0, 0.02), GPT-2's scale, made for widths near a thousand. At the widths of small
experiments (dim ~50) it leaves the logits and attention scores nearly constant and a model sits
on a long plateau at chance (a 1-hop lookup at dim 48 was still at chance after 1,500 steps).
``fan-in`` draws every projection N(0, 1/fan_in) (the matrix keeps its input's scale) and the
tied embedding N(0, 1), PyTorch's own default scales; LoRA, norms, the LTI and halting
parameters keep their constructor values (the halting head
starts near p = 0.5 per loop, as in open-mythos).
"""

from __future__ import annotations

import torch
from torch import nn

from mythos.modules import MoEFFN

INIT_SCHEMES = ("open-mythos", "fan-in")


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str = "open-mythos") -> nn.Module:
    """Re-draw ``model``'s weights in place under ``scheme`` (one of :data:`INIT_SCHEMES`) from
    torch's global generator; ``open-mythos`` leaves them as built. Returns ``model``."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "open-mythos":
        return model
    tied = model.embed.weight
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight is not tied and not (".lora." in f".{name}." or
                                                                         name.endswith("act.halt")):
            nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
        elif isinstance(mod, MoEFFN):             # stacked experts: [E, in, out]
            nn.init.normal_(mod.w13, std=mod.w13.shape[1] ** -0.5)
            nn.init.normal_(mod.w2, std=mod.w2.shape[1] ** -0.5)
    nn.init.normal_(model.embed.weight, std=1.0)
    return model


__all__ = ["INIT_SCHEMES", "init_weights"]
