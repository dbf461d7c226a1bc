"""Self-speculative decoding: draft with fewer loops, verify at full depth in one forward.

A round starts from a cache holding positions [0, N - 1) at full depth and the last committed
token ``x_0`` at position N - 1. The draft feeds ``x_0, x_1, ...`` one at a time with
``draft_loops`` loops (writing the prelude, the first ``draft_loops`` depths and the coda) and
draws ``x_1 .. x_k`` from its distributions ``p_i``. Every layer is then put back to length N - 1
(buffers are written by position, so this is only a length) and ``[x_0 .. x_k]`` runs in one
forward at full depth, giving the target distributions ``q_0 .. q_k``. Draft token ``x_i`` is
accepted with probability ``min(1, q_{i-1}(x_i) / p_{i-1}(x_i))`` (greedy: iff it is the argmax of
``q_{i-1}``); at the first rejection a token is drawn from ``norm(max(0, q - p))``, and if all
``k`` are accepted one more from ``q_k``. Each committed token then follows the target
distribution exactly (Leviathan et al., 2023; Chen et al., 2023), and greedy decoding gives the
plain greedy tokens. In a batch every row commits the smallest accepted count plus one token:
a row that accepted more keeps its accepted draft token there, which is that row's own output
at that position, so the rule stays exact per row.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .cache import LayerCache
from .sampling import check_finite_rows, probabilities


def _truncate(cache: dict, length: int) -> None:
    """Every layer longer than ``length`` cut back to it (a length change, no copy)."""
    for c in cache.values():
        if isinstance(c, LayerCache) and c.length > length:
            c.length = length


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` [B, V]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def rounds(model, out: torch.Tensor, n: int, end: int, cache: dict, n_loops: Optional[int],
           draft_loops: int, draft_tokens: int, temperature: float, top_k, top_p, min_p,
           generator: Optional[torch.Generator] = None, stats: Optional[dict] = None
           ) -> Iterator[tuple[int, int]]:
    """Fill ``out`` [B, end] from column ``n`` (``out[:, :n]`` committed, the cache holding
    positions [0, n - 1)) to ``end``, one round at a time; yields each round's committed column
    range ``(start, stop)``. ``stats`` (a dict) collects ``drafted`` and ``accepted`` counts."""
    B = out.shape[0]
    greedy = temperature == 0
    rows = torch.arange(B, device=out.device)
    while n < end:
        k = min(draft_tokens, end - n - 1)
        base = n - 1
        drafts, p_draft = [], []
        cur = out[:, n - 1:n]
        for i in range(k):   # draft
            logits = model.logits(model.hidden_states(cur, draft_loops, cache, base + i)[:, -1])
            check_finite_rows(logits.amax(-1))
            p = probabilities(logits, temperature, top_k, top_p, min_p)
            tok = p.argmax(-1) if greedy else _draw(p, generator)
            drafts.append(tok)
            p_draft.append(p)
            cur = tok[:, None]
        _truncate(cache, base)
        seq = torch.cat([out[:, n - 1:n]] + [d[:, None] for d in drafts], 1)      # [B, k + 1]
        logits = model.logits(model.hidden_states(seq, n_loops, cache, base))          # [B, k+1, V]
        check_finite_rows(logits.amax(-1).flatten())
        q = probabilities(logits, temperature, top_k, top_p, min_p)
        accepted = torch.full((B,), k, dtype=torch.long, device=out.device)
        fix = torch.empty(B, dtype=torch.long, device=out.device)
        for i in range(k):
            x = drafts[i]
            if greedy:
                ok = q[:, i].argmax(-1) == x
            else:
                qx, px = q[rows, i, x], p_draft[i][rows, x]
                u = torch.rand(B, generator=generator, device=out.device)
                ok = u * px <= qx            # u < q / p, without dividing by a zero p
            first = (accepted == k) & ~ok
            accepted = torch.where(first, i, accepted)
        m = int(accepted.min())
        # the token at column n + m: an accepted draft where the row accepted more, else a
        # draw from the residual (or from q_k when every draft was accepted)
        if m < k:
            qm, pm = q[:, m], p_draft[m]
            if greedy:
                fix = qm.argmax(-1)
            else:
                res = (qm - pm).clamp(min=0)
                s = res.sum(-1, keepdim=True)
                res = torch.where(s > 0, res / s.clamp(min=1e-30), qm)
                fix = _draw(res, generator)
            fix = torch.where(accepted > m, drafts[m], fix)
        else:
            fix = q[:, k].argmax(-1) if greedy else _draw(q[:, k], generator)
        for i in range(m):
            out[:, n + i] = drafts[i]
        out[:, n + m] = fix
        _truncate(cache, base + m + 1)
        if stats is not None:
            stats["drafted"] = stats.get("drafted", 0) + k
            stats["accepted"] = stats.get("accepted", 0) + m
            stats["rounds"] = stats.get("rounds", 0) + 1
        yield n, n + m + 1
        n += m + 1


__all__ = ["rounds"]
