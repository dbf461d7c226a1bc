"""CPU inference forms of the linear layers (:mod:`mythos_kernels.linear`): ``dense`` (every
projection of the model) and the LM head ``logits = x @ W^T`` (W the tied embedding, [V, D]).
Each registers itself with the dispatch point; the variants, by name (:func:`mythos_kernels.cpu_variant`):

* ``dense_split`` (form of ``dense``): at most ``SPLIT_ROWS`` rows multiply the weight's two row
  halves in one ``bmm``, one half per core (a few-row product is a matrix-vector product bound by
  reading the weight, which MKL runs on one core). No copy; the last bits may differ from
  ``F.linear``.
* ``onednn`` (form of ``dense``, and a switch read by the head and the MoE forms;
  ``$MYTHOS_CPU_ONEDNN`` sets its default): more rows through oneDNN
  (``torch.ops.mkldnn._linear_pointwise``, the op torch's own CPU compiler emits for linear
  layers), faster than MKL's sgemm for weights of at least ``ONEDNN_MIN_WEIGHT`` elements or
  products of at least ``ONEDNN_MIN_MACS`` multiply-adds; its sums are blocked differently.
  Torch builds without the op (checked once, against ``F.linear``) use ``F.linear``.
* ``lm_head_cpu`` (form of ``lm_head``, vocabularies over ``VOCAB_BLOCK``): decode rows (at
  most ``DECODE_ROWS``) multiply a cached transposed copy [D, V], which MKL reads at about 2.5x
  the rate of ``x @ W^T``, split over D (``vecmat_head``: two contiguous halves, one per core);
  more rows through oneDNN, logits of over ``KEPT_HEAD_MIN_BYTES`` written in column blocks into
  a kept output (``head_kept``); without oneDNN, MKL in column blocks of ``VOCAB_BLOCK`` (the
  same numbers, written into one preallocated output).
* ``weight_copies`` (``$MYTHOS_CPU_WEIGHT_COPIES`` sets its default): whether derived copies of
  weights (the head's transposed copy, the packed shared-expert weights) may be kept; they are
  remade whenever the weight changes (:func:`derived`).
* ``packed_swiglu``: the MoE's shared experts as two products over packed weights
  (:func:`shared_swiglu_packed`).

Inside ``torch.compile`` these forms are off by default (their caches of derived weights and the
thread count cannot be traced): code being compiled sees plain ``F.linear``. A caller that
compiles a decode step can still have them (``generate(..., compiled=True)`` does): it passes
the head's transposed copy (:func:`decode_head_weight`) into the compiled function as an input
and multiplies with :func:`lm_head_transposed`, and runs the compiled function inside
:func:`compiled_split` so that ``dense`` traces the split product (Dynamo guards on the switch).
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._dispatch import _compiling, choose, cpu_enabled, cpu_inference, register_cpu
from .._scratch import kept_output
from ..linear import VOCAB_BLOCK, dense

# logits of more than this go into a kept output (_scratch.kept_output): glibc maps blocks over
# 32 MB afresh on every call and each page faults in; oneDNN's product has no out= form, so it
# fills that output in column blocks of about HEAD_BLOCK_BYTES (heap-served temporaries)
KEPT_HEAD_MIN_BYTES = 32 << 20
HEAD_BLOCK_BYTES = 4 << 20
DECODE_ROWS = 64
SPLIT_ROWS = 8       # at most this many rows: the split (two-core) matrix-vector product
SPLIT_MIN_OUT = 64   # smaller weights: the bmm's own overhead outweighs the second core
# Weights of fewer elements take the plain product in the few-row CPU forms (split products,
# packing, expert pairs): such weights stay in cache, where those forms only add calls
SPLIT_MIN_WEIGHT = 1 << 14
_DERIVED: dict[tuple, list] = {}   # key -> [stamp, fingerprints, scope, copy]


_ONEDNN: list[bool] = []   # [available], probed on first use
# oneDNN for weights of at least ONEDNN_MIN_WEIGHT elements, or products of at least
# ONEDNN_MIN_MACS multiply-adds; below both its per-call cost outweighs its rate
ONEDNN_MIN_WEIGHT = 1 << 17
ONEDNN_MIN_MACS = 1 << 24


def onednn_available() -> bool:
    """Whether oneDNN's linear op is present and agrees with ``F.linear`` (probed once)."""
    if not _ONEDNN:
        ok = False
        try:
            op = torch.ops.mkldnn._linear_pointwise
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(9, 24, generator=g), torch.randn(10, 24, generator=g)
            b = torch.randn(10, generator=g)
            with torch.no_grad():
                y = op(x, w, b, "none", [], "")
            ok = y.shape == (9, 10) and torch.allclose(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        except Exception:  # noqa: BLE001 - any failure means "not usable": F.linear serves
            ok = False
        _ONEDNN.append(ok)
    return _ONEDNN[0]


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``dense``/``lm_head`` multiply through oneDNN: CPU fp32 inference with more than
    ``SPLIT_ROWS`` rows (fewer: the split matrix-vector path), a weight of at least
    ``ONEDNN_MIN_WEIGHT`` elements or a product of at least ``ONEDNN_MIN_MACS`` multiply-adds,
    the ``onednn`` variant on (``$MYTHOS_CPU_ONEDNN`` sets its default)."""
    return (x.dtype == weight.dtype == torch.float32 and weight.dim() == 2 and x.dim() >= 2
            and x.shape[-1] == weight.shape[1] and x.numel() > SPLIT_ROWS * x.shape[-1]
            and (weight.numel() >= ONEDNN_MIN_WEIGHT
                 or x.numel() // x.shape[-1] * weight.numel() >= ONEDNN_MIN_MACS)
            and cpu_enabled("onednn")
            and cpu_inference(x, weight) and onednn_available())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN (caller checks :func:`_onednn_ok`); x
    [..., K] (any strides), weight [N, K] (any strides, e.g. an expert's [K, N] slice ``.t()``)."""
    lead = x.shape[:-1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias,
                                           "none", [], "")
    return y.view(*lead, weight.shape[0])


def weight_copies_enabled() -> bool:
    """Whether CPU inference may keep derived copies of weights (the head's transposed copy, the
    packed shared-expert and FFN weights): the ``weight_copies`` variant
    (``$MYTHOS_CPU_WEIGHT_COPIES`` sets its default, on). Off trades their speed for memory (up
    to one more copy of those weights)."""
    return cpu_enabled("weight_copies")


def clear_weight_copies() -> None:
    """Free every cached derived weight now; each is remade on its next use (if enabled)."""
    _DERIVED.clear()


def _stamp(t: torch.Tensor) -> tuple:
    return (t._version, t.data_ptr(), tuple(t.shape), t.dtype)


_PROBE_INDEX: dict[tuple, torch.Tensor] = {}
# this thread's weights_unchanged() context: .scope (its token) and .memo (scope_memo's values)
_LOCAL = threading.local()


# elements a fingerprint samples: a few per weight keep the once-per-step check cheap
PROBES = 64


def _probe_index(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat positions :func:`_fingerprint` reads: ``PROBES`` evenly spread over the tensor."""
    key = (shape, str(device))
    idx = _PROBE_INDEX.get(key)
    if idx is None:
        n = math.prod(shape)
        idx = torch.linspace(0, n - 1, min(n, PROBES), dtype=torch.float64,
                             device=device).round().long()
        if len(_PROBE_INDEX) > 256:
            _PROBE_INDEX.clear()
        _PROBE_INDEX[key] = idx
    return idx


def _fingerprint(t: torch.Tensor) -> torch.Tensor | None:
    """A fixed sample of t's elements (None for an empty t). Compared with ``torch.equal``: a
    NaN in the sample never matches, so such a copy is remade on every check (still correct)."""
    if t.numel() == 0:
        return None
    return torch.take(t.detach(), _probe_index(tuple(t.shape), t.device))


def _same_fingerprints(a: tuple, b: tuple) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


@contextlib.contextmanager
def weights_unchanged():
    """Promise that no weight changes inside this context (this thread): :func:`derived` then
    checks each cached copy's source fingerprint once per context instead of on every use. The
    model's ``forward`` and ``generate`` enter it; nested entries reuse the outer one."""
    outer = getattr(_LOCAL, "scope", None)
    if outer is None:
        _LOCAL.scope, _LOCAL.memo = object(), {}
    try:
        yield
    finally:
        if outer is None:
            _LOCAL.scope, _LOCAL.memo = None, None


def scope_memo(key, build):
    """``build()``, computed once per :func:`weights_unchanged` context (this thread) for
    ``key`` and dropped when the context ends; outside one, or while tracing, on every call.
    For values derived from weights that every loop of a forward would otherwise recompute
    (they may carry autograd history: the context spans one forward)."""
    memo = getattr(_LOCAL, "memo", None)
    if memo is None or _compiling():
        return build()
    if key not in memo:
        memo[key] = build()
    return memo[key]


def derived(tag: str, sources: tuple[torch.Tensor, ...], build) -> torch.Tensor:
    """``build(*sources)`` (detached), cached per (tag, source tensors) and remade whenever a
    source changes. A change is seen through the source's version counter, storage, shape or
    dtype, or, for in-place edits that bump no version counter (through ``.data``, as in
    ``p.data.mul_(d)`` EMA updates, or a numpy view), through a fingerprint of ``PROBES``
    elements spread over the tensor, compared on every use, or once per
    :func:`weights_unchanged` context. An edit through ``.data`` that spares every sampled
    element (a few rows, say) is not seen: :func:`clear_weight_copies` drops every copy. The
    entry is dropped as soon as any source is freed (so a new tensor that reuses a freed one's
    id never finds it). Sources must not be inference tensors (they have no version counter)."""
    key = (tag,) + tuple(id(t) for t in sources)
    stamp = tuple(_stamp(t) for t in sources)
    scope = getattr(_LOCAL, "scope", None)
    ent = _DERIVED.get(key)
    same_stamp = ent is not None and ent[0] == stamp
    if same_stamp and scope is not None and ent[2] is scope:      # checked in this context
        return ent[3]
    fps = tuple(_fingerprint(t) for t in sources)
    if same_stamp and _same_fingerprints(fps, ent[1]):
        ent[2] = scope
        return ent[3]
    if ent is None:
        for t in sources:
            weakref.finalize(t, _DERIVED.pop, key, None)
    with torch.no_grad():
        ent = [stamp, fps, scope, build(*(t.detach() for t in sources))]
    _DERIVED[key] = ent
    return ent[3]


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous [D, V] copy of ``weight``, cached until it changes."""
    return derived("transposed", (weight,), lambda w: w.t().contiguous())


def _head_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """:func:`lm_head_cpu` serves: a vocabulary over ``VOCAB_BLOCK``, :func:`cpu_inference`."""
    return weight.dim() == 2 and weight.shape[0] > VOCAB_BLOCK and cpu_inference(x, weight)


def lm_head_cpu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`mythos_kernels.linear.lm_head_reference` on the CPU without autograd (module
    docstring): up to ``DECODE_ROWS`` rows over the cached transposed copy; more through oneDNN,
    logits of over ``KEPT_HEAD_MIN_BYTES`` written into a kept output (``_scratch.kept_output``:
    reused once the caller has dropped the previous logits, so its pages do not fault in again);
    without oneDNN, MKL in column blocks."""
    V = weight.shape[0]
    x2, lead = x.reshape(-1, x.shape[-1]), x.shape[:-1]
    if x.numel() <= DECODE_ROWS * x.shape[-1]:
        if x.dtype != weight.dtype or weight.is_inference():   # inference tensors: no version
            return F.linear(x, weight)
        if not weight_copies_enabled():
            return dense(x, weight)
        wt = _transposed(weight)
        return (vecmat(x2, wt) if cpu_enabled("vecmat_head") else x2 @ wt).view(*lead, V)
    rows = x2.shape[0]
    if _onednn_ok(x, weight):
        out = None
        if rows * V * x.element_size() > KEPT_HEAD_MIN_BYTES and cpu_enabled("head_kept"):
            out = kept_output("lm_head", (rows, V), x.dtype, x.device)
        if out is None:
            return onednn_linear(x, weight)
        nb = max(1024, HEAD_BLOCK_BYTES // (rows * x.element_size()))
        for i in range(0, V, nb):
            out[:, i:i + nb] = onednn_linear(x2, weight[i:i + nb])
        return out.view(*lead, V)
    out = torch.empty(rows, V, dtype=torch.result_type(x2, weight), device=x.device)
    for i in range(0, V, VOCAB_BLOCK):
        torch.mm(x2, weight[i:i + VOCAB_BLOCK].t(), out=out[:, i:i + VOCAB_BLOCK])
    return out.view(*lead, V)


def decode_head_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The head's cached transposed copy [D, V] that decode multiplies on the CPU (see the module
    docstring), for a caller to pass into compiled code (which cannot use the cache); None where
    decode would not use it (not CPU or not fp32, a vocabulary of at most ``VOCAB_BLOCK``, weight
    copies off, an inference tensor, autograd on)."""
    if not (weight.dim() == 2 and weight.dtype == torch.float32 and weight.shape[0] > VOCAB_BLOCK
            and cpu_inference(weight) and weight_copies_enabled() and not weight.is_inference()):
        return None
    return _transposed(weight)


def lm_head_transposed(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``lm_head(x, weight)`` given :func:`decode_head_weight`'s copy ``weight_t`` [D, V]:
    ``x @ weight_t`` (module docstring). Traceable by ``torch.compile``."""
    choose("lm_head", x, weight_t, has_kernel=False)
    if x.shape[-1] != weight_t.shape[0]:
        raise ValueError(f"lm_head_transposed: x's last dim {x.shape[-1]} != the transposed "
                         f"weight's rows {weight_t.shape[0]}")
    return x @ weight_t


def two_threads() -> bool:
    """Whether torch runs at least two intra-op threads: the split (one half per core) forms
    need them: with one thread the halves run in turn and only add calls. More threads keep the
    two-way split."""
    return torch.get_num_threads() >= 2


_COMPILED_SPLIT = False   # see compiled_split


@contextlib.contextmanager
def compiled_split(enabled: bool = True):
    """Within this context, code traced by ``torch.compile`` with autograd off takes ``dense``'s
    split product (CPU, few rows) like eager code does; outside it, compiled code gets plain
    ``F.linear``. The caller decides because the thread count cannot be read while tracing
    (``generate(..., compiled=True)`` passes :func:`two_threads`); Dynamo guards on the switch,
    so a change recompiles. Not thread-safe: it sets a module-level switch."""
    global _COMPILED_SPLIT
    before, _COMPILED_SPLIT = _COMPILED_SPLIT, bool(enabled)
    try:
        yield
    finally:
        _COMPILED_SPLIT = before


def _split_rows_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``dense`` takes the split matrix-vector path (see the module docstring)."""
    N = weight.shape[0]
    if not (x.dtype == weight.dtype == torch.float32
            and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and N % 2 == 0 and N >= SPLIT_MIN_OUT and weight.numel() >= SPLIT_MIN_WEIGHT
            and weight.is_contiguous()
            and 0 < x.numel() <= SPLIT_ROWS * x.shape[-1]):
        return False
    if _compiling():   # the thread count is the caller's call (compiled_split)
        return (_COMPILED_SPLIT and x.device.type == weight.device.type == "cpu"
                and not torch.is_grad_enabled())
    return cpu_inference(x, weight) and two_threads()   # after: not traced by compile


def _dense_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``dense``'s ``dense_split`` form (:func:`_split_rows_ok`): the weight's two row halves in
    one bmm, one per core."""
    return _split_product(x, _row_halves(weight), weight.shape[0], bias)


def _row_halves(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous weight [N, K]'s two row halves as [2, K, N/2] column blocks (a view)."""
    N, Kd = weight.shape
    return torch.as_strided(weight, (2, Kd, N // 2), ((N // 2) * Kd, 1, Kd))


def _split_product(x: torch.Tensor, halves: torch.Tensor, N: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``dense``'s split form: x [..., K] times :func:`_row_halves` of the weight, one bmm."""
    Kd = x.shape[-1]
    M = x.numel() // Kd
    if not x.is_contiguous():
        x = x.contiguous()
    # one strided view each (this path is per-call overhead bound at decode sizes): the rows of
    # x for both halves, no copy
    xs = torch.as_strided(x, (2, M, Kd), (0, Kd, 1))
    y = torch.bmm(xs, halves)                                         # [2, M, N/2]
    y = y.view(*x.shape[:-1], N) if M == 1 else y.transpose(0, 1).reshape(*x.shape[:-1], N)
    if bias is not None:
        y = y + bias
    return y


def dense_plan(weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 1,
               lead: int = 2) -> Callable[[torch.Tensor], torch.Tensor]:
    """``lambda x: dense(x, weight, bias)`` (:func:`mythos_kernels.linear.dense`) for inputs of
    ``rows`` rows (x of ``lead`` + 1 dims), with ``dense``'s form chosen once, now, instead of
    on every call: the same product, the same values, for a caller that repeats one call many
    times in one setting (the CPU decode plan, ``mythos.decode``). Valid while the setting holds
    (autograd, threads, dtypes, the variants,
    ``$MYTHOS_CPU_ONEDNN``)."""
    shape = (rows,) + (1,) * (lead - 1) + (weight.shape[1],)
    probe = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    if cpu_enabled("dense_split") and _split_rows_ok(probe, weight):
        halves, N = _row_halves(weight), weight.shape[0]
        return lambda x: _split_product(x, halves, N, bias)
    if _onednn_ok(probe, weight):
        return lambda x: onednn_linear(x, weight, bias)
    return lambda x: F.linear(x, weight, bias)


def vecmat(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` for x [M, K] and a weight stored as [K, N] (the routed experts' layout). With at
    most ``SPLIT_ROWS`` rows on the CPU without autograd, the two halves of K run as one bmm (a
    contiguous half of w per core) and the two partial products are added. The split sum
    rounds differently from ``x @ w`` in the last bits."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        return x @ w                                       # torch's own shape error
    M, Kd = x.shape
    if (Kd % 2 or not 0 < M <= SPLIT_ROWS or w.numel() < SPLIT_MIN_WEIGHT
            or not w.is_contiguous()
            or not x.dtype == w.dtype == torch.float32 or not cpu_inference(x, w)
            or not two_threads()):
        return x @ w
    halves = x.reshape(M, 2, Kd // 2).transpose(0, 1)                     # [2, M, K/2]
    return torch.bmm(halves, w.view(2, Kd // 2, w.shape[1])).sum(0)


def packable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a CPU inference path may use cached packed copies of ``weights``: CPU, fp32, at
    most ``SPLIT_ROWS`` rows (decode; longer inputs gain nothing from packing and keep no copies),
    the ``packed_swiglu`` variant on, at least ``SPLIT_MIN_WEIGHT`` elements in all, no autograd, not tracing,
    no inference tensors (no version counter)."""
    # cpu_inference first: it is False under torch.compile, where is_inference() would break
    # the graph
    return (x.dtype == torch.float32 and cpu_inference(x, *weights)
            and cpu_enabled("packed_swiglu") and weight_copies_enabled()
            and 0 < x.numel() <= SPLIT_ROWS * x.shape[-1]
            and sum(w.numel() for w in weights) >= SPLIT_MIN_WEIGHT
            and all(w.dtype == torch.float32 and not w.is_inference() for w in weights))


def shared_swiglu_packed(x: torch.Tensor, gates: list[torch.Tensor], ups: list[torch.Tensor],
                         downs: list[torch.Tensor]) -> torch.Tensor:
    """``sum_s down_s(silu(gate_s(x)) * up_s(x))`` (the MoE's always-on shared experts, CPU
    inference; see :func:`packable`) as two products over packed copies of the weights,
    ``[gate_0; up_0; gate_1; up_1; ...]`` [2SH, D] and ``[down_0 | down_1 | ...]`` [D, SH],
    cached and remade when any weight changes (one more copy of the shared-expert weights).
    Two products instead of 3S. The experts' sum is taken inside the down product, so it
    rounds differently from adding each expert's output in turn.

    x: [..., D]; gates/ups: S weights [H, D]; downs: S weights [D, H] -> [..., D].
    """
    S = len(gates)
    if not (S == len(ups) == len(downs) > 0):
        raise ValueError(f"shared_swiglu_packed: {len(gates)} gates, {len(ups)} ups, "
                         f"{len(downs)} downs")
    H, D = gates[0].shape
    if any(w.shape != (H, D) for w in gates + ups) or any(w.shape != (D, H) for w in downs):
        raise ValueError("shared_swiglu_packed: every gate/up must be [H, D] and every down [D, H]")
    if x.shape[-1] != D:
        raise ValueError(f"shared_swiglu_packed: x's last dim {x.shape[-1]} != the weights' D {D}")
    w_gu, w_d = _packed_swiglu_weights(gates, ups, downs)
    return _swiglu_packed_run(x, lambda t: dense(t, w_gu), lambda t: dense(t, w_d), S, H)


def _packed_swiglu_weights(gates, ups, downs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`shared_swiglu_packed`'s cached packed copies: ``[gate_0; up_0; ...]``, ``[down_0 |
    down_1 | ...]``."""
    S = len(gates)
    w_gu = derived("shared_gu", tuple(gates) + tuple(ups),
                   lambda *w: torch.cat([t for i in range(S) for t in (w[i], w[S + i])]))
    w_d = derived("shared_down", tuple(downs), lambda *w: torch.cat(w, dim=1))
    return w_gu, w_d


def _swiglu_packed_run(x: torch.Tensor, gate_up, down, S: int, H: int) -> torch.Tensor:
    """The packed SwiGLU sum given its two products (callables on [rows, K])."""
    lead, D = x.shape[:-1], x.shape[-1]
    gu = gate_up(x.reshape(-1, D)).view(-1, S, 2, H)
    a = (F.silu(gu[:, :, 0]) * gu[:, :, 1]).reshape(-1, S * H)
    return down(a).view(*lead, D)


def swiglu_plan(gates: list[torch.Tensor], ups: list[torch.Tensor], downs: list[torch.Tensor],
                rows: int = 1) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``lambda x: shared_swiglu_packed(x, gates, ups, downs)`` for inputs of ``rows`` rows with
    its products planned once (:func:`dense_plan`), or None where :func:`packable` refuses them
    (the caller then runs the experts one by one, as the model does)."""
    probe = torch.empty(rows, gates[0].shape[1], dtype=gates[0].dtype, device=gates[0].device)
    if not packable(probe, *gates, *ups, *downs):
        return None
    w_gu, w_d = _packed_swiglu_weights(gates, ups, downs)
    gate_up, down = dense_plan(w_gu, rows=rows, lead=1), dense_plan(w_d, rows=rows, lead=1)
    S, H = len(gates), gates[0].shape[0]
    return lambda x: _swiglu_packed_run(x, gate_up, down, S, H)


register_cpu("dense", "dense_split", _dense_split, serves=_split_rows_ok,
             doc="few rows: the weight's two row halves in one bmm, one per core")
def _dense_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``dense``'s ``onednn`` form (:func:`_onednn_ok`)."""
    return onednn_linear(x, weight, bias)


register_cpu("dense", "onednn", _dense_onednn, serves=_onednn_ok, env="MYTHOS_CPU_ONEDNN",
             doc="more rows: oneDNN's linear (also the head's and the MoE segments' products)")
register_cpu("lm_head", "lm_head_cpu", lm_head_cpu, serves=_head_serves,
             doc="large vocabularies: a transposed copy for decode rows, oneDNN or column blocks above")
register_cpu("lm_head", "vecmat_head", doc="the decode head's split-K product (off: x @ W_t)")
register_cpu("lm_head", "head_kept", doc="the head's logits over KEPT_HEAD_MIN_BYTES in a kept output")
register_cpu("dense", "weight_copies", env="MYTHOS_CPU_WEIGHT_COPIES",
             doc="derived weight copies (the head's transposed copy, packed shared experts)")
register_cpu("dense", "packed_swiglu", doc="the shared experts as two products over packed weights")
