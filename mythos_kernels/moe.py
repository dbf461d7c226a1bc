"""DeepSeek-style MoE: softmax router with aux-loss-free selection bias, and routed SwiGLU experts.

Routing (per token, open-mythos 0.5.0 ``MoEFFN.forward``)::

    scores = softmax(logits)                         # unbiased
    idx    = topk(logits + router_bias, k)           # the bias only picks experts
    w      = scores[idx] / sum(scores[idx])          # renormalized top-k weights

Routed experts, with weights stacked ``w13 = [E, D, 2F]`` (gate | up) and ``w2 = [E, F, D]``::

    y[n] = sum_j w[n, j] * (silu(x[n] @ Wg[e]) * (x[n] @ Wu[e])) @ Wd[e],   e = idx[n, j]

The reference dispatches by sorting the (token, slot) pairs by expert, so each expert runs one
matmul over its contiguous segment (one host sync for the segment sizes, not one per pair).
CPU inference (no autograd) runs :func:`moe_experts_cpu`, three faster plain-torch forms of it,
each tested against it: per pair for decode, two padded bmms for balanced routing, and the sorted
segments without the pair-order copies for skewed routing (random-init models send most tokens to
a few experts).

The Triton path (kernels in :mod:`mythos_kernels.moe_kernels`): a fused router kernel, a
deterministic sync-free align (pairs stably sorted by expert, segments padded to the GEMM tile),
a grouped gate|up GEMM with the SwiGLU in its epilogue, a grouped down GEMM with the routing
weight in its epilogue, and a slot-order combine; the backward is four more grouped GEMMs
(dY·Wdᵀ with the SwiGLU backward and d weights in its epilogue, per-expert actᵀ·dY and xᵀ·d[g|u],
d[g|u]·W13ᵀ). Public: :func:`moe_route` / :func:`moe_experts` (dispatching),
:func:`moe_route_triton` / :func:`moe_experts_triton`, :func:`moe_align_triton`, and the bench
helpers :func:`moe_experts_flops` / :func:`moe_experts_bytes`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import linear as _lin
from ._dispatch import _compiling, choose, cpu_inference, interpreter_active
from ._scratch import scratch
from .linear import vecmat


def _swiglu(hg: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a gate|up product [..., 2F] (the w13 layout) -> [..., F]."""
    Fh = hg.shape[-1] // 2
    return F.silu(hg[..., :Fh]) * hg[..., Fh:]


def _swiglu_in_place(hg: torch.Tensor) -> torch.Tensor:
    """:func:`_swiglu` (the same values) written over hg's gate half, returned as a strided
    [..., F] view of hg (no new buffer; hg's gate half is overwritten)."""
    Fh = hg.shape[-1] // 2
    return F.silu(hg[..., :Fh], inplace=True).mul_(hg[..., Fh:])


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
    flat = idx.reshape(-1).long()
    # scatter_add, not bincount: bincount reads the max on the host (a sync, no CUDA graphs)
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat))


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
    if N == 0:
        return x.new_zeros(0, D)
    flat = idx.reshape(-1)                                               # [N*k], pair n*k + j
    order = torch.argsort(flat, stable=True)                             # pairs sorted by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()      # the one host sync
    xs = x.index_select(0, order // k)                                   # [Nk, D] sorted rows
    segs = []
    start = 0
    # unbind once: indexing w13[e] per expert would make autograd build a full [E, D, 2F]
    # zero gradient for every expert; unbind's backward stacks the per-expert grads once.
    grads = torch.is_grad_enabled() and (w13.requires_grad or w2.requires_grad)
    w13s, w2s = (w13.unbind(0), w2.unbind(0)) if grads else (w13, w2)
    for e, c in enumerate(counts):
        if c:
            hg = xs[start:start + c] @ w13s[e]                               # [c, 2F]
            segs.append(_swiglu(hg) @ w2s[e])                                    # [c, D]
            start += c
    ys = torch.cat(segs) if len(segs) > 1 else segs[0]
    y = torch.empty_like(ys).index_copy_(0, order, ys).view(N, k, D)     # back to pair order
    y = y * weights.unsqueeze(-1).to(y.dtype)
    out = y[:, 0]
    for j in range(1, k):
        out = out + y[:, j]
    return out


FEW_PAIRS = 32  # CPU, no autograd, at most this many (token, slot) pairs: the per-pair path


def _cpu_inference(x: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
                   ) -> bool:
    """Pairs to route and :func:`cpu_inference`: :func:`moe_experts_cpu` serves the reference
    backend."""
    return idx.numel() > 0 and cpu_inference(x, w13, w2)


def moe_experts_few_pairs(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`moe_experts_reference` for a handful of (token, slot) pairs (CPU decode, no
    autograd), with no sort, gather or scatter of the routed rows (those cost more than the
    pairs' own matrix-vector products). One host read of idx.

    fp32 with contiguous expert stacks (the model's layout): :func:`_pairs_two_by_two`. Otherwise
    each pair multiplies its token by its expert's weights (:func:`vecmat`) and the slots are
    weighted and summed in slot order, as the reference does."""
    if _pairable(x, idx, w13, w2):
        return _pairs_two_by_two(x, weights, idx, w13, w2)
    N, k = idx.shape
    ids = idx.tolist()
    wts = weights.to(x.dtype)
    out = None
    for j in range(k):
        rows = []
        for n in range(N):
            e = ids[n][j]
            hg = vecmat(x[n:n + 1], w13[e])                                     # [1, 2F]
            rows.append(vecmat(_swiglu(hg), w2[e]))                             # [1, D]
        y = (torch.cat(rows) if N > 1 else rows[0]) * wts[:, j:j + 1]
        out = y if out is None else out + y
    return out


def _fp32_stacks(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, min_expert: int) -> bool:
    """fp32 throughout, contiguous expert stacks (strided views of single experts index them),
    experts of at least ``min_expert`` elements (D x 2F): the CPU expert-view forms' condition."""
    return (x.dtype == w13.dtype == w2.dtype == torch.float32 and w13.is_contiguous()
            and w2.is_contiguous() and w13.shape[1] * w13.shape[2] >= min_expert)


def _pairable(x: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`moe_experts_few_pairs` takes :func:`_pairs_two_by_two`."""
    return idx.numel() > 1 and _fp32_stacks(x, w13, w2, _lin.SPLIT_MIN_WEIGHT)


def _expert_pair(w: torch.Tensor, e0: int, e1: int) -> torch.Tensor:
    """Experts e0 <= e1 of a contiguous stack w [E, R, C] as one [2, R, C] view, no copy (the
    batch stride is the distance between them; 0 when e0 == e1)."""
    R, C = w.shape[1], w.shape[2]
    return torch.as_strided(w, (2, R, C), ((e1 - e0) * R * C, C, 1),
                            w.storage_offset() + e0 * R * C)


_ORDER_TENSORS: dict[tuple[int, ...], torch.Tensor] = {}   # pair orders of few pairs, made once


def _order_tensor(order: list[int], device: torch.device) -> torch.Tensor:
    """``torch.tensor(order)``, kept for CPU orders of up to 8 pairs (a decode step sorts the same
    few orders again and again: a new tensor each time costs four dispatched ops)."""
    if len(order) > 8 or device.type != "cpu":
        return torch.tensor(order, device=device)
    key = tuple(order)
    t = _ORDER_TENSORS.get(key)
    if t is None:
        if len(_ORDER_TENSORS) >= 4096:
            _ORDER_TENSORS.clear()
        with torch.inference_mode(False):       # a normal tensor, usable in any later mode
            t = _ORDER_TENSORS[key] = torch.tensor(order, device="cpu")
    return t


def _pairs_two_by_two(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The pairs sorted by expert and multiplied two at a time: one bmm over a strided view of
    two experts' weights (:func:`_expert_pair`) runs one expert per core, in 2 bmms per two pairs
    where the split-K form took 4 bmms and 4 sums (an odd last pair uses :func:`vecmat`); SwiGLU
    and the routing weights are applied to all pairs at once. Each token's slots are summed in
    expert order (the last bits may differ from the reference's slot order). The rows live in
    [P, 1, ...] buffers so each bmm's operands are plain slices (a decode step is bound by its
    number of dispatched ops as much as by its weight reads)."""
    N, k = idx.shape
    D, Fh = x.shape[1], w2.shape[1]
    P = N * k
    flat = idx.reshape(-1).tolist()
    order = sorted(range(P), key=flat.__getitem__)                           # pairs by expert
    es = [flat[p] for p in order]
    order_t = _order_tensor(order, x.device)
    tok = None if N == 1 else order_t // k
    xs = x.expand(P, D) if N == 1 else x.index_select(0, tok)               # [P, D] sorted rows
    hg = x.new_empty(P, 1, 2 * Fh)
    y = x.new_empty(P, 1, D)
    for src, dst, w in ((xs.unsqueeze(1), hg, w13), (None, y, w2)):
        if src is None:
            src = _swiglu(hg)                                                   # [P, 1, F]
        for i in range(0, P - 1, 2):
            torch.bmm(src[i:i + 2], _expert_pair(w, es[i], es[i + 1]), out=dst[i:i + 2])
        if P % 2:
            dst[P - 1] = vecmat(src[P - 1], w[es[P - 1]])
    y = y.view(P, D)
    wts = weights.reshape(-1).index_select(0, order_t)
    y.mul_((wts if wts.dtype == x.dtype else wts.to(x.dtype)).unsqueeze(1))
    if N == 1:
        return y.sum(0, keepdim=True)
    return torch.zeros_like(x).index_add_(0, tok, y)


PAD_SEGMENT_ROWS = 24  # padded-form rule: what a sorted segment's calls and cold weights cost, in rows


def moe_experts_cpu(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`moe_experts_reference` for CPU inference (no autograd), in the fastest of three
    plain-torch forms (timings: the 2-core machine, mid config, one MoE call):

    - at most ``FEW_PAIRS`` pairs (decode): :func:`moe_experts_few_pairs` (two pairs per bmm);
    - balanced routing: :func:`moe_experts_padded`, two bmms over all experts (512 tokens:
      13.2-13.4 ms -> 8.8-10.1 ms);
    - otherwise (skewed routing, e.g. a random-init model): :func:`moe_experts_sorted`, the
      reference's sorted segments without its pair-order copies (13.5 -> 11.2 ms), small
      segments two experts per bmm and large ones through oneDNN (about 8 ms).

    The padded form is taken when its slab (experts x the largest count) has at most the real
    pair rows plus ``PAD_SEGMENT_ROWS`` per non-empty expert: each of the sorted form's segments
    costs its own calls and a cold read of one expert's weights, which the padded form's
    single bmm streams in one pass; and, where the sorted form pairs its small segments, when
    there are at least ``PAD_MIN_ROWS`` pair rows per expert (:func:`_padded_is_cheaper`).

    One host read (the expert counts), as in the reference."""
    if idx.numel() <= FEW_PAIRS:
        return moe_experts_few_pairs(x, weights, idx, w13, w2)
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=w13.shape[0])
    order = torch.argsort(flat, stable=True)                             # pairs sorted by expert
    host = counts.tolist()
    if _padded_is_cheaper(host, flat.numel(), _pair_segments_ok(x, w13, w2)):
        return moe_experts_padded(x, weights, idx, w13, w2, counts, order, max(host))
    return moe_experts_sorted(x, weights, idx, w13, w2, host, order)


PAD_MIN_ROWS = 4  # padded-form rule with expert pairs: at least this many pair rows per expert


def _padded_is_cheaper(counts: list[int], pairs: int, paired: bool = False) -> bool:
    """:func:`moe_experts_cpu`'s choice: ``E * max(counts) <= pairs + PAD_SEGMENT_ROWS *
    (non-empty experts)`` and, when the sorted form would pair small segments
    (:func:`_pair_segments_ok`), ``pairs >= PAD_MIN_ROWS * E`` (the slab's bmm streams every
    expert's weights, empty ones too; the paired segments read only the busy ones, in half the
    calls). Measured by tools/cpu_moe_forms.py over 54 routings (E 8-128, D 256-1024, F 64-512,
    16-512 tokens, balanced to skewed; rows in bench/results/cpu/moe_forms.jsonl). Without
    pairs: the chosen form's time summed 1.03x the faster form's, worst case 1.33x; the former
    rule (slab at most 1.5x the pair rows) 1.11x, worst 4.2x (a balanced E=128 top-8 routing
    sent to the sorted form). With pairs, three runs (162 routings): 1.03x, worst 1.42x; without
    the rows-per-expert term 1.05x, worst 1.72x (few tokens over many experts sent to the slab);
    the sorted form always: 1.03x, worst 1.70x."""
    E = len(counts)
    if paired and pairs < PAD_MIN_ROWS * E:
        return False
    return E * max(counts) <= pairs + PAD_SEGMENT_ROWS * (E - counts.count(0))


def moe_experts_padded(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                       order: torch.Tensor, cap: int) -> torch.Tensor:
    """Two batched GEMMs over a zero-padded slab [E, cap, D] holding each expert's rows (cap >=
    the largest count; ``counts`` [E] and ``order``, the pairs stably sorted by expert, as
    :func:`moe_experts_cpu` computes them). MKL runs a bmm's experts one per core, where 64
    per-expert products of ~32 rows run at about half the rate; each pair reads its result back
    from its slot and the slots are summed in slot order, as in the reference."""
    N, k = idx.shape
    E, D = w13.shape[0], x.shape[1]
    flat = idx.reshape(-1)
    e_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts                             # each expert's first pair
    rank = torch.arange(flat.numel(), device=x.device) - first[e_sorted]
    slot = torch.empty_like(order).index_put_((order,), e_sorted * cap + rank)  # per pair
    # kept buffers for the slab and the products (mythos_kernels._scratch: their pages stay
    # mapped between loops); only ``out`` is new. The padding rows' results are never read;
    # zeroing them keeps stale values (NaN, denormals) out of the products
    slab = scratch("moe_padded_slab", (E * cap, D), x.dtype, x.device).zero_()
    for s in slot.view(N, k).unbind(1):
        slab.index_copy_(0, s, x)
    hg = torch.bmm(slab.view(E, cap, D), w13,
                   out=scratch("moe_padded_hg", (E, cap, w13.shape[2]), x.dtype, x.device))
    y = torch.bmm(_swiglu_in_place(hg), w2,
                  out=scratch("moe_padded_y", (E, cap, D), x.dtype, x.device))   # [E, cap, D]
    y = torch.index_select(y.view(E * cap, D), 0, slot,
                           out=scratch("moe_padded_sel", (N * k, D), x.dtype, x.device))
    y = y.view(N, k, D).mul_(weights.unsqueeze(-1).to(x.dtype))
    if k == 1:
        return y[:, 0].clone()
    out = y[:, 0] + y[:, 1]
    for j in range(2, k):
        out.add_(y[:, j])
    return out


SMALL_SEGMENT = 128   # sorted form: experts with fewer rows take the two-core split products
# ... when an expert's w13 has at least this many elements (smaller ones: the split's own cost
# wins; measured mm / split time 0.64-0.88 at D x 2F = 4k-32k elements, 1.08-1.66 at 128k)
SPLIT_MIN_EXPERT = 1 << 17


def _split_segments_ok(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`moe_experts_sorted` multiplies small segments with
    :func:`_segment_split` (fp32, contiguous stacks, an even model dim, experts of at least
    ``SPLIT_MIN_EXPERT`` elements), with at least two threads to split over."""
    return (w2.shape[2] % 2 == 0 and _lin.two_threads()
            and _fp32_stacks(x, w13, w2, SPLIT_MIN_EXPERT))


def _segment_split(xs: torch.Tensor, w13e: torch.Tensor, w2e: torch.Tensor, out: torch.Tensor
                   ) -> None:
    """One expert's SwiGLU over a few rows, each product as one bmm over two column halves of the
    weight (one per core; no copy of the weight): the gate and up halves of ``w13e`` [D, 2F],
    then the two column halves of ``w2e`` [F, D]; writes [c, D] into ``out``. Few-row products
    are compute-bound here (the same time with the weights in cache or not, ~100 GFLOP/s at 25
    rows) and MKL or oneDNN parallelize them poorly: measured (2-core machine, 512 x 256 and
    128 x 512 weights) 164 -> 138 us per expert at 8 rows, 180 -> 150 at 32 against ``mm``;
    oneDNN took 182 / 275 us there. At 128 rows and more oneDNN is as fast or faster."""
    c, D = xs.shape
    Fh = w2e.shape[0]
    gu = torch.bmm(xs.expand(2, c, D),
                   torch.as_strided(w13e, (2, D, Fh), (Fh, 2 * Fh, 1), w13e.storage_offset()))
    a = F.silu(gu[0]) * gu[1]                                                   # [c, F]
    y = torch.bmm(a.expand(2, c, Fh),
                  torch.as_strided(w2e, (2, Fh, D // 2), (D // 2, D, 1), w2e.storage_offset()))
    out.view(c, 2, D // 2).copy_(y.transpose(0, 1))


def _pair_segments_ok(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`moe_experts_sorted` multiplies small segments two experts at a time
    (:func:`_segment_pair`): fp32 with contiguous stacks, any expert size and thread count
    (measured over the shapes of tools/cpu_moe_forms.py: 1.0-2.2x on the sorted form with two
    threads, 1.0-1.7x with one; the calls it saves are most of a small segment's cost)."""
    return _fp32_stacks(x, w13, w2, 0)


def _segment_pair(xs: torch.Tensor, ys: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  e0: int, s0: int, c0: int, e1: int, s1: int, c1: int) -> None:
    """Two experts' SwiGLU (e0 < e1, their sorted rows at ``xs[s0:s0+c0]`` and ``xs[s1:s1+c1]``)
    as one bmm per product over strided views of both experts' rows and weights, no copy: MKL
    runs a two-matrix bmm one matrix per core, each core a whole expert, where the split form
    runs each expert over both cores in two products of half the width. Both views take the
    larger count; the smaller expert's extra rows (the next segment's, or ``xs``'s zero
    padding past the last segment) are computed and dropped."""
    c, D = max(c0, c1), xs.shape[1]
    rows = torch.as_strided(xs, (2, c, D), ((s1 - s0) * D, D, 1), xs.storage_offset() + s0 * D)
    hg = torch.bmm(rows, _expert_pair(w13, e0, e1))                         # [2, c, 2F]
    y = torch.bmm(_swiglu(hg), _expert_pair(w2, e0, e1))                     # [2, c, D]
    ys[s0:s0 + c0] = y[0, :c0]
    ys[s1:s1 + c1] = y[1, :c1]


def _pair_small(counts: list[int]) -> list[tuple[int, int]]:
    """The experts :func:`moe_experts_sorted` multiplies in pairs: those with fewer than
    ``SMALL_SEGMENT`` rows, in order of count, each paired with the next when their counts
    differ by at most ``PAD_SEGMENT_ROWS`` (the rows a segment's own calls cost; the smaller
    expert computes that many extra rows at most). Pairs as (lower id, higher id)."""
    small = sorted((e for e, c in enumerate(counts) if 0 < c < SMALL_SEGMENT),
                   key=counts.__getitem__)
    pairs, i = [], 0
    while i + 1 < len(small):
        a, b = small[i], small[i + 1]
        if counts[b] - counts[a] <= PAD_SEGMENT_ROWS:
            pairs.append((min(a, b), max(a, b)))
            i += 2
        else:
            i += 1
    return pairs


def moe_experts_sorted(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, counts: list[int],
                       order: torch.Tensor) -> torch.Tensor:
    """The reference's sorted segments, without its copies back to pair order: each expert's
    down product is written in place into one buffer, scaled by its pairs' routing weights,
    and added to the pairs' tokens with ``index_add_`` (each token's slots are then summed in
    expert order, not slot order: the last bits may differ from the reference). Segments of
    fewer than ``SMALL_SEGMENT`` rows go two experts at a time (:func:`_segment_pair`, experts
    of similar counts: :func:`_pair_small`), an unpaired one through :func:`_segment_split`;
    larger ones go through oneDNN where ``dense`` would (see ``mythos_kernels.linear``), else
    ``torch.mm``."""
    k = idx.shape[1]
    P, D = idx.numel(), x.shape[1]
    tok = order // k                                                     # token of each sorted pair
    split = _split_segments_ok(x, w13, w2)
    pairs = _pair_small(counts) if _pair_segments_ok(x, w13, w2) else []
    pad = max((max(counts[a], counts[b]) for a, b in pairs), default=0)
    # kept buffers (mythos_kernels._scratch: their pages stay mapped between loops)
    xs = scratch("moe_sorted_xs", (P + pad, D), x.dtype, x.device)   # + rows a last pair reads
    torch.index_select(x, 0, tok, out=xs[:P])
    xs[P:].zero_()                        # (their results are dropped; zeros keep NaN out)
    ys = scratch("moe_sorted_ys", (P, D), x.dtype, x.device)
    starts = [0, *itertools.accumulate(counts[:-1])]                    # each expert's first row
    for a, b in pairs:
        _segment_pair(xs, ys, w13, w2, a, starts[a], counts[a], b, starts[b], counts[b])
    paired = {e for pair in pairs for e in pair}
    dnn = _lin._onednn_ok(xs[:P], w13[0].t())
    for e, c in enumerate(counts):
        if c and e not in paired:
            seg = slice(starts[e], starts[e] + c)
            if split and c < SMALL_SEGMENT:
                _segment_split(xs[seg], w13[e], w2[e], ys[seg])
            elif dnn:
                hg = _lin.onednn_linear(xs[seg], w13[e].t())                    # [c, 2F]
                ys[seg] = _lin.onednn_linear(_swiglu(hg), w2[e].t())
            else:
                hg = xs[seg] @ w13[e]
                torch.mm(_swiglu(hg), w2[e], out=ys[seg])
    ys.mul_(weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, tok, ys)


# ============================================================================================
# Triton path: fused router, aligned grouped SwiGLU GEMMs, and their backward
# ============================================================================================

try:  # the kernels need triton; the references above do not
    from . import moe_kernels as _mk
    _mk_error = ""
except Exception as _exc:  # pragma: no cover - depends on the install
    _mk, _mk_error = None, f"{type(_exc).__name__}: {_exc}"

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_EXPERTS = 256  # the router and align kernels hold rows of E experts in registers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_route_inputs(logits: torch.Tensor, router_bias: torch.Tensor, topk: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"moe_route: logits must be [N, E], got shape {tuple(logits.shape)}")
    E = logits.shape[1]
    if router_bias.shape != (E,):
        raise ValueError(f"moe_route: router_bias must be [{E}], got {tuple(router_bias.shape)}")
    if not logits.is_floating_point() or not router_bias.is_floating_point():
        raise ValueError("moe_route: logits and router_bias must be floating point")
    if not (isinstance(topk, int) and 1 <= topk <= E):
        raise ValueError(f"moe_route: topk must be an int in [1, {E}], got {topk!r}")


def _check_expert_inputs(x, weights, idx, w13, w2) -> None:
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be [N, D], got shape {tuple(x.shape)}")
    N, D = x.shape
    if idx.dim() != 2 or idx.shape[0] != N:
        raise ValueError(f"moe_experts: idx must be [{N}, k], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe_experts: idx must be int64 or int32, got {idx.dtype}")
    if weights.shape != idx.shape:
        raise ValueError(f"moe_experts: weights {tuple(weights.shape)} must match idx "
                         f"{tuple(idx.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("moe_experts: w13 must be [E, D, 2F] and w2 [E, F, D]")
    E, F2 = w13.shape[0], w13.shape[2]
    if w13.shape[1] != D or F2 % 2 or w2.shape != (E, F2 // 2, D):
        raise ValueError(f"moe_experts: inconsistent shapes x {tuple(x.shape)}, w13 "
                         f"{tuple(w13.shape)} (want [E, {D}, 2F]), w2 {tuple(w2.shape)} "
                         f"(want [E, F, {D}])")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"moe_experts: x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, "
                         f"{w2.dtype}")
    if not weights.is_floating_point():
        raise ValueError("moe_experts: weights must be floating point")
    if idx.is_cpu and idx.numel() and not _compiling():
        # CPU only: a free host read there (on a GPU it would sync every call); the expert
        # stacks are indexed (and viewed with as_strided) by these ids
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= E:
            raise ValueError(f"moe_experts: expert ids must lie in [0, {E}), got values in "
                             f"[{lo}, {hi}]")


def _unsupported(a: torch.Tensor, b: torch.Tensor, n_experts: int) -> str | None:
    """Why the Triton MoE path cannot take these inputs (a, b: the float inputs), or None."""
    if _mk is None:
        return f"mythos_kernels.moe_kernels failed to import ({_mk_error})"
    if a.dtype not in _FLOAT_DTYPES or b.dtype not in _FLOAT_DTYPES:
        return f"dtype {a.dtype}/{b.dtype} not in fp32/bf16/fp16"
    if n_experts > MAX_EXPERTS:
        return f"n_experts {n_experts} > {MAX_EXPERTS}"
    return None


# ------------------------------------------------------------------------------ routing ----

def _route_launch(logits: torch.Tensor, router_bias: torch.Tensor, topk: int):
    N, E = logits.shape
    logits = logits.contiguous()
    bias = router_bias.contiguous()
    w = torch.empty(N, topk, dtype=logits.dtype, device=logits.device)
    idx = torch.empty(N, topk, dtype=torch.int64, device=logits.device)
    counts = torch.zeros(E, dtype=torch.int32, device=logits.device)
    if N:
        BLOCK_E = max(16, _next_pow2(E))
        BLOCK_T = _mk.route_block_t(BLOCK_E)
        sel_dtype = torch.promote_types(logits.dtype, router_bias.dtype)
        _mk._moe_route_kernel[(_cdiv(N, BLOCK_T),)](
            logits, bias, w, idx, counts, N, E, logits.stride(0),
            TOPK=topk, K_PAD=_next_pow2(topk), BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
            SEL_ROUND={torch.bfloat16: 1, torch.float16: 2}.get(sel_dtype, 0),
            num_warps=4)
    return w, idx, counts


def _route_grad_logits(logits: torch.Tensor, idx: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """d logits through w = s[idx] / sum(s[idx]), s = softmax(logits)."""
    s = torch.softmax(logits.float(), dim=-1)                      # [N, E]
    sk = s.gather(-1, idx)                                         # [N, k]
    S = sk.sum(-1, keepdim=True)
    w = sk / S
    dwf = dw.float()
    g = (dwf - (dwf * w).sum(-1, keepdim=True)) / S                # d s[idx]
    ds = torch.zeros_like(s).scatter_(-1, idx, g)
    dl = s * (ds - (g * sk).sum(-1, keepdim=True))
    return dl.to(logits.dtype)


class _MoERouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, router_bias, topk):
        w, idx, counts = _route_launch(logits, router_bias, topk)
        ctx.save_for_backward(logits, idx)
        ctx.mark_non_differentiable(idx, counts)
        return w, idx, counts

    @staticmethod
    def backward(ctx, dw, _didx, _dcounts):
        logits, idx = ctx.saved_tensors
        dl = _route_grad_logits(logits, idx, dw) if ctx.needs_input_grad[0] else None
        return dl, None, None  # router_bias gets no gradient, as in open-mythos


def moe_route_triton(logits: torch.Tensor, router_bias: torch.Tensor, topk: int,
                     return_counts: bool = False):
    """Fused router kernel: softmax(logits), top-k of logits + router_bias, gather, renormalize.

    logits [N, E], router_bias [E] -> weights [N, k] (logits' dtype), idx [N, k] int64, and with
    ``return_counts`` also counts [E] int32 (pairs per expert). Ties in ``logits + bias`` go to
    the lowest expert id. Differentiable w.r.t. logits (not router_bias).
    """
    _check_route_inputs(logits, router_bias, topk)
    why = _unsupported(logits, router_bias, logits.shape[1])
    if why:
        raise ValueError(f"moe_route_triton: {why}")
    if torch.is_grad_enabled() and logits.requires_grad:
        w, idx, counts = _MoERouteFn.apply(logits, router_bias, topk)
    else:
        w, idx, counts = _route_launch(logits, router_bias, topk)
    return (w, idx, counts) if return_counts else (w, idx)


# -------------------------------------------------------------------------------- align ----

class MoEAlign:
    """Pairs sorted by expert, each expert's segment padded to ``block_m``.

    sorted_ids  [max_blocks*block_m] int32: pair id ``n*k + j`` per slot, ``N*k`` for padding
                (slots past ``n_post`` are never written nor read);
    expert_ids  [max_blocks] int32: the expert of each row tile (-1 past ``n_post``);
    seg         [E+1] int32: padded segment starts, seg[E] = n_post;
    n_post      [1] int32: padded length actually used (stays on the device);
    counts      [E] int32: pairs per expert; nk = N*k.
    """

    def __init__(self, sorted_ids, expert_ids, seg, n_post, counts, block_m, max_blocks, nk):
        self.sorted_ids, self.expert_ids, self.seg = sorted_ids, expert_ids, seg
        self.n_post, self.counts = n_post, counts
        self.block_m, self.max_blocks, self.nk = block_m, max_blocks, nk


def moe_align_triton(idx: torch.Tensor, n_experts: int, block_m: int) -> MoEAlign:
    """Stable counting sort of ``idx`` ([N, k] expert ids) by expert, padded to ``block_m``.

    Three launches (per-chunk histograms, one-program scan, scatter) and no host sync: the
    grid bound ``cdiv(N*k, block_m) + min(E, N*k)`` tiles is known from shapes alone.
    """
    flat = idx.reshape(-1).contiguous()
    NK = flat.numel()
    E = n_experts
    dev = idx.device
    BLOCK_E = max(16, _next_pow2(E))
    CHUNK = _mk.align_chunk(BLOCK_E)
    n_chunks = max(1, _cdiv(NK, CHUNK))
    max_blocks = _cdiv(NK, block_m) + min(E, NK)
    P = max_blocks * block_m
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    seg = torch.empty(E + 1, dtype=torch.int32, device=dev)
    n_post = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    cc = torch.empty(n_chunks, BLOCK_E, dtype=torch.int32, device=dev)
    off = torch.empty(n_chunks, BLOCK_E, dtype=torch.int32, device=dev)
    _mk._moe_count_kernel[(n_chunks,)](flat, cc, NK, E, CHUNK=CHUNK, BLOCK_E=BLOCK_E,
                                       num_warps=4)
    blk = _mk.scan_block(BLOCK_E)
    _mk._moe_scan_kernel[(1,)](cc, off, counts, seg, expert_ids, n_post, sorted_ids,
                               n_chunks, E, NK, max_blocks, BLOCK_M=block_m, BLOCK_E=BLOCK_E,
                               BLOCK_C=blk, BLOCK_B=blk, num_warps=_mk.SCAN_WARPS)
    _mk._moe_scatter_kernel[(n_chunks,)](flat, off, seg, sorted_ids, NK, E, CHUNK=CHUNK,
                                         BLOCK_E=BLOCK_E, num_warps=4)
    return MoEAlign(sorted_ids, expert_ids, seg, n_post, counts, block_m, max_blocks, NK)


def moe_align_reference(idx: torch.Tensor, n_experts: int, block_m: int):
    """Plain-torch version of :func:`moe_align_triton` (host loop; for tests):
    (sorted_ids up to n_post, expert_ids up to n_post/block_m, seg [E+1], counts [E])."""
    flat = idx.reshape(-1)
    NK = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    ids, eids, seg, start = [], [], [0], 0
    for e in range(n_experts):
        c = int(counts[e])
        p = _cdiv(c, block_m) * block_m
        ids.append(order[start:start + c])
        ids.append(torch.full((p - c,), NK, dtype=order.dtype, device=idx.device))
        eids += [e] * (p // block_m)
        seg.append(seg[-1] + p)
        start += c
    dev = idx.device
    return (torch.cat(ids).to(torch.int32), torch.tensor(eids, dtype=torch.int32, device=dev),
            torch.tensor(seg, dtype=torch.int32, device=dev), counts.to(torch.int32))


# ------------------------------------------------------------------------ grouped GEMMs ----

def _dot_f32(t: torch.Tensor) -> bool:
    """Upcast tl.dot operands to fp32: only under the interpreter, whose 16-bit dot is wrong."""
    return interpreter_active() and t.device.type == "cpu" and t.dtype != torch.float32


def _aligned(*ts: torch.Tensor) -> bool:
    """16-byte aligned base pointers and every non-unit stride a multiple of 16 elements."""
    for t in ts:
        if t.data_ptr() % 16 or any(st % 16 for st in t.stride() if st != 1):
            return False
    return True


def _gemm(mode: str, al: MoEAlign, A, B, C, N: int, K: int, topk: int, *, fast: bool,
          b_trans: bool = False, gather: bool, scale: bool = False, out_pair: bool = False,
          aux=None, dw=None, rw=None, block_m: int | None = None):
    """One grouped GEMM over every aligned row tile (all experts, one launch).

    B is the stacked weight [E, K, N] (or [E, N, K] read transposed with ``b_trans``)."""
    BM, BN, BK, GM, nw, ns = _mk.gemm_config(mode, al.nk, B.shape[0], fast=fast,
                                             align_m=al.block_m, block_m=block_m)
    ratio = al.block_m // BM
    epi = {"plain": 0, "swiglu": 1, "swiglu_bwd": 2}[mode]
    tiles = al.max_blocks * ratio
    aligned = fast and _aligned(A, B, C, *(t for t in (aux,) if t is not None)) and N % 16 == 0
    grid = (tiles * _cdiv(N, BN),)
    _mk._moe_gemm_kernel[grid](
        A, A.stride(0), B, B.stride(0), B.stride(1),
        C, C.stride(0),
        aux if aux is not None else C, aux.stride(0) if aux is not None else 0,
        dw if dw is not None else C, dw.stride(0) if dw is not None else 0,
        rw if rw is not None else C, al.sorted_ids, al.expert_ids, al.n_post,
        al.nk, N, K, tiles,
        TOPK=topk, A_GATHER=gather, EPI=epi, SCALE=scale, OUT_PAIR=out_pair,
        STORE_AUX=aux is not None and epi == 1, B_TRANS=b_trans, ALIGNED=aligned,
        EVEN_K=K % BK == 0, EVEN_N=N % BN == 0, ALIGN_RATIO=ratio,
        PREC="ieee" if A.dtype == torch.float32 else "tf32",
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, DOT_F32=_dot_f32(A),
        num_warps=nw, num_stages=ns)


def _wgrad(al: MoEAlign, A, B, C, MA: int, NB: int, topk: int, *, fast: bool, a_gather: bool,
           b_gather: bool, rw=None):
    """Per-expert weight gradient C[e] = A[rows of e]^T B[rows of e] (B scaled by rw)."""
    E = C.shape[0]
    BM, BN, BK, nw, ns = _mk.wgrad_config(al.nk, E, fast)
    aligned = fast and _aligned(A, B, C) and MA % BM == 0 and NB % BN == 0
    grid = (_cdiv(MA, BM) * _cdiv(NB, BN), E)
    _mk._moe_wgrad_kernel[grid](
        A, A.stride(0), B, B.stride(0), C, rw if rw is not None else C, al.sorted_ids, al.seg,
        al.nk, MA, NB, TOPK=topk, A_GATHER=a_gather, B_GATHER=b_gather, B_SCALE=rw is not None,
        ALIGNED=aligned, PREC="ieee" if A.dtype == torch.float32 else "tf32",
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_F32=_dot_f32(A), num_warps=nw, num_stages=ns)


def _combine(y: torch.Tensor, N: int, topk: int) -> torch.Tensor:
    """out[n] = sum_j y[n*k + j], slot order, fp32 accumulation."""
    D = y.shape[1]
    out = torch.empty(N, D, dtype=y.dtype, device=y.device)
    BLOCK_D = min(1024, max(16, _next_pow2(D)))
    _mk._moe_combine_kernel[(N, _cdiv(D, BLOCK_D))](y, out, D, TOPK=topk, BLOCK_D=BLOCK_D,
                                                   num_warps=4)
    return out


def _experts_forward(x, weights, idx, w13, w2, block_m, train: bool):
    """The forward launches; returns (out, saved state for the backward or None)."""
    N, D = x.shape
    k = idx.shape[1]
    E, Fh = w2.shape[0], w2.shape[1]
    NK = N * k
    x, rw = x.contiguous(), weights.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    # large tiles need 16-bit inputs and 16-byte aligned rows (D, F multiples of 16)
    fast = x.dtype != torch.float32 and D % 16 == 0 and Fh % 16 == 0
    BM = _mk.gemm_config("swiglu", NK, E, fast=fast, block_m=block_m)[0]
    al = moe_align_triton(idx, E, BM)
    P = al.max_blocks * BM
    act = torch.empty(P, Fh, dtype=x.dtype, device=x.device)                      # [P, F]
    gu = torch.empty(P, 2 * Fh, dtype=x.dtype, device=x.device) if train else None  # [P, 2F]
    _gemm("swiglu", al, x, w13, act, Fh, D, k, fast=fast, gather=True, aux=gu, block_m=block_m)
    y = torch.empty(NK, D, dtype=x.dtype, device=x.device)                        # [N*k, D]
    _gemm("plain", al, act, w2, y, D, Fh, k, fast=fast, gather=False, scale=True,
          out_pair=True, rw=rw)
    out = _combine(y, N, k)
    if not train:
        return out, None
    return out, ((x, rw, w13, w2, act, gu, al.sorted_ids, al.expert_ids, al.seg, al.n_post,
                  al.counts), (BM, al.max_blocks, NK, k, weights.dtype, fast))


class _MoEExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, idx, w13, w2, block_m):
        out, (saved, meta) = _experts_forward(x, weights, idx, w13, w2, block_m, train=True)
        ctx.save_for_backward(*saved)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, dout):
        x, rw, w13, w2, act, gu, sid, eid, seg, n_post, counts = ctx.saved_tensors
        BM, max_blocks, NK, k, wdtype, fast = ctx.meta
        al = MoEAlign(sid, eid, seg, n_post, counts, BM, max_blocks, NK)
        N, D = x.shape
        E, Fh = w2.shape[0], w2.shape[1]
        dout = dout.contiguous()
        need_x, need_w, _, need_13, need_2 = ctx.needs_input_grad[:5]
        P = max_blocks * BM
        BNb = _mk.gemm_config("swiglu_bwd", NK, E, fast=fast, align_m=BM)[1]
        dgu = torch.empty(P, 2 * Fh, dtype=x.dtype, device=x.device)              # [P, 2F]
        dwp = torch.empty(NK, _cdiv(Fh, BNb), dtype=torch.float32, device=x.device)
        # h = dY[t] Wd^T (w2 read transposed); epilogue: d weights partials, d gate | d up
        _gemm("swiglu_bwd", al, dout, w2, dgu, Fh, D, k, fast=fast, b_trans=True, gather=True,
              aux=gu, dw=dwp, rw=rw)
        dweights = dwp.sum(1).view(N, k).to(wdtype) if need_w else None
        dw2 = dw13 = dx = None
        if need_2:     # dWd[e] = act[e]^T (w * dY[t])
            dw2 = torch.empty_like(w2)
            _wgrad(al, act, dout, dw2, Fh, D, k, fast=fast, a_gather=False, b_gather=True,
                   rw=rw)
        if need_13:    # dW13[e] = x[t]^T [d gate | d up]
            dw13 = torch.empty_like(w13)
            _wgrad(al, x, dgu, dw13, D, 2 * Fh, k, fast=fast, a_gather=True, b_gather=False)
        if need_x:     # dx[n] = sum_j [d gate | d up] W13[e]^T
            dxp = torch.empty(NK, D, dtype=x.dtype, device=x.device)
            _gemm("plain", al, dgu, w13, dxp, D, 2 * Fh, k, fast=fast, b_trans=True,
                  gather=False, out_pair=True)
            dx = _combine(dxp, N, k)
        return dx, dweights, None, dw13, dw2, None


def moe_experts_triton(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                       w13: torch.Tensor, w2: torch.Tensor, block_m: int | None = None
                       ) -> torch.Tensor:
    """Routed SwiGLU experts on the grouped-GEMM kernels (same contract as the reference).

    x [N, D], weights [N, k], idx [N, k], w13 [E, D, 2F] (gate|up), w2 [E, F, D] -> [N, D]::

        out[n] = sum_j w[n, j] * (silu(x[n] Wg[e]) * (x[n] Wu[e])) Wd[e],  e = idx[n, j]

    Launches: align (3), gate|up GEMM with SwiGLU epilogue (1), down GEMM with the routing
    weight in its epilogue (1), slot-order combine (1); no float atomics, no host sync.
    Differentiable w.r.t. x, weights, w13, w2. ``block_m`` forces the row tile (tests).
    Expert ids must lie in [0, E) (not checked: that would need a host sync).
    """
    _check_expert_inputs(x, weights, idx, w13, w2)
    why = _unsupported(x, weights, w13.shape[0])
    if why:
        raise ValueError(f"moe_experts_triton: {why}")
    if x.shape[0] == 0:
        return x.new_zeros(0, x.shape[1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w13, w2)):
        return _MoEExpertsFn.apply(x, weights, idx, w13, w2, block_m)
    return _experts_forward(x, weights, idx, w13, w2, block_m, train=False)[0]


# ------------------------------------------------------------------- dispatch entry points ----

def moe_route(logits: torch.Tensor, router_bias: torch.Tensor, topk: int):
    """Route tokens: logits [N, E], router_bias [E] -> (weights [N, k], idx [N, k] int64).

    Triton: :func:`moe_route_triton` (ties to the lowest expert id); reference:
    :func:`moe_route_reference` (torch.topk).
    """
    _check_route_inputs(logits, router_bias, topk)
    impl = choose("moe_route", logits, router_bias,
                  supported=_unsupported(logits, router_bias, logits.shape[1]))
    if impl == "triton":
        if _compiling() and not _needs_grad(logits):
            return torch.ops.mythos.moe_route(logits, router_bias, int(topk))
        return moe_route_triton(logits, router_bias, topk)
    return moe_route_reference(logits, router_bias, topk)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts, see :func:`moe_experts_triton` / :func:`moe_experts_reference`."""
    _check_expert_inputs(x, weights, idx, w13, w2)
    impl = choose("moe_experts", x, weights, idx, w13, w2,
                  supported=_unsupported(x, weights, w13.shape[0]))
    if impl == "triton":
        if _compiling() and not _needs_grad(x, weights, w13, w2):
            return torch.ops.mythos.moe_experts(x, weights, idx, w13, w2)
        return moe_experts_triton(x, weights, idx, w13, w2)
    if _cpu_inference(x, idx, w13, w2):
        return moe_experts_cpu(x, weights, idx, w13, w2)
    if _gather_under_compile(x, weights, idx, w13, w2):
        return moe_experts_gathered(x, weights, idx, w13, w2)
    return moe_experts_reference(x, weights, idx, w13, w2)


def _gather_under_compile(x, weights, idx, w13, w2) -> bool:
    """Tracing under torch.compile without autograd, with no more (token, slot) pairs than
    experts (decode): :func:`moe_experts_gathered` instead of the reference, whose host read of
    the expert counts would break the graph."""
    return (_compiling() and not _needs_grad(x, weights, w13, w2)
            and 0 < idx.numel() <= w13.shape[0])


def moe_experts_gathered(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                         w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`moe_experts_reference` with no host read (traceable, e.g. a compiled decode
    step): every (token, slot) pair's expert weights gathered, one batched product per
    projection, the slots weighted and summed. Reads and copies N*k experts' weights, so it
    serves only while that is at most the whole stack (``N * k <= E``, see
    :func:`moe_experts`). x [N, D], weights/idx [N, k] -> [N, D]."""
    N, k = idx.shape
    flat = idx.reshape(-1)
    hg = torch.bmm(x.repeat_interleave(k, dim=0).unsqueeze(1),
                   w13.index_select(0, flat))                                  # [N*k, 1, 2F]
    a = _swiglu(hg)
    y = torch.bmm(a, w2.index_select(0, flat)).view(N, k, -1)                   # [N, k, D]
    return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)


# Inference under torch.compile: the Triton paths as opaque torch.library ops (fake impls give
# the output shapes for tracing), so a compiled decode step has no graph break here. With
# gradients the autograd.Function paths run (a graph break under compile).

def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


@torch.library.custom_op("mythos::moe_route", mutates_args=())
def _moe_route_op(logits: torch.Tensor, router_bias: torch.Tensor,
                  topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, idx = moe_route_triton(logits, router_bias, topk)
    return w, idx.to(torch.int64)


@_moe_route_op.register_fake
def _(logits, router_bias, topk):
    N = logits.shape[0]
    return logits.new_empty(N, topk), logits.new_empty(N, topk, dtype=torch.int64)


@torch.library.custom_op("mythos::moe_experts", mutates_args=())
def _moe_experts_op(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    return moe_experts_triton(x, weights, idx, w13, w2)


@_moe_experts_op.register_fake
def _(x, weights, idx, w13, w2):
    return x.new_empty(x.shape[0], w2.shape[-1])


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
