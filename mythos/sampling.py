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

from typing import Optional

import torch

from mythos_kernels._env import env_flag

from ._validate import check_int

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


__all__ = ["NonFiniteLogitsError", "check_finite_rows", "enabled", "exact", "multinomial_one",
           "top_k_filter"]
