"""DeepSeek-style MoE (``mythos_kernels/moe.py``).

* ``moe_route``:   softmax router + biased top-k selection + renormalized weights.
* ``moe_experts``: routed SwiGLU experts combined with the routing weights.
* ``moe_shared``:  routed + always-on shared experts, two designs side by side: ``dense`` (what the
  model does: routed grouped GEMMs, then each shared expert as a dense cuBLAS SwiGLU) and ``folded``
  (each shared expert of hidden k*F split into k always-on experts of hidden F with weight 1, run in
  the same grouped GEMM launches).

Performance targets: 64 experts, top-4, D = F = 2048, 512 / 4k / 16k tokens, bf16,
forward and forward+backward. The CPU shapes are the mid model config (D=512, F=128).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mythos_kernels as mk

from .harness import OpBench, Provider, compiled_provider, dispatch_provider, register

# ------------------------------------------------------------- bench: bytes and FLOPs ----

def moe_experts_flops(n_tokens: int, D: int, F: int, topk: int, backward: bool = False) -> int:
    """Matmul FLOPs of the routed experts: per pair 2*D*2F (gate|up) + 2*F*D (down).
    ``backward=True`` gives forward + backward = 3x forward (the backward does d input and
    d weight of each GEMM)."""
    f = 6 * n_tokens * topk * D * F
    return 3 * f if backward else f


def moe_experts_bytes(n_tokens: int, D: int, F: int, topk: int, n_experts: int,
                      elt: int = 2, backward: bool = False) -> int:
    """HBM bytes the routed-expert kernels move (each tensor read or written once).

    Forward: the weights of every expert that can receive a token (``min(E, N*k)``) read once,
    x read, out written, act ``[N*k, F]`` written and read, per-pair down outputs ``[N*k, D]``
    written and read by the combine. ``backward=True`` gives forward + backward: the forward
    also writes gate|up ``[N*k, 2F]``; the backward reads the weights twice and writes their
    gradients, reads dY (twice, gathered), gate|up and act, writes and reads d gate|d up, and
    writes and combines the per-pair dx rows.
    """
    nk = n_tokens * topk
    weights = min(n_experts, nk) * 3 * D * F * elt
    io = 2 * n_tokens * D * elt
    fwd = weights + io + 2 * nk * F * elt + 2 * nk * D * elt
    if not backward:
        return fwd
    bwd = (3 * weights + 2 * n_tokens * D * elt + 2 * nk * 2 * F * elt + nk * F * elt
           + 2 * nk * 2 * F * elt + 2 * nk * D * elt + n_tokens * D * elt)
    return fwd + nk * 2 * F * elt + bwd


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
EXPERTS.add(Provider("eager", moe_experts_eager, prepare=_eager_prepare, graph=False))  # mask.any() syncs
EXPERTS.add(Provider("reference", mk.moe_experts_reference, graph=False))  # bincount().tolist()
# torch.compile of the data-dependent eager loop graph-breaks on every mask.any(); it is still
# the honest "compile what open-mythos wrote" baseline.
EXPERTS.add(compiled_provider(moe_experts_eager, prepare=_eager_prepare))
EXPERTS.add(dispatch_provider("moe_experts", mk.moe_experts))


# --------------------------------------------------------------------------- shared experts


def _shared_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    inp = _expert_inputs(shape, dtype, device)
    D, Fh, k, ns = shape["D"], shape["F"], shape["k"], shape["S"]
    inp.update(
        s_gate=(torch.randn(ns, k * Fh, D, device=device) * D ** -0.5).to(dtype),   # nn.Linear
        s_up=(torch.randn(ns, k * Fh, D, device=device) * D ** -0.5).to(dtype),
        s_down=(torch.randn(ns, D, k * Fh, device=device) * (k * Fh) ** -0.5).to(dtype))
    return inp


def _shared_dense(x, s_gate, s_up, s_down):
    out = None
    for g, u, d in zip(s_gate.unbind(0), s_up.unbind(0), s_down.unbind(0)):
        y = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        out = y if out is None else out + y
    return out


def moe_shared_reference(x, weights, idx, w13, w2, s_gate, s_up, s_down):
    return mk.moe_experts_reference(x, weights, idx, w13, w2) + _shared_dense(x, s_gate, s_up,
                                                                              s_down)


def moe_shared_dense(x, weights, idx, w13, w2, s_gate, s_up, s_down):
    """mythos's MoEFFN: routed experts through ``moe_experts`` + dense shared SwiGLUs."""
    return mk.moe_experts(x, weights, idx, w13, w2) + _shared_dense(x, s_gate, s_up, s_down)


def _fold_prepare(inp: dict) -> dict:
    """Stack the shared experts as always-on experts E..E+S*k-1 (untimed, as a model storing
    them stacked would): chunk j of shared expert s is gate/up rows [jF, (j+1)F), down columns
    [jF, (j+1)F)."""
    w13, w2, x = inp["w13"], inp["w2"], inp["x"]
    E, _, F2 = w13.shape
    Fh = F2 // 2
    g, u, d = inp["s_gate"], inp["s_up"], inp["s_down"]
    ns, kF, _ = g.shape
    k = kF // Fh
    gs = g.reshape(ns * k, Fh, -1).transpose(1, 2)                     # [S*k, D, F]
    us = u.reshape(ns * k, Fh, -1).transpose(1, 2)
    ds = d.transpose(1, 2).reshape(ns * k, Fh, -1)                     # [S*k, F, D]
    N = x.shape[0]
    ones = torch.ones(N, ns * k, device=x.device, dtype=inp["weights"].dtype)
    sidx = (E + torch.arange(ns * k, device=x.device)).expand(N, -1)
    return {"x": x,
            "weights": torch.cat([inp["weights"], ones], 1).contiguous(),
            "idx": torch.cat([inp["idx"], sidx], 1).contiguous(),
            "w13": torch.cat([w13, torch.cat([gs, us], 2)], 0).contiguous(),
            "w2": torch.cat([w2, ds], 0).contiguous()}


def _shared_bytes(s: dict, dtype: torch.dtype, mode: str) -> float:
    elt = torch.empty((), dtype=dtype, device="cpu").element_size()
    shared = s["S"] * 3 * s["D"] * s["k"] * s["F"] * elt
    base = _expert_bytes(s, dtype, mode)
    return float(base + shared * {"forward": 1, "backward": 2, "full": 3}[mode])


SHARED = register(OpBench(
    name="moe_shared",
    description="routed + shared experts: dense shared SwiGLU vs folded always-on experts",
    make_inputs=_shared_inputs,
    flops=lambda s: 6.0 * s["N"] * s["k"] * s["D"] * s["F"] * (1 + s["S"]),
    bytes=lambda s, dtype, mode: _shared_bytes(s, dtype, mode),
    grad_inputs=("x", "weights", "w13", "w2", "s_gate", "s_up", "s_down"),
    modes=("forward", "full"),
    shapes={
        "tiny": [{"N": 32, "E": 8, "k": 2, "D": 64, "F": 32, "S": 2}],
        "cpu": [{"N": 512, "E": 64, "k": 4, "D": 512, "F": 128, "S": 2}],
        "cuda": [{"N": 4096, "E": 64, "k": 4, "D": 2048, "F": 2048, "S": 2}],
        "full": [{"N": n, "E": 64, "k": 4, "D": 2048, "F": 2048, "S": 2}
                 for n in (1, 16, 64, 512, 4096, 16384)],
    },
))
SHARED.add(Provider("reference", moe_shared_reference, graph=False))  # bincount().tolist()
SHARED.add(dispatch_provider("moe_experts", moe_shared_dense, name="dense"))
SHARED.add(dispatch_provider("moe_experts", mk.moe_experts, name="folded", prepare=_fold_prepare))


# --------------------------------------------------------------------------- torch's grouped GEMM


def moe_experts_grouped_mm(x, weights, idx, w13, w2):
    """The routed experts through ``torch.nn.functional.grouped_mm`` (CUTLASS grouped GEMM on
    sm_90, a CPU kernel too): token-slot pairs sorted by expert, ``offs`` the groups' ends,
    gate/up and down as two grouped GEMMs, the weighted rows added back per token."""
    N, k = idx.shape
    E = w13.shape[0]
    Fh = w2.shape[1]
    order = idx.reshape(-1).argsort(stable=True)                          # pairs by expert
    tok = order // k
    offs = torch.bincount(idx.reshape(-1), minlength=E).cumsum(0).to(torch.int32)
    h = F.grouped_mm(x.index_select(0, tok), w13, offs=offs)              # [N*k, 2F]
    a = F.silu(h[:, :Fh]) * h[:, Fh:]
    y = F.grouped_mm(a, w2, offs=offs)                                    # [N*k, D]
    y = y * weights.reshape(-1).index_select(0, order).unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, tok, y)


def _grouped_mm_available(inp: dict, device: torch.device) -> str | None:
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if inp["x"].dtype != torch.bfloat16:
        return f"grouped_mm takes bf16 inputs (got {inp['x'].dtype})"
    if (inp["w13"].shape[1] * 2) % 16 or (inp["w2"].shape[1] * 2) % 16:
        return "grouped_mm needs row strides that are multiples of 16 bytes"
    return None


EXPERTS.add(Provider("grouped_mm", moe_experts_grouped_mm, available=_grouped_mm_available,
                     graph=False))  # bincount sizes the groups on the host side
