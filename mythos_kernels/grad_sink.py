"""One weight's gradient summed over several ops of a graph in a single buffer (a tied
embedding / LM-head weight).

Autograd sums a weight's gradient contributions itself: each op that used the weight returns a
full-size gradient and the engine adds them, out of place unless it owns the first one. For the
tied ``[V, D]`` embedding of a language model that means, per step, the embedding backward's
zero-filled ``[V, D]`` (a few rows written), the head's ``[V, D]``, and a third for their sum;
on the CPU each fresh 65 MB buffer (V = 32000, D = 512, fp32) also faults in page by page.

A :class:`GradSink` lets the ops that know it deposit their contributions instead:
``view = sink.attach(weight)`` is an alias of ``weight`` to use in their place; the fused
linear + cross-entropy (``linear_cross_entropy(..., grad_sink=)``) hands over its ``dW``, and
:func:`sink_embedding`'s backward adds its rows into that same buffer (``index_add_``, no dense
zero fill); both return no gradient for the alias. Autograd runs the alias's backward after
every op that used it, and it returns the one sum (plus any gradient other ops returned for the
alias the usual way). The result equals autograd's sum up to the order of the fp32 additions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


class GradSink:
    """The gradient of one weight, summed over the ops that deposit into it, for one graph.

    Make a new sink per forward (it holds one backward's sum at a time). Deposits:
    :meth:`add` (a dense contribution the caller hands over: the sink may write into it) and
    :meth:`index_add` (rows added at indices, as an embedding's gradient)."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self._shape: torch.Size | None = None

    def attach(self, weight: torch.Tensor) -> torch.Tensor:
        """An alias of ``weight`` whose backward returns this sink's sum; use it in place of
        ``weight`` in the ops that deposit here (and anywhere else: those ops' gradients are
        added as usual)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        self._shape = weight.shape
        return attach_sum(self.take, weight)

    def add(self, grad: torch.Tensor) -> None:
        """Deposit a dense contribution (the weight's shape); ``grad`` is handed over: the sink
        keeps it as the sum (no copy) or adds it to the sum."""
        self._check(grad)
        if self._sum is None:
            self._sum = grad
        else:
            self._sum.add_(grad)

    def index_add(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Deposit ``rows`` [n, ...] added at rows ``index`` [n] of the weight."""
        if self._shape is None:
            raise RuntimeError("GradSink.index_add before attach(): no weight shape")
        if self._sum is None:
            self._sum = rows.new_zeros(self._shape)
        self._sum.index_add_(0, index, rows.to(self._sum.dtype))

    def take(self) -> torch.Tensor | None:
        """The sum so far (None when nothing was deposited); the sink starts empty again."""
        out, self._sum = self._sum, None
        return out

    def _check(self, grad: torch.Tensor) -> None:
        if self._shape is not None and grad.shape != self._shape:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} deposited into a sink for a "
                             f"weight of shape {tuple(self._shape)}")


class _Attach(torch.autograd.Function):
    """Identity on the weight; backward returns ``take()`` plus any gradient that reached the
    alias directly."""

    @staticmethod
    def forward(ctx, take: Callable[[], torch.Tensor | None], weight: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.take = take
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        total = ctx.take()
        if grad is None or total is None:
            return None, (grad if total is None else total)
        return None, total.add_(grad)


def attach_sum(take: Callable[[], torch.Tensor | None], weight: torch.Tensor) -> torch.Tensor:
    """An alias of ``weight`` whose backward returns ``take()`` (a gradient summed elsewhere, or
    None) plus any gradient that reached the alias directly. Autograd runs it after the backward
    of every op that used the alias, so the sum ``take`` hands over is complete."""
    return _Attach.apply(take, weight)


class _SinkEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)``, its weight gradient added into a sink (rows only)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, sink: GradSink) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.sink = sink
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            ctx.sink.index_add(ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, None, None


def sink_embedding(ids: torch.Tensor, weight: torch.Tensor, sink: GradSink) -> torch.Tensor:
    """``F.embedding(ids, weight)`` (plain lookup: no padding index, norm or frequency scaling)
    whose weight gradient is added into ``sink`` (``weight`` is normally ``sink.attach(W)``)."""
    if not isinstance(sink, GradSink):
        raise TypeError(f"sink must be a GradSink, got {type(sink).__name__}")
    return _SinkEmbedding.apply(ids, weight, sink)
