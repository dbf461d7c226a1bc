"""The recurrent loop for training: loop counts sampled per step, truncated backprop through
the recurrence, ACT on or off, the ponder term and per-iteration activation checkpointing.

:func:`train_forward` runs the model's own modules (embedding, prelude, the recurrent block's
pieces, coda) and, with ``act=True`` and no truncation or checkpointing, computes exactly
``OpenMythos.hidden_states``'s math (same ops in the same order).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _checkpoint

import mythos_kernels as K
from mythos._validate import check_float, check_int
from mythos.model import CAUSAL, OpenMythos, RecurrentBlock
from mythos.modules import MoEFFN
from mythos_kernels.cpu.moe import summed_expert_grads
from mythos_kernels.grad_sink import GradSink, sink_embedding

try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover - torch without distributed
    _FSDPModule = ()

LOOP_SAMPLING = ("fixed", "poisson-lognormal", "uniform")


@dataclass
class LoopSampler:
    """The loop count of each training step, a function of ``(seed, step)`` only (the same on
    every rank and after a resume).

    ``fixed``: always ``mean``. ``poisson-lognormal`` (as Huginn trains):
    ``n = 1 + Poisson(lambda)``, ``log lambda ~ Normal(log(mean - 1) - sigma^2 / 2, sigma)``, so
    ``E[n] = mean``. ``uniform``: uniform in ``[min_loops, max_loops]``. Every mode is clamped
    to ``[min_loops, max_loops]``.
    """

    mode: str = "fixed"
    mean: float = 4
    max_loops: int = 16
    min_loops: int = 1
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in LOOP_SAMPLING:
            raise ValueError(f"loop sampling must be one of {LOOP_SAMPLING}, got {self.mode!r}")
        for name in ("max_loops", "min_loops"):
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        self.mean = check_float("mean", self.mean)
        self.sigma = check_float("sigma", self.sigma, lo=0, lo_open=True)
        if self.min_loops > self.max_loops:
            raise ValueError(f"min_loops ({self.min_loops}) must be <= max_loops ({self.max_loops})")
        if self.mode != "uniform" and not (self.min_loops <= self.mean <= self.max_loops):
            raise ValueError(f"n_loops ({'the loop count' if self.mode == 'fixed' else 'the mean'}) "
                             f"must lie in [min_loops, max_loops] = [{self.min_loops}, "
                             f"{self.max_loops}], got {self.mean!r}")
        if self.mode == "fixed" and self.mean != int(self.mean):
            raise ValueError(f"fixed loop sampling needs an integer n_loops, got {self.mean!r}")

    def __call__(self, seed: int, step: int) -> int:
        if self.mode == "fixed":
            return int(self.mean)
        rng = np.random.default_rng([int(seed), 7, int(step)])
        if self.mode == "uniform":
            n = int(rng.integers(self.min_loops, self.max_loops + 1))
        else:
            mu = math.log(max(self.mean - 1, 1e-3)) - self.sigma ** 2 / 2
            n = 1 + int(rng.poisson(rng.lognormal(mu, self.sigma)))
        return min(max(n, self.min_loops), self.max_loops)


@dataclass
class ForwardOut:
    """What :func:`train_forward` returns.

    h: [B, T, D] coda output (before the final norm and head).
    depth: [B, T] expected halting depth per position, differentiable (see :func:`train_forward`).
    n_loops: iterations actually run (fewer than asked when every position halted).
    head_weight: the tied head weight to use for the loss (an alias of ``model.head.weight``
        whose gradient the embedding shares, see :func:`tied_sink`), or None: use the model's.
    grad_sink: the :class:`~mythos_kernels.grad_sink.GradSink` behind ``head_weight``, or None.
    """

    h: torch.Tensor
    depth: torch.Tensor
    n_loops: int
    head_weight: Optional[torch.Tensor] = None
    grad_sink: Optional[GradSink] = None

    @property
    def ponder(self) -> torch.Tensor:
        """The ponder term: mean expected halting depth (a scalar with gradients)."""
        return self.depth.mean()


def _iteration(rb: RecurrentBlock, modules: bool, t: int, nxt, e, freqs_cis, mask, h, x, h_out,
               cum_p):
    """One loop of ``RecurrentBlock.forward`` (no cache): block, LoRA, LTI + ACT step (with
    ``modules``, each module called: ``RecurrentBlock.calls_modules``)."""
    out = rb.block(x, freqs_cis, mask, None, f"recurrent_loop_{t}", None)
    if modules:
        return rb.step_modules(h, e, out, h_out, cum_p, t)      # next input: at its loop
    delta = rb.lora(out, t)
    if delta.dtype != out.dtype:
        out, delta = out + delta, None
    inj, halt = rb.injection, rb.act.halt
    return K.lti_act_step(h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B, halt.weight,
                          halt.bias, rb.cfg.act_threshold, next_loop=nxt, delta=delta)


def _expert_stacks(rb: RecurrentBlock, checkpoint: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(w13, w2)`` stacks of the recurrent block's MoE layers, whose weight gradients the
    CPU training form sums over the loops (:func:`summed_expert_grads`); none with checkpointing
    (the recomputed loops run outside the summing block) or under FSDP2 (its post-backward hooks
    reduce a block's gradients when that block's backward ends, before the sums arrive)."""
    if checkpoint or any(isinstance(m, _FSDPModule) for m in rb.modules()):
        return []
    return [(m.w13, m.w2) for m in rb.modules() if isinstance(m, MoEFFN)]


def recurrent_forward(rb: RecurrentBlock, h: torch.Tensor, e: torch.Tensor,
                      freqs_cis: torch.Tensor, mask, n_loops: int, act: bool = True,
                      grad_loops: Optional[int] = None, checkpoint: bool = False,
                      halt_check: Optional[Callable[[torch.Tensor, float], bool]] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The recurrent block over ``n_loops`` iterations with the training knobs (no cache).

    Returns ``(output [B, T, D], depth [B, T], loops run)``; see :func:`train_forward`.
    """
    B, T, D = h.shape
    thr = rb.cfg.act_threshold
    acc = K.acc_dtype(h.dtype)
    cum_p = torch.zeros(B, T, device=h.device, dtype=acc)
    h_out = torch.zeros(B, T, D, device=h.device, dtype=acc)
    depth = torch.zeros(B, T, device=h.device, dtype=acc)     # sum_t (t + 1) w_t
    norm = rb.norm
    n_free = 0 if grad_loops is None else max(n_loops - grad_loops, 0)
    grad = torch.is_grad_enabled()
    halted = halt_check or rb.halt_reducer or K.HaltCheck(h.device, lag=rb.halt_lag)
    modules = rb.calls_modules()     # hooked, patched or replaced loop modules: called
    x = None
    run = 0
    with summed_expert_grads(_expert_stacks(rb, checkpoint)):
        for t in range(n_loops):
            with torch.set_grad_enabled(grad and t >= n_free):
                if x is None:   # the first loop, or the first one with a graph after the cut
                    x = (rb.loop_input_modules(h, e, t) if modules
                         else K.loop_input(h, e, t, norm.weight, norm.eps, rb.loop_dim))
                # at the cut the next input is recomputed with a graph (it depends on e)
                fuse = t + 1 < n_loops and t + 1 != n_free
                nxt = (t + 1, norm.weight, norm.eps, rb.loop_dim) if fuse else None
                step = functools.partial(_iteration, rb, modules, t, nxt, e, freqs_cis, mask)
                if checkpoint and grad and t >= n_free:
                    res = _checkpoint(step, h, x, h_out, cum_p, use_reentrant=False)
                else:
                    res = step(h, x, h_out, cum_p)
                prev = cum_p
                h, h_out, cum_p = res[:3]
                x = res[3] if fuse else None
                if act:
                    # the ACT weight of this loop, recovered from cum_p (the step's own up to
                    # rounding), its running mass capped at 1 (a threshold above 1 lets cum_p
                    # pass 1 unhalted)
                    w = torch.where((cum_p >= thr) & (prev < thr), (1.0 - prev).clamp(min=0),
                                    cum_p.clamp(max=1.0) - prev.clamp(max=1.0))
                    depth = depth + (t + 1) * w
            run = t + 1
            if act and t + 1 < n_loops and halted(cum_p, thr):
                break
    if not act:                          # every position ran every loop
        return h, torch.full_like(depth, run), run
    # probability mass that never halted counts at the depth reached
    weight_sum = torch.where(cum_p >= thr, torch.ones_like(cum_p), cum_p.clamp(max=1.0))
    depth = depth + run * (1.0 - weight_sum)
    return h_out.to(h.dtype), depth, run


def _plain_embedding(emb: nn.Module) -> bool:
    """An ``nn.Embedding`` doing a plain lookup (no padding index, max norm, frequency scaling,
    sparse gradient) with no hooks on it: :func:`sink_embedding` computes its forward."""
    return (type(emb) is nn.Embedding and emb.padding_idx is None and emb.max_norm is None
            and not emb.scale_grad_by_freq and not emb.sparse and not emb._forward_hooks
            and not emb._forward_pre_hooks and not emb._backward_hooks
            and not emb._backward_pre_hooks)


def tied_sink(model: OpenMythos) -> Optional[GradSink]:
    """A :class:`~mythos_kernels.grad_sink.GradSink` for the model's tied embedding / head
    weight when :func:`train_forward` can route both through it: autograd on, the head weight
    the embedding's own weight, a plain tensor (not a sharded DTensor: under FSDP2 the
    embedding's unit has gathered it, inside the wrapped forward) that needs a gradient, and a
    plain lookup embedding. Else None."""
    emb, head = model.embed, model.head
    w = emb.weight
    if not (torch.is_grad_enabled() and w.requires_grad and head.weight is w
            and _plain_embedding(emb) and type(w) in (torch.Tensor, nn.Parameter)):
        return None
    return GradSink()


def train_forward(model: OpenMythos, ids: torch.Tensor, n_loops: Optional[int] = None, *,
                  act: bool = True, grad_loops: Optional[int] = None, checkpoint: bool = False,
                  halt_check: Optional[Callable[[torch.Tensor, float], bool]] = None) -> ForwardOut:
    """The model's forward for training: ids [B, T] -> :class:`ForwardOut` (hidden state before
    the final norm, expected halting depth, loops run).

    Args:
        n_loops: recurrent depth (default ``cfg.max_loop_iters``).
        act: True: ACT as open-mythos (output = ACT-weighted sum of the iterations' states;
            the loop stops once every position has halted). False: every loop runs and the
            output is the last iteration's state.
        grad_loops: only the last ``grad_loops`` of the ``n_loops`` iterations build a graph;
            the earlier ones run under ``torch.no_grad`` (their h, ACT output and cumulative
            halting probability enter as constants; e keeps its gradient). None: all of them.
        checkpoint: recompute each graph-building iteration, and each prelude and coda layer, in
            backward instead of keeping its activations (``torch.utils.checkpoint``,
            non-reentrant).
        halt_check: ``(cum_p, threshold) -> bool``, the early-exit decision (default the
            recurrent block's ``halt_reducer`` or ``K.HaltCheck``).

    The expected halting depth of a position is ``sum_t t * w_t + n * (1 - sum_t w_t)`` with
    ``w_t`` the ACT weight of iteration t (1-based) and n the loops run: the remainder mass of a
    position that never halted counts at full depth (Graves 2016's ponder cost, made
    differentiable through the halting probabilities). A running position's mass is capped at
    1 (with ``act_threshold`` above 1 the probabilities can sum past it unhalted), so the depth
    lies in [1, n]. ``ponder`` is its mean. With ``act=False`` the depth is n everywhere.

    With a gradient to compute, the tied embedding / head weight goes through one
    :class:`~mythos_kernels.grad_sink.GradSink` (:func:`tied_sink`): pass the returned
    :class:`ForwardOut` itself to :func:`~mythos.train.lm_loss` and the embedding's and the fused
    loss's weight gradients land in one buffer (autograd would zero-fill a [V, D] for the
    embedding and add two [V, D] gradients). Any other use of ``out.h`` works as before.
    """
    cfg = model.cfg
    n_loops = cfg.max_loop_iters if n_loops is None else check_int("n_loops", n_loops, lo=1)
    grad_loops = check_int("grad_loops", grad_loops, lo=1, none_ok=True)
    model.check_inputs(ids, n_loops, None, 0)
    T = ids.shape[1]
    sink = tied_sink(model)
    head_weight = None
    if sink is None:
        x = model.embed(ids)
    else:
        head_weight = sink.attach(model.embed.weight)
        x = sink_embedding(ids, head_weight, sink)
    freqs = model.freqs_cis_mla if cfg.attn_type == "mla" else model.freqs_cis
    freqs_cis = freqs[:T]
    mask = CAUSAL if T > 1 else None
    ckpt = checkpoint and torch.is_grad_enabled()

    def run_layer(layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        step = functools.partial(layer, freqs_cis=freqs_cis, mask=mask, kv_cache=None,
                                 cache_key=name, positions=None)
        return _checkpoint(step, x, use_reentrant=False) if ckpt else step(x)

    for i, layer in enumerate(model.prelude):
        x = run_layer(layer, x, f"prelude_{i}")
    x, depth, run = recurrent_forward(model.recurrent, x, x, freqs_cis, mask, n_loops, act,
                                      grad_loops, checkpoint, halt_check)
    for i, layer in enumerate(model.coda):
        x = run_layer(layer, x, f"coda_{i}")
    return ForwardOut(x, depth, run, head_weight, sink)


def spectral_radius(model: nn.Module) -> float:
    """rho(A) of the recurrent block's LTI injection: A is diagonal, so max_i |A_i|. (Under
    FSDP2 the parameters are shards: gathered first, so every rank must call it.)"""
    inj = model.recurrent.injection
    with torch.no_grad():
        A = inj.get_A()
        A = A.full_tensor() if hasattr(A, "full_tensor") else A
        return float(A.abs().max())
