"""DeepSeek-style MoE: softmax router with aux-loss-free selection bias, and routed SwiGLU experts.

Routing (per token, open-mythos 0.5.0 ``MoEFFN.forward``)::

    scores = softmax(logits)                         # unbiased
    idx    = topk(logits + router_bias, k)           # the bias only picks experts
    w      = scores[idx] / sum(scores[idx])          # renormalized top-k weights

Routed experts, with weights stacked ``w13 = [E, D, 2F]`` (gate | up) and ``w2 = [E, F, D]``::

    y[n] = sum_j w[n, j] * (silu(x[n] @ Wg[e]) * (x[n] @ Wu[e])) @ Wd[e],   e = idx[n, j]

The reference dispatches by sorting the (token, slot) pairs by expert, so each expert runs one
matmul over its contiguous segment (one host sync for the segment sizes, not one per pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import choose


def moe_route_reference(logits: torch.Tensor, router_bias: torch.Tensor, topk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [N, E] (unbiased router output), router_bias: [E] ->
    (weights [N, k] in logits' dtype, idx [N, k] int64). Ties resolved as torch.topk does."""
    scores = F.softmax(logits, dim=-1)
    _, idx = (logits + router_bias).topk(topk, dim=-1)
    w = scores.gather(-1, idx)
    return w / w.sum(dim=-1, keepdim=True), idx


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: idx [N, k] -> int64 [E]."""
    return torch.bincount(idx.reshape(-1), minlength=n_experts)


# Below this many (token, slot) pairs the reference gathers each pair's expert weights and uses
# batched matmuls (decode); above it, it sorts pairs by expert and runs one matmul per expert.
GATHER_MAX_PAIRS = 16


def moe_experts_reference(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts combined with the routing weights.

    Args:
        x: [N, D] tokens; weights: [N, k]; idx: [N, k] expert ids;
        w13: [E, D, 2F] gate|up; w2: [E, F, D].
    Returns:
        [N, D], the k slots summed in slot order (as open-mythos does).
    """
    N, k = idx.shape
    D = x.shape[-1]
    Fh = w2.shape[1]
    if N == 0:
        return x.new_zeros(0, D)
    flat = idx.reshape(-1)  # [N*k], pair p = n*k + j
    if flat.numel() <= GATHER_MAX_PAIRS:
        xr = x.repeat_interleave(k, dim=0).unsqueeze(1)                # [Nk, 1, D]
        hg = torch.bmm(xr, w13.index_select(0, flat))                    # [Nk, 1, 2F]
        act = F.silu(hg[..., :Fh]) * hg[..., Fh:]
        y = torch.bmm(act, w2.index_select(0, flat)).view(N, k, D)
    else:
        order = torch.argsort(flat, stable=True)                         # pairs sorted by expert
        counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # one host sync
        xs = x.index_select(0, order // k)                               # [Nk, D] sorted rows
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                hg = xs[start:start + c] @ w13[e]                          # [c, 2F]
                ys[start:start + c] = (F.silu(hg[:, :Fh]) * hg[:, Fh:]) @ w2[e]
                start += c
        y = torch.empty_like(ys)
        y[order] = ys
        y = y.view(N, k, D)
    y = y * weights.unsqueeze(-1).to(y.dtype)
    out = y[:, 0]
    for j in range(1, k):
        out = out + y[:, j]
    return out


def moe_route(logits: torch.Tensor, router_bias: torch.Tensor, topk: int):
    """Dispatching entry point for :func:`moe_route_reference`."""
    choose("moe_route", logits, has_kernel=False)
    return moe_route_reference(logits, router_bias, topk)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Dispatching entry point for :func:`moe_experts_reference`."""
    choose("moe_experts", x, w13, has_kernel=False)
    return moe_experts_reference(x, weights, idx, w13, w2)
