"""Aux-loss-free load balancing (DeepSeek-V3): expert loads counted over every loop iteration
and micro-batch of a step, and the router-bias update applied after the optimizer step."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import mythos_kernels as K
from mythos._validate import check_float
from mythos.model import MoEFFN


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    """Every MoE layer of ``model`` (the recurrent block's, shared by all loops)."""
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


class LoadTracker:
    """Counts the tokens routed to each expert of every MoE layer, over every forward call
    (so every loop iteration) while attached: a forward hook reads the layer's chosen experts.

    Calls made inside a backward pass (activation checkpointing recomputing an iteration) are
    not counted again. Use as a context manager or ``attach()`` / ``detach()``; ``reset()``
    zeroes the counts (the trainer does so each step)::

        with LoadTracker(model) as loads:
            loss = ...; loss.backward(); opt.step()
            update_router_bias(model, loads.counts)
    """

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("LoadTracker: the model has no MoEFFN layer")
        self.counts: dict[MoEFFN, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, module: MoEFFN, inputs, output) -> None:
        if torch._C._current_graph_task_id() != -1:   # inside backward: a checkpoint recompute
            return
        c = K.expert_counts(module._last_idx, module.n_experts)
        prev = self.counts.get(module)
        self.counts[module] = c if prev is None else prev + c

    def attach(self) -> "LoadTracker":
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def detach(self) -> None:
        for hd in self._handles:
            hd.remove()
        self._handles = []

    def reset(self) -> None:
        self.counts = {}

    def __enter__(self) -> "LoadTracker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


@torch.no_grad()
def update_router_bias(model_or_layer: nn.Module, counts, rate: float = 1e-3) -> None:
    """The aux-loss-free bias update of each MoE layer, in place:
    ``bias_e += rate * sign(mean_load - load_e)``, then the bias re-centered to zero mean.

    Args:
        model_or_layer: a model (every MoEFFN in it) or one MoEFFN.
        counts: ``{layer: int [E] loads}`` (``LoadTracker.counts``), or one [E] tensor for a
            single layer. Layers without counts are left alone.
        rate: the update speed gamma (DeepSeek-V3: 1e-3).
    """
    rate = check_float("rate", rate, lo=0)
    layers = [model_or_layer] if isinstance(model_or_layer, MoEFFN) else moe_layers(model_or_layer)
    if isinstance(counts, torch.Tensor):
        if len(layers) != 1:
            raise ValueError(f"counts is one tensor but the model has {len(layers)} MoE layers; "
                             "pass {layer: counts}")
        counts = {layers[0]: counts}
    for layer in layers:
        c = counts.get(layer)
        if c is None:
            continue
        if c.shape != (layer.n_experts,):
            raise ValueError(f"counts must have shape [{layer.n_experts}], got {tuple(c.shape)}")
        load = c.to(device=layer.router_bias.device, dtype=torch.float32)
        step = rate * torch.sign(load.mean() - load)
        bias = layer.router_bias.float() + step
        layer.router_bias.copy_(bias - bias.mean())


def load_stats(counts: Optional[torch.Tensor]) -> dict:
    """``load_max_over_mean`` (1 = balanced) and ``load_entropy`` (normalized to [0, 1]; 1 =
    balanced) of one layer's expert loads; empty without counts."""
    if counts is None:
        return {}
    load = counts.double()
    total = load.sum()
    if total <= 0:
        return {}
    frac = load / total
    ent = -(frac * frac.clamp_min(1e-30).log()).sum() / math.log(max(len(load), 2))
    return {"load_max_over_mean": float(load.max() / load.mean()), "load_entropy": float(ent)}
