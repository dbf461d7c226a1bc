"""``torch.multinomial(probs, 1)`` on the CPU, the same draw in a third of the time.

For one sample, torch's CPU ``multinomial`` (``aten/src/ATen/native/Distributions.cpp``, the
"gumbel" fast path) returns ``argmax(probs / q)`` with ``q = empty_like(probs).exponential_(1)``.
Its CPU ``exponential_`` draws, element by element in memory order, one 64-bit number ``x`` from
the generator, takes ``u = (x & (2^53 - 1)) * 2^-53`` and returns ``float(-log1p(-u))``, on one core.
``uniform_`` on a float64 tensor draws the same ``u`` from the same numbers, and then ``log1p``
runs vectorized over the row. :func:`multinomial_one` does that, so it
returns the same tokens and leaves the generator in the same state as ``torch.multinomial``.
Sampling in ``generate`` therefore follows open-mythos's random stream, seed for seed.

The equality rests on two things:

* the algorithm of this torch build, which a later torch could change;
* the vectorized ``log1p`` rounding to the same float32 as the scalar one. It is only computed
  in float64 before the cast; 10^6 draws agreed bitwise.

So :func:`exact` checks both once per process, against ``torch.multinomial`` itself, on
private generators. Where the check fails, or where ``$MYTHOS_CPU_FAST_MULTINOMIAL`` is 0,
``torch.multinomial`` runs. Only CPU float32 ``[B, V]`` contiguous probabilities take the fast
form; anything else goes to ``torch.multinomial``. The input checks come first and raise
torch's own errors: NaN, inf or a negative probability, or a row summing to 0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mythos_kernels._env import env_flag

from ._validate import check_float, check_int

_EXACT: list[bool] = []     # [agrees with torch.multinomial], probed on first use


def enabled() -> bool:
    """``$MYTHOS_CPU_FAST_MULTINOMIAL`` (a switch, default on: ``mythos_kernels._env``)."""
    return env_flag("MYTHOS_CPU_FAST_MULTINOMIAL", True)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """open-mythos's top-k rule: logits below the k-th largest of their row set to -inf (ties
    at the k-th kept); ``top_k`` <= 0 (or None) keeps every logit."""
    top_k = check_int("top_k", top_k, none_ok=True)
    if top_k is None or top_k <= 0:
        return logits
    v, _ = logits.topk(min(top_k, logits.shape[-1]))
    return logits.masked_fill(logits < v[:, -1:], float("-inf"))


def check_top_p(top_p) -> Optional[float]:
    """``top_p`` as a float in (0, 1], or None (no nucleus filter)."""
    return None if top_p is None else check_float("top_p", top_p, lo=0, hi=1, lo_open=True)


def check_min_p(min_p) -> Optional[float]:
    """``min_p`` as a float in [0, 1], or None (no min-p filter)."""
    return None if min_p is None else check_float("min_p", min_p, lo=0, hi=1)


def top_p_filter(logits: torch.Tensor, top_p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose probability sums
    to at least ``top_p`` (ties at the boundary by sort order; the top token always kept); the
    rest set to -inf. ``top_p`` None or 1 keeps every logit."""
    top_p = check_top_p(top_p)
    if top_p is None or top_p >= 1.0:
        return logits
    srt, idx = logits.sort(-1, descending=True)
    probs = torch.softmax(srt.float(), -1)
    before = probs.cumsum(-1) - probs              # mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: Optional[float]) -> torch.Tensor:
    """Min-p filter: tokens whose probability is below ``min_p`` times the top token's set to
    -inf (``p < min_p * p_max`` <=> ``logit < max + log(min_p)``). None or 0 keeps every logit."""
    min_p = check_min_p(min_p)
    if not min_p:
        return logits
    cut = logits.amax(-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < cut, float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  min_p: Optional[float] = None) -> torch.Tensor:
    """top-k, then top-p, then min-p (each off at its default), on temperature-scaled logits."""
    return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)


def probabilities(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """The distribution a sampling step draws from: softmax of the filtered ``logits /
    temperature`` [..., V] (fp32); ``temperature=0`` gives the one-hot argmax."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return torch.softmax(filter_logits(flat / temperature, top_k, top_p, min_p), -1
                         ).reshape(logits.shape)


def sample_filtered(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, min_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> next token [B]: ``mythos.model.sample``'s rule with the top-p and min-p
    filters too (with both off the same draws); non-finite rows refused first."""
    if temperature == 0:
        top, tok = logits.max(-1)
        check_finite_rows(top)
        return tok
    check_finite_rows(logits.amax(-1))
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p, min_p), -1)
    return multinomial_one(probs, generator).squeeze(-1)


class NonFiniteLogitsError(RuntimeError):
    """Logits with no finite maximum in a row, which decoding never turns into a token."""


def check_finite_rows(top: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLogitsError` unless every row maximum ``top`` [B] (of logits
    [B, V]) is finite. A row maximum is NaN if the row holds a NaN, +inf if it holds a +inf and
    -inf if every logit is -inf: the rows greedy decoding would turn into an arbitrary token
    (argmax takes a NaN as the largest) and ``torch.multinomial`` refuses after the softmax.
    One host read of a [B] flag."""
    if not bool(torch.isfinite(top).all()):
        rows = (~torch.isfinite(top)).nonzero().flatten().tolist()
        raise NonFiniteLogitsError(f"logits are not finite in row(s) {rows} (a NaN, a +inf, or "
                                   "every logit -inf): no token can be chosen; check the weights "
                                   "and inputs")


def _exponential(shape: tuple[int, ...], generator: Optional[torch.Generator]) -> torch.Tensor:
    """``torch.empty(shape).exponential_(generator=generator)`` (float32, rate 1): the same values
    and generator state, from ``uniform_`` and a vectorized ``log1p`` (module docstring)."""
    # on the CPU whatever the default device (torch.set_default_device("cuda") elsewhere)
    u = torch.empty(shape, dtype=torch.float64, device="cpu").uniform_(generator=generator)
    return u.neg_().log1p_().neg_().to(torch.float32)          # -log1p(-u)


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``argmax(probs / q)``, ``q`` the exponential draw of ``exponential_``, as [B, 1] int64."""
    q = _exponential(probs.shape, generator)
    return torch.div(probs, q, out=q).argmax(-1, keepdim=True)


def exact() -> bool:
    """Whether this torch build's ``torch.multinomial(p, 1)`` on the CPU is :func:`_draw`: checked
    once per process, on private generators: 65,536 exponential draws bitwise, then tokens over a
    few shapes (vocabularies up to 50,257, top-k filtered and not), each with the generator's
    state after the draw."""
    if not _EXACT:
        ok = True
        try:
            ga, gb = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
            ok = torch.equal(torch.empty(1 << 16, device="cpu").exponential_(generator=ga),
                             _exponential((1 << 16,), gb))
            for seed, (B, V, k) in enumerate(((1, 32000, 50), (3, 4099, 0), (2, 50257, 7),
                                              (4, 5, 1))):
                g = torch.Generator().manual_seed(1000 + seed)
                logits = torch.randn(B, V, generator=g, device="cpu") * 3
                p = torch.softmax(top_k_filter(logits, k), -1)
                ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
                for _ in range(3):
                    ok = ok and torch.equal(torch.multinomial(p, 1, generator=ga), _draw(p, gb))
                ok = ok and torch.equal(ga.get_state(), gb.get_state())
        except Exception:  # noqa: BLE001 - any failure means "not usable": torch's op serves
            ok = False
        _EXACT.append(bool(ok))
    return _EXACT[0]


def _fast_ok(probs: torch.Tensor) -> bool:
    return (probs.device.type == "cpu" and probs.dtype == torch.float32 and probs.dim() == 2
            and probs.numel() > 0 and probs.is_contiguous() and not probs.requires_grad
            and enabled() and exact())


def multinomial_one(probs: torch.Tensor, generator: Optional[torch.Generator] = None
                    ) -> torch.Tensor:
    """``torch.multinomial(probs, 1, generator=generator)``: probs [B, V] -> [B, 1] int64; the same
    tokens and generator state (module docstring), faster for CPU float32 probabilities."""
    if not _fast_ok(probs):
        return torch.multinomial(probs, 1, generator=generator)
    # torch's checks and messages, before any draw
    if not bool((probs.max() < float("inf")) & (probs.min() >= 0)):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    if bool((probs.sum(1) == 0).any()):
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
    return _draw(probs, generator)


__all__ = ["NonFiniteLogitsError", "check_finite_rows", "check_min_p", "check_top_p", "enabled",
           "exact", "filter_logits", "min_p_filter", "multinomial_one", "probabilities",
           "sample_filtered", "top_k_filter", "top_p_filter"]
