"""CPU inference forms of the routed MoE experts (:func:`mythos_kernels.moe.moe_experts`), and
its CPU autograd (training) forms; each registers itself with the
dispatch point (:func:`mythos_kernels._dispatch.register_cpu`) and is tested against
:func:`~mythos_kernels.moe.moe_experts_reference`.

Inference (no autograd), :func:`moe_experts_cpu`: per pair for decode (two experts per bmm),
two padded bmms for balanced routing, and the sorted segments without the pair-order copies for
skewed routing (random-init models send most tokens to a few experts). Training:
:func:`moe_experts_sorted_autograd`, the sorted pairs with one product per non-empty expert and
its own backward, or for balanced routing (as the router-bias update makes it) bmms over a
padded slab, chosen by the inference rule (:func:`_padded_is_cheaper`); inside
:func:`summed_expert_grads` the recurrent loops' expert weight gradients are summed in one
buffer per weight. :func:`moe_experts_grouped`, the sorted pairs through
two grouped GEMMs that have a CPU kernel and autograd, serves where it is switched off.

Variants (names for :func:`mythos_kernels.cpu_variant`): ``moe_experts_cpu``,
``moe_sorted_autograd``, ``moe_grouped_mm`` (forms); ``moe_pairs``, ``moe_split``,
``moe_seg_pairs``, ``moe_scratch`` (switches inside ``moe_experts_cpu``); ``moe_summed_grads``,
``moe_padded_train`` (inside ``moe_sorted_autograd``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from contextvars import ContextVar
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from .._dispatch import _compiling, _transformed, cpu_enabled, cpu_inference, register_cpu
from .._scratch import kept_output, scratch
from ..grad_sink import attach_sum
from ..moe import _swiglu, _swiglu_in_place
from . import linear as _lin
from .linear import vecmat


def _buffer(tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
            ) -> torch.Tensor:
    """A kept buffer (:func:`mythos_kernels._scratch.scratch`: its pages stay mapped between
    loops), or a fresh one with the ``moe_scratch`` variant off."""
    if cpu_enabled("moe_scratch"):
        return scratch(tag, shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


FEW_PAIRS = 32  # CPU, no autograd, at most this many (token, slot) pairs: the per-pair path


def _serves_inference(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                      w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Pairs to route and :func:`cpu_inference` (no autograd): :func:`moe_experts_cpu` serves."""
    return idx.numel() > 0 and cpu_inference(x, w13, w2)


def moe_experts_few_pairs(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                          w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`~mythos_kernels.moe.moe_experts_reference` for a handful of (token, slot) pairs (CPU decode, no
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
    return (idx.numel() > 1 and cpu_enabled("moe_pairs")
            and _fp32_stacks(x, w13, w2, _lin.SPLIT_MIN_WEIGHT))


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
    """:func:`~mythos_kernels.moe.moe_experts_reference` for CPU inference (no autograd), in the
    fastest of three plain-torch forms:

    - at most ``FEW_PAIRS`` pairs (decode): :func:`moe_experts_few_pairs` (two pairs per bmm);
    - balanced routing: :func:`moe_experts_padded`, two bmms over all experts;
    - otherwise (skewed routing, e.g. a random-init model): :func:`moe_experts_sorted`, the
      reference's sorted segments without its pair-order copies, small segments two experts per
      bmm and large ones through oneDNN.

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
    calls). The constants are the ``moe_forms`` bench suite's (balanced to skewed routings)."""
    E = len(counts)
    if paired and pairs < PAD_MIN_ROWS * E:
        return False
    return E * max(counts) <= pairs + PAD_SEGMENT_ROWS * (E - counts.count(0))


def _slab_rows(idx: torch.Tensor, order: torch.Tensor, first: torch.Tensor, cap: int
               ) -> torch.Tensor:
    """Each (token, slot) pair's row in a padded ``[E * cap]`` slab: ``e * cap + rank`` (its
    expert e, its rank among e's pairs in ``order``, the pairs stably sorted by expert;
    ``first`` [E]: each expert's first sorted pair) -> [N, k]."""
    flat = idx.reshape(-1)
    e_sorted = flat[order]
    rank = torch.arange(flat.numel(), device=idx.device) - first[e_sorted]
    return torch.empty_like(order).index_put_((order,), e_sorted * cap + rank).view(idx.shape)


def _fill_slab(slab: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Writes x [N, D]'s row n at each of its slab rows ``rows[n]`` [N, k] of the zeroed slab."""
    for r in rows.unbind(1):
        slab.index_copy_(0, r, x)
    return slab


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
    # kept buffers for the slab and the products (mythos_kernels._scratch: their pages stay
    # mapped between loops); only ``out`` is new. The padding rows' results are never read;
    # zeroing them keeps stale values (NaN, denormals) out of the products
    slab = _buffer("moe_padded_slab", (E * cap, D), x.dtype, x.device).zero_()
    rows = _slab_rows(idx, order, torch.cumsum(counts, 0) - counts, cap)
    _fill_slab(slab, x, rows)
    slot = rows.view(-1)
    hg = torch.bmm(slab.view(E, cap, D), w13,
                   out=_buffer("moe_padded_hg", (E, cap, w13.shape[2]), x.dtype, x.device))
    y = torch.bmm(_swiglu_in_place(hg), w2,
                  out=_buffer("moe_padded_y", (E, cap, D), x.dtype, x.device))   # [E, cap, D]
    y = torch.index_select(y.view(E * cap, D), 0, slot,
                           out=_buffer("moe_padded_sel", (N * k, D), x.dtype, x.device))
    y = y.view(N, k, D).mul_(weights.unsqueeze(-1).to(x.dtype))
    if k == 1:
        return y[:, 0].clone()
    out = y[:, 0] + y[:, 1]
    for j in range(2, k):
        out.add_(y[:, j])
    return out


SMALL_SEGMENT = 128   # sorted form: experts with fewer rows take the two-core split products
# ... when an expert's w13 has at least this many elements (smaller ones: the split's own cost
# outweighs the second core)
SPLIT_MIN_EXPERT = 1 << 17


def _split_segments_ok(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`moe_experts_sorted` multiplies small segments with
    :func:`_segment_split` (fp32, contiguous stacks, an even model dim, experts of at least
    ``SPLIT_MIN_EXPERT`` elements), with at least two threads to split over."""
    return (w2.shape[2] % 2 == 0 and cpu_enabled("moe_split") and _lin.two_threads()
            and _fp32_stacks(x, w13, w2, SPLIT_MIN_EXPERT))


def _segment_split(xs: torch.Tensor, w13e: torch.Tensor, w2e: torch.Tensor, out: torch.Tensor
                   ) -> None:
    """One expert's SwiGLU over a few rows, each product as one bmm over two column halves of the
    weight (one per core; no copy of the weight): the gate and up halves of ``w13e`` [D, 2F],
    then the two column halves of ``w2e`` [F, D]; writes [c, D] into ``out``. Few-row products
    are compute-bound and MKL or oneDNN parallelize them poorly; from ``SMALL_SEGMENT`` rows
    oneDNN is as fast or faster."""
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
    (:func:`_segment_pair`): fp32 with contiguous stacks, any expert size and thread count (the
    calls it saves are most of a small segment's cost)."""
    return cpu_enabled("moe_seg_pairs") and _fp32_stacks(x, w13, w2, 0)


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
    xs = _buffer("moe_sorted_xs", (P + pad, D), x.dtype, x.device)   # + rows a last pair reads
    torch.index_select(x, 0, tok, out=xs[:P])
    xs[P:].zero_()                        # (their results are dropped; zeros keep NaN out)
    ys = _buffer("moe_sorted_ys", (P, D), x.dtype, x.device)
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


# ---------------------------------------------------------------------- autograd (training) ----

def _serves_autograd(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                     w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """CPU tensors with autograd through one of them, fp32 or bf16, rows of D and F elements on
    16-byte strides with contiguous expert stacks (``F.grouped_mm``'s layout rule), CPU autocast
    off, eager (not traced, not inside a ``torch.func`` transform): :func:`moe_experts_grouped`
    serves."""
    ts = (x, weights, w13, w2)
    align = 16 // x.element_size()
    return (idx.numel() > 0 and all(t.device.type == "cpu" for t in (*ts, idx))
            and x.shape[1] % align == 0 and w2.shape[1] % align == 0
            and w13.is_contiguous() and w2.is_contiguous()
            and torch.is_grad_enabled() and any(t.requires_grad for t in ts)
            and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu") and not _compiling() and not _transformed())


def _serves_sorted_autograd(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                            w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """CPU tensors with autograd through one of them, fp32 or bf16, contiguous expert stacks, CPU
    autocast off, eager (not traced, not inside a ``torch.func`` transform):
    :func:`moe_experts_sorted_autograd` serves."""
    ts = (x, weights, w13, w2)
    return (idx.numel() > 0 and all(t.device.type == "cpu" for t in (*ts, idx))
            and w13.is_contiguous() and w2.is_contiguous()
            and torch.is_grad_enabled() and any(t.requires_grad for t in ts)
            and x.dtype in (torch.float32, torch.bfloat16) and w13.dtype == w2.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and not _compiling() and not _transformed())


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, first row, end row)`` of each non-empty expert's sorted rows."""
    segs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            segs.append((e, start, start + c))
            start += c
    return segs


def _empty_runs(counts: list[int]) -> list[tuple[int, int]]:
    """``(first, end)`` of each run of consecutive experts with no rows."""
    runs: list[tuple[int, int]] = []
    for e, c in enumerate(counts):
        if not c:
            if runs and runs[-1][1] == e:
                runs[-1] = (runs[-1][0], e + 1)
            else:
                runs.append((e, e + 1))
    return runs


def _swiglu_grad(da: torch.Tensor, hg: torch.Tensor, sig: torch.Tensor, silu: torch.Tensor
                 ) -> torch.Tensor:
    """d(gate|up) [..., 2F] of ``silu(gate) * up`` from its output gradient ``da`` [..., F], in
    one pass per half: ``da * silu`` for up, ``da * up * silu'(gate)`` for the gate with
    ``silu'(g) = s (1 + g (1 - s))`` (``s = sigmoid(gate)``, ``silu`` as computed from it)."""
    Fh = da.shape[-1]
    gate, up = hg[..., :Fh], hg[..., Fh:]
    dhg = torch.empty_like(hg)
    torch.mul(da, silu, out=dhg[..., Fh:])
    dhg[..., :Fh] = torch.rsub(sig, 1).mul_(gate).add_(1).mul_(sig).mul_(up).mul_(da)
    return dhg


class _SortedExpertsFn(torch.autograd.Function):
    """The routed SwiGLU experts over the pairs sorted by expert, one ``mm`` per non-empty expert
    and product; the sort is made once and reused by backward. Backward: the SwiGLU derivative
    (:func:`_swiglu_grad`), the weight gradients as
    one product per non-empty expert, no work for empty experts beyond a zero fill.
    Saved: the sorted rows ``xs`` [P, D], the gate|up product ``hg`` [P, 2F] and the expert
    outputs ``ys`` [P, D] (for the routing weights' gradient); the SwiGLU output is recomputed."""

    @staticmethod
    def forward(ctx, x, weights, idx, w13, w2, acc, order, counts):
        N, k = idx.shape
        D = x.shape[1]
        P, Fh = N * k, w2.shape[1]
        segs = _segments(counts)
        tok = order // k                                                 # token of each sorted pair
        xs = x.index_select(0, tok)                                      # [P, D]
        hg = x.new_empty(P, 2 * Fh)
        for e, s, t in segs:
            torch.mm(xs[s:t], w13[e], out=hg[s:t])
        a = _swiglu(hg)                                                  # [P, F]
        ys = x.new_empty(P, D)
        for e, s, t in segs:
            torch.mm(a[s:t], w2[e], out=ys[s:t])
        ws = weights.reshape(-1).index_select(0, order).to(x.dtype)     # [P]
        out = torch.zeros_like(x).index_add_(0, tok, ys * ws.unsqueeze(1))
        ctx.save_for_backward(xs, hg, ys, ws, tok, order, w13, w2)
        ctx.segs = segs
        ctx.shape, ctx.w_dtype, ctx.acc = (N, k), weights.dtype, acc
        return out

    @staticmethod
    def backward(ctx, dout):
        xs, hg, ys, ws, tok, order, w13, w2 = ctx.saved_tensors
        segs = ctx.segs
        need_x, need_w, _, need_w13, need_w2 = ctx.needs_input_grad[:5]
        acc = ctx.acc
        Fh = w2.shape[1]
        g = dout.index_select(0, tok)                                    # [P, D] d(ys * ws)
        dweights = dx = dw13 = dw2 = None
        if need_w:
            dws = (g * ys).sum(1)
            dweights = torch.empty_like(dws).index_copy_(0, order, dws).view(ctx.shape)
            dweights = dweights.to(ctx.w_dtype)
        dys = g.mul_(ws.unsqueeze(1))                                    # [P, D]
        gate, up = hg[:, :Fh], hg[:, Fh:]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grads = acc if acc is not None else _LoopGrads(kept=False)
        if need_w2:
            grads.add("w2", silu * up, dys, segs, w2.shape)
        if need_x or need_w13:
            da = torch.empty_like(silu)                                  # [P, F]
            for e, s, t in segs:
                torch.mm(dys[s:t], w2[e].t(), out=da[s:t])
            dhg = _swiglu_grad(da, hg, sig, silu)                        # [P, 2F]
            if need_w13:
                grads.add("w13", xs, dhg, segs, w13.shape)
            if need_x:
                dxs = torch.empty_like(xs)
                for e, s, t in segs:
                    torch.mm(dhg[s:t], w13[e].t(), out=dxs[s:t])
                dx = torch.zeros_like(dout).index_add_(0, tok, dxs)
        if acc is None:                       # this call's own gradients, else summed elsewhere
            dw13, dw2 = grads.take("w13"), grads.take("w2")
        return dx, dweights, None, dw13, dw2, None, None, None


class _PaddedExpertsFn(torch.autograd.Function):
    """The routed SwiGLU experts over a zero-padded slab ``[E, cap, D]`` (each expert's pairs in
    its rows, ``cap`` the largest count), every product one bmm over all experts: for balanced
    routing, where the sorted form's per-expert products are all small (a few dozen rows each,
    where MKL runs far below its matmul rate) and a bmm runs the experts one per core. Backward:
    the gradient rows scattered into the same slab (zero in the padding, so the padding adds
    nothing to the weight gradients), the SwiGLU derivative (:func:`_swiglu_grad`),
    the weight gradients as one bmm each (added into the running sums inside
    :func:`summed_expert_grads`). Each token's slots are summed in slot order, as in the reference.
    Saved: x itself (the slab, k copies of each row and the padding, is rebuilt for the w13
    gradient), the gate|up product ``hg`` (``E * cap`` rows) and the pairs' expert outputs
    [N, k, D] (for the routing weights' gradient)."""

    @staticmethod
    def forward(ctx, x, weights, idx, w13, w2, acc, order, counts):
        N, k = idx.shape
        E, D = w13.shape[0], x.shape[1]
        cap = max(counts)
        first = torch.tensor([0, *itertools.accumulate(counts[:-1])], device=x.device)
        rows = _slab_rows(idx, order, first, cap)                        # [N, k]
        xs = _fill_slab(x.new_zeros(E * cap, D), x, rows)
        hg = torch.bmm(xs.view(E, cap, D), w13)                         # [E, cap, 2F]
        ys = torch.bmm(_swiglu(hg), w2).view(E * cap, D)
        yp = ys.index_select(0, rows.view(-1)).view(N, k, D)             # [N, k, D]
        ws = weights.to(x.dtype)
        out = yp[:, 0] * ws[:, :1]
        for j in range(1, k):
            out.addcmul_(yp[:, j], ws[:, j:j + 1])
        ctx.save_for_backward(x, hg, yp, ws, rows, w13, w2)
        ctx.cap, ctx.w_dtype, ctx.acc = cap, weights.dtype, acc
        return out

    @staticmethod
    def backward(ctx, dout):
        x, hg, yp, ws, rows, w13, w2 = ctx.saved_tensors
        need_x, need_w, _, need_w13, need_w2 = ctx.needs_input_grad[:5]
        acc, cap = ctx.acc, ctx.cap
        N, k, D = yp.shape
        E, Fh = w13.shape[0], w2.shape[1]
        slot = rows.view(-1)
        dx = dweights = dw13 = dw2 = None
        if need_w:
            dweights = (yp * dout.unsqueeze(1)).sum(-1).to(ctx.w_dtype)
        dys = dout.new_zeros(E * cap, D)                                 # d(expert outputs)
        dys.index_copy_(0, slot, (dout.unsqueeze(1) * ws.unsqueeze(-1)).view(N * k, D))
        dys = dys.view(E, cap, D)
        gate, up = hg[..., :Fh], hg[..., Fh:]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grads = acc if acc is not None else _LoopGrads(kept=False)
        if need_w2:
            grads.add_all("w2", (silu * up).transpose(1, 2), dys, w2.shape)   # [E, F, cap] @
        if need_x or need_w13:
            da = torch.bmm(dys, w2.transpose(1, 2))                      # [E, cap, F]
            dhg = _swiglu_grad(da, hg, sig, silu)                        # [E, cap, 2F]
            if need_w13:
                xs = _fill_slab(x.new_zeros(E * cap, D), x, rows)
                grads.add_all("w13", xs.view(E, cap, D).transpose(1, 2), dhg, w13.shape)
            if need_x:
                dxs = torch.bmm(dhg, w13.transpose(1, 2)).view(E * cap, D)
                dx = dxs.index_select(0, slot).view(N, k, D).sum(1)
        if acc is None:                       # this call's own gradients, else summed elsewhere
            dw13, dw2 = grads.take("w13"), grads.take("w2")
        return dx, dweights, None, dw13, dw2, None, None, None


class _LoopGrads:
    """The weight gradients of one expert stack summed over every use of it (the loops of a
    recurrent block): each use's backward adds its experts' products into one ``[E, R, C]``
    buffer per weight (an expert's first product written, later ones added: no per-use zero
    fill and no per-use sum of full stacks); the stack's aliases (``attach_sum``) take the sums.
    A call outside :func:`summed_expert_grads` builds its own gradients in one
    (``kept=False``: fresh buffers, as the caller keeps them) and takes them at once."""

    def __init__(self, kept: bool = True) -> None:
        self._bufs: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self._kept = kept

    def _buf(self, name: str, shape: torch.Size, like: torch.Tensor
             ) -> tuple[torch.Tensor, list[int]]:
        if name not in self._bufs:
            # with ``kept``, a kept output (its pages stay mapped from one step to the next: a
            # new buffer of this size faults in page by page) once the previous step's gradient
            # is dropped
            dw = (kept_output("moe_summed_" + name, tuple(shape), like.dtype, like.device)
                  if self._kept else None)
            self._bufs[name] = (like.new_empty(shape) if dw is None else dw, [0] * shape[0])
        return self._bufs[name]

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, segs: list[tuple[int, int, int]],
            shape: torch.Size) -> None:
        """Add ``a[s:t].T @ b[s:t]`` to expert e's slice of the ``name`` sum, for each segment."""
        dw, written = self._buf(name, shape, a)
        for e, s, t in segs:
            if written[e]:
                dw[e].addmm_(a[s:t].t(), b[s:t])
            else:
                torch.mm(a[s:t].t(), b[s:t], out=dw[e])
                written[e] = 1

    def add_all(self, name: str, a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> None:
        """Add the batched product ``a @ b`` (``[E, R, c] @ [E, c, C]``) to every expert's slice
        of the ``name`` sum."""
        dw, written = self._buf(name, shape, a)
        if not any(written):
            torch.bmm(a, b, out=dw)
        else:
            for lo, hi in _empty_runs(written):
                dw[lo:hi].zero_()
            dw.baddbmm_(a, b)
        written[:] = [1] * len(written)

    def take(self, name: str) -> torch.Tensor | None:
        """The ``name`` sum (zeros for experts no use reached), or None when no use added one;
        the buffer is handed over (a later backward starts a new sum)."""
        buf = self._bufs.pop(name, None)
        if buf is None:
            return None
        dw, written = buf
        for lo, hi in _empty_runs(written):
            dw[lo:hi].zero_()
        return dw


# expert stacks whose weight gradients the training form sums over uses: id(w13) ->
# (w13, w2, w13 view, w2 view, _LoopGrads); set by :func:`summed_expert_grads`
_SUMMED: ContextVar[dict | None] = ContextVar("mythos_summed_expert_grads", default=None)


@contextlib.contextmanager
def summed_expert_grads(stacks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, the CPU training form (:func:`moe_experts_sorted_autograd`) sums the
    weight gradients of these ``(w13, w2)`` expert stacks over all its calls (e.g. the loops of
    a recurrent block) into one buffer per weight, returned once to the stack's parameters, where
    each call would return full ``[E, ...]`` gradients that autograd then adds up. The gradients
    are the same up to summation order; calls served by another form are unaffected. Only
    stacks of CPU tensors that need a gradient, with autograd on, eager (not traced), the
    ``moe_summed_grads`` variant on."""
    table = dict(_SUMMED.get() or {})
    if (cpu_enabled("moe_summed_grads") and torch.is_grad_enabled() and not _compiling()
            and not _transformed()):
        for w13, w2 in stacks:
            if (w13.device.type == w2.device.type == "cpu"
                    and (w13.requires_grad or w2.requires_grad)):
                acc = _LoopGrads()
                v13 = attach_sum(functools.partial(acc.take, "w13"), w13)
                v2 = attach_sum(functools.partial(acc.take, "w2"), w2)
                table[id(w13)] = (w13, w2, v13, v2, acc)
    token = _SUMMED.set(table)
    try:
        yield
    finally:
        _SUMMED.reset(token)


def moe_experts_sorted_autograd(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                                w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`~mythos_kernels.moe.moe_experts_reference` for CPU training, the pairs sorted by
    expert once: :class:`_SortedExpertsFn`, one product per non-empty expert in forward and
    backward, the pairs' outputs weighted and added to their tokens with ``index_add`` (each
    token's slots summed in expert order: the last bits may differ from the reference); or, where
    :func:`_padded_is_cheaper` finds the routing balanced enough (and the ``moe_padded_train``
    variant is on), :class:`_PaddedExpertsFn`, bmms over a padded slab. One host read (the
    expert counts). Inside :func:`summed_expert_grads` for this stack, the weight gradients
    are summed over the calls. x [N, D], weights/idx [N, k], w13 [E, D, 2F], w2 [E, F, D] ->
    [N, D]."""
    acc = None
    entry = (_SUMMED.get() or {}).get(id(w13))
    if entry is not None and entry[0] is w13 and entry[1] is w2:
        w13, w2, acc = entry[2], entry[3], entry[4]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                             # pairs sorted by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()       # the one host read
    form = (_PaddedExpertsFn if cpu_enabled("moe_padded_train")
            and _padded_is_cheaper(counts, flat.numel()) else _SortedExpertsFn)
    return form.apply(x, weights, idx, w13, w2, acc, order, counts)


def moe_experts_grouped(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                        w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """:func:`~mythos_kernels.moe.moe_experts_reference` as two grouped GEMMs
    (``F.grouped_mm``: one call over every expert's sorted rows, a CPU kernel and autograd),
    where the reference runs two products per expert and autograd records each. The pairs'
    outputs are weighted and added to their tokens with ``index_add`` (each token's slots summed
    in expert order: the last bits may differ from the reference). One host read (none: the
    offsets stay a tensor). x [N, D], weights/idx [N, k], w13 [E, D, 2F], w2 [E, F, D] -> [N, D]."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)                             # pairs sorted by expert
    offs = torch.cumsum(torch.bincount(flat, minlength=w13.shape[0]), 0).to(torch.int32)
    tok = order // k                                                     # token of each sorted pair
    hg = F.grouped_mm(x.index_select(0, tok), w13, offs=offs)            # [N*k, 2F]
    ys = F.grouped_mm(_swiglu(hg), w2, offs=offs)                        # [N*k, D]
    ys = ys * weights.reshape(-1).index_select(0, order).to(ys.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add(0, tok, ys)


register_cpu("moe_experts", "moe_experts_cpu", moe_experts_cpu, serves=_serves_inference,
             doc="inference: per pair (decode), padded slab (balanced) or sorted segments")
register_cpu("moe_experts", "moe_sorted_autograd", moe_experts_sorted_autograd,
             serves=_serves_sorted_autograd,
             doc="autograd: the sorted pairs, one product per non-empty expert, own backward")
register_cpu("moe_experts", "moe_summed_grads",
             doc="training form: expert weight grads summed over the loops (summed_expert_grads)")
register_cpu("moe_experts", "moe_padded_train",
             doc="training form: balanced routing as bmms over a padded slab (else sorted)")
register_cpu("moe_experts", "moe_grouped_mm", moe_experts_grouped, serves=_serves_autograd,
             doc="autograd: the sorted pairs through two F.grouped_mm")
register_cpu("moe_experts", "moe_pairs", doc="decode pairs two experts per bmm (else per pair)")
register_cpu("moe_experts", "moe_split",
             doc="sorted form: small segments as two-core split products (else oneDNN / mm)")
register_cpu("moe_experts", "moe_seg_pairs",
             doc="sorted form: small segments two experts per bmm (else one at a time)")
register_cpu("moe_experts", "moe_scratch",
             doc="padded and sorted forms write kept buffers (else fresh torch.empty)")
