"""DeepSeek-style MoE (``mythos_kernels/moe.py``).

* ``moe_route``:   softmax router + biased top-k selection + renormalized weights.
* ``moe_experts``: routed SwiGLU experts combined with the routing weights.

Performance targets (kernel issue): 64 experts, top-4, D = F = 2048, 512 / 4k / 16k tokens, bf16,
forward and forward+backward. The CPU shapes are the mid model config (D=512, F=128).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mythos_kernels as mk

from .harness import OpBench, Provider, compiled_provider, dispatch_provider, register


def _route_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, E = shape["N"], shape["E"]
    return {"logits": torch.randn(N, E, device=device, dtype=dtype),
            "router_bias": (0.01 * torch.randn(E, device=device)).to(dtype),
            "topk": shape["k"]}


def moe_route_eager(logits, router_bias, topk):
    """open-mythos 0.5.0 ``MoEFFN.forward``, routing part."""
    scores = F.softmax(logits, dim=-1)
    _, topk_idx = (logits + router_bias).topk(topk, dim=-1)
    topk_scores = scores.gather(-1, topk_idx)
    topk_scores = topk_scores / topk_scores.sum(dim=-1, keepdim=True)
    return topk_scores, topk_idx


ROUTE = register(OpBench(
    name="moe_route",
    description="softmax router, biased top-k, renormalized weights",
    make_inputs=_route_inputs,
    flops=lambda s: 6.0 * s["N"] * s["E"],
    grad_inputs=("logits",),
    modes=("forward", "full"),
    shapes={
        "tiny": [{"N": 32, "E": 8, "k": 2}],
        "cpu": [{"N": 512, "E": 64, "k": 4}, {"N": 4096, "E": 64, "k": 4}],
        "cuda": [{"N": 4096, "E": 64, "k": 4}],
        "full": [{"N": n, "E": 64, "k": 4} for n in (512, 4096, 16384)],
    },
))
ROUTE.provider("eager")(moe_route_eager)
ROUTE.provider("reference")(mk.moe_route_reference)
ROUTE.add(compiled_provider(moe_route_eager))
ROUTE.add(dispatch_provider("moe_route", mk.moe_route))


# --------------------------------------------------------------------------- routed experts


def _expert_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, E, k, D, Fh = shape["N"], shape["E"], shape["k"], shape["D"], shape["F"]
    logits = torch.randn(N, E, device=device)
    w, idx = mk.moe_route_reference(logits, torch.zeros(E, device=device), k)
    return {
        "x": torch.randn(N, D, device=device, dtype=dtype),
        "weights": w.to(dtype),
        "idx": idx,
        "w13": (torch.randn(E, D, 2 * Fh, device=device) * D ** -0.5).to(dtype),
        "w2": (torch.randn(E, Fh, D, device=device) * Fh ** -0.5).to(dtype),
    }


def _eager_prepare(inp: dict) -> dict:
    """open-mythos keeps one ``Expert`` (three ``nn.Linear``) per routed expert."""
    w13, w2 = inp["w13"], inp["w2"]
    Fh = w2.shape[1]
    return {
        "x": inp["x"], "weights": inp["weights"], "idx": inp["idx"],
        "gate": [w13[e, :, :Fh].t().contiguous() for e in range(w13.shape[0])],   # [F, D]
        "up": [w13[e, :, Fh:].t().contiguous() for e in range(w13.shape[0])],     # [F, D]
        "down": [w2[e].t().contiguous() for e in range(w2.shape[0])],             # [D, F]
    }


def moe_experts_eager(x, weights, idx, gate, up, down):
    """open-mythos 0.5.0 ``MoEFFN.forward``, routed dispatch: per slot, per expert, a boolean
    mask gather, an ``Expert`` call and a masked accumulate."""
    out = torch.zeros_like(x)
    for i in range(idx.shape[1]):
        expert_ids = idx[:, i]
        token_scores = weights[:, i].unsqueeze(-1)
        for eid in range(len(gate)):
            mask = expert_ids == eid
            if not mask.any():
                continue
            xe = x[mask]
            ye = F.linear(F.silu(F.linear(xe, gate[eid])) * F.linear(xe, up[eid]), down[eid])
            out[mask] += token_scores[mask] * ye
    return out


def _expert_bytes(s: dict, dtype: torch.dtype, mode: str) -> float:
    """The least HBM traffic: the weights of the experts that can receive a token
    (min(E, N*k)) read once (and, with a backward, read again and their gradients written), x read
    and the output written (plus dy read and dx written with a backward)."""
    elt = torch.empty((), dtype=dtype, device="cpu").element_size()
    weights = min(s["E"], s["N"] * s["k"]) * 3 * s["D"] * s["F"] * elt
    rows = s["N"] * s["D"] * elt
    if mode == "forward":
        return float(weights + 2 * rows)
    if mode == "backward":
        return float(2 * weights + 3 * rows)
    return float(3 * weights + 4 * rows)


EXPERTS = register(OpBench(
    name="moe_experts",
    description="routed SwiGLU experts, weighted sum over the top-k slots",
    make_inputs=_expert_inputs,
    # per (token, slot): gate+up 4*D*F, down 2*F*D
    flops=lambda s: 6.0 * s["N"] * s["k"] * s["D"] * s["F"],
    bytes=lambda s, dtype, mode: _expert_bytes(s, dtype, mode),
    grad_inputs=("x", "weights", "w13", "w2"),
    modes=("forward", "full"),
    shapes={
        "tiny": [{"N": 32, "E": 8, "k": 2, "D": 64, "F": 32}],
        "cpu": [{"N": 512, "E": 64, "k": 4, "D": 512, "F": 128}],
        "cuda": [{"N": 4096, "E": 64, "k": 4, "D": 2048, "F": 2048}],
        # 1..64 tokens: decode batches (the kernel's small tiles must not lose to the reference)
        "full": [{"N": n, "E": 64, "k": 4, "D": 2048, "F": 2048}
                 for n in (1, 16, 64, 512, 4096, 16384)],
    },
))
EXPERTS.add(Provider("eager", moe_experts_eager, prepare=_eager_prepare))
EXPERTS.provider("reference")(mk.moe_experts_reference)
# torch.compile of the data-dependent eager loop graph-breaks on every mask.any(); it is still
# the honest "compile what open-mythos wrote" baseline.
EXPERTS.add(compiled_provider(moe_experts_eager, prepare=_eager_prepare))
EXPERTS.add(dispatch_provider("moe_experts", mk.moe_experts))
