"""Decoding beyond ``OpenMythos.generate``'s default loop: top-p / min-p sampling, streaming,
per-token early exit (:mod:`mythos.early_exit`) and self-speculative decoding
(:mod:`mythos.speculative`).

:func:`stream` yields each step's tokens as they are decoded; :func:`generate` returns them all
(``OpenMythos.generate`` hands its call here when one of these options is set). Both validate
every argument before any compute, with ``generate``'s rules. Decoding runs through the module
path (``OpenMythos.hidden_states`` over a preallocated :class:`~mythos.cache.MythosCache`); with its
defaults (no filter beyond top-k, no exit, no draft) :func:`stream` yields ``generate``'s eager
tokens.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from . import early_exit, speculative
from ._validate import check_bool, check_float, check_int, check_loops
from .cache import MythosCache
from .generate import capture_step, step_modes
from .sampling import check_min_p, check_top_p, sample_filtered


def check_args(model, input_ids, max_new_tokens, n_loops, temperature, top_k, top_p, min_p,
               draft_loops, draft_tokens, exit_criterion, exit_threshold, exit_fill) -> dict:
    """Every argument checked (ValueError / TypeError naming it) and normalized."""
    a = dict(max_new_tokens=check_int("max_new_tokens", max_new_tokens, lo=0),
             temperature=check_float("temperature", temperature, lo=0, inf_ok=True),
             top_k=check_int("top_k", top_k, none_ok=True) or 0,
             top_p=check_top_p(top_p), min_p=check_min_p(min_p),
             n_loops=check_loops("n_loops", n_loops),
             draft_loops=check_int("draft_loops", draft_loops, lo=1, none_ok=True),
             draft_tokens=check_int("draft_tokens", draft_tokens, lo=1))
    crit, thr, fill = early_exit.check_exit_args(exit_criterion, exit_threshold, exit_fill,
                                                 model.cfg)
    a.update(exit_criterion=crit, exit_threshold=thr, exit_fill=fill)
    depth = a["n_loops"] or model.cfg.max_loop_iters
    if a["draft_loops"] is not None:
        if a["draft_loops"] > depth:
            raise ValueError(f"draft_loops must be an int in [1, n_loops={depth}], got "
                             f"{a['draft_loops']}")
        if crit is not None:
            raise ValueError("draft_loops and exit_criterion: choose one (speculative decoding "
                             "verifies at full depth)")
    model.check_inputs(input_ids, a["n_loops"], None, 0)
    total = input_ids.shape[1] + a["max_new_tokens"] - 1
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({a['max_new_tokens']})"
                         f" - 1 = {total} exceeds max_seq_len {model.cfg.max_seq_len}")
    return a


def _chunks(model, input_ids: torch.Tensor, a: dict, stats: Optional[dict]
            ) -> Iterator[torch.Tensor]:
    """Yield [B, m] blocks of new tokens (m = 1 except for speculative rounds)."""
    B, P = input_ids.shape
    N = a["max_new_tokens"]
    if N == 0:
        return
    samp = (a["temperature"], a["top_k"], a["top_p"], a["min_p"])
    cache = MythosCache(P + N - 1 + (a["draft_tokens"] if a["draft_loops"] else 0))
    with torch.no_grad():
        out = input_ids.new_empty(B, P + N, dtype=torch.long)
        out[:, :P] = input_ids
        h = model.hidden_states(input_ids, a["n_loops"], cache, 0)[:, -1]                # prefill
        out[:, P] = sample_filtered(model.logits(h), *samp)
    yield out[:, P:P + 1]
    if a["draft_loops"] is not None:
        it = speculative.rounds(model, out, P + 1, P + N, cache, a["n_loops"], a["draft_loops"],
                                a["draft_tokens"], *samp, stats=stats)
        while True:
            with torch.no_grad():
                r = next(it, None)
            if r is None:
                return
            yield out[:, r[0]:r[1]]
    if a.get("static"):
        yield from _static_exit_steps(model, out, P, N, cache, a, samp, stats)
        return
    for i in range(1, N):
        pos = P + i - 1
        with torch.no_grad():
            cur = out[:, pos:pos + 1]
            if a["exit_criterion"] is None:
                h = model.hidden_states(cur, a["n_loops"], cache, pos)[:, -1]
            else:
                h, depth = early_exit.hidden_step(model, cur, cache, pos, a["n_loops"],
                                                  a["exit_criterion"], a["exit_threshold"],
                                                  a["exit_fill"])
                if stats is not None:
                    stats["loops"] = stats.get("loops", 0) + int(depth.sum())
                    stats["tokens"] = stats.get("tokens", 0) + B
            out[:, pos + 1] = sample_filtered(model.logits(h), *samp)
        yield out[:, pos + 1:pos + 2]


def _static_exit_steps(model, out: torch.Tensor, P: int, N: int, cache: MythosCache, a: dict,
                       samp: tuple, stats: Optional[dict]) -> Iterator[torch.Tensor]:
    """The early-exit decode steps through the static step (token and position as tensors,
    cache written by index), captured in a CUDA graph when ``a["graph"]``: no host read inside
    the step; the loop counts are summed on the device and read once at the end."""
    B = out.shape[0]
    tok = out.new_empty(B, 1).copy_(out[:, P:P + 1])
    pos = torch.full((1,), P, dtype=torch.long, device=out.device)
    loops = torch.zeros((), dtype=torch.long, device=out.device)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        h, depth = early_exit.hidden_step(model, tok, cache, P, a["n_loops"], a["exit_criterion"],
                                          a["exit_threshold"], a["exit_fill"], positions=pos)
        return model.logits(h), depth

    run = step
    if a["graph"]:
        with torch.no_grad():
            run = capture_step(step, a["graph_requested"]) or step
    for i in range(1, N):
        with torch.no_grad():
            tok.copy_(out[:, P + i - 1:P + i])
            pos.fill_(P + i - 1)
            logits, depth = run()
            loops += depth.sum()
            out[:, P + i] = sample_filtered(logits, *samp)
        yield out[:, P + i:P + i + 1]
    for c in cache.values():
        c.length = P + N - 1
    if stats is not None:
        stats["loops"] = stats.get("loops", 0) + int(loops)
        stats["tokens"] = stats.get("tokens", 0) + B * (N - 1)


def stream(model, input_ids: torch.Tensor, max_new_tokens: int = 64, n_loops: Optional[int] = 8,
           temperature: float = 1.0, top_k: Optional[int] = 50, top_p: Optional[float] = None,
           min_p: Optional[float] = None, draft_loops: Optional[int] = None,
           draft_tokens: int = 4, exit_criterion: Optional[str] = None,
           exit_threshold: Optional[float] = None, exit_fill: str = "recompute",
           stats: Optional[dict] = None) -> Iterator[torch.Tensor]:
    """Decode like ``model.generate`` and yield each new token as a [B] tensor as soon as it is
    chosen (speculative rounds yield their accepted tokens one by one). Arguments are checked
    when this is called, before the first token is computed.

    Args:
        top_p: nucleus filter in (0, 1] (None or 1: off); min_p: in [0, 1] (None or 0: off);
            applied after top_k, on ``logits / temperature``.
        draft_loops: self-speculative decoding: draft ``draft_tokens`` tokens per round with
            this many loops, verify at ``n_loops`` (:mod:`mythos.speculative`).
        exit_criterion, exit_threshold, exit_fill: per-token early exit
            (:mod:`mythos.early_exit`): None (off), ``"act"``, ``"kl"`` or ``"latent"``.
        stats: a dict that collects counts (speculative: drafted / accepted / rounds; early
            exit: loops run / tokens).
    """
    a = check_args(model, input_ids, max_new_tokens, n_loops, temperature, top_k, top_p, min_p,
                   draft_loops, draft_tokens, exit_criterion, exit_threshold, exit_fill)
    return _tokens(model, input_ids, a, stats)


def _tokens(model, input_ids, a, stats) -> Iterator[torch.Tensor]:
    for block in _chunks(model, input_ids, a, stats):
        for j in range(block.shape[1]):
            yield block[:, j].clone()


def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 64,
             n_loops: Optional[int] = 8, temperature: float = 1.0, top_k: Optional[int] = 50,
             top_p: Optional[float] = None, min_p: Optional[float] = None,
             draft_loops: Optional[int] = None, draft_tokens: int = 4,
             exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None,
             exit_fill: str = "recompute", stats: Optional[dict] = None,
             cuda_graph: Optional[bool] = None, static: Optional[bool] = None,
             compiled: bool = False) -> torch.Tensor:
    """:func:`stream`'s tokens appended to the prompt: [B, T] -> [B, T + max_new_tokens].

    With ``exit_criterion`` (and no ``draft_loops``), ``static=True`` decodes with the static
    early-exit step (:func:`mythos.early_exit.hidden_step` with a position tensor: no host read)
    and ``cuda_graph=True`` captures that step in a CUDA graph (default: on for CUDA inputs
    unless the reference backend is forced, as ``OpenMythos.generate``); the tokens are the eager
    step's. Otherwise these modes are refused: the other options decode eagerly.
    ``compiled=True`` is always refused."""
    for name, v in (("cuda_graph", cuda_graph), ("static", static), ("compiled", compiled)):
        check_bool(name, v, none_ok=True)
    exit_only = exit_criterion is not None and draft_loops is None
    for name, v in (("cuda_graph", cuda_graph), ("static", static), ("compiled", compiled)):
        if v and (name == "compiled" or not exit_only):
            raise ValueError(f"{name}=True is not available with top_p, min_p or draft_loops "
                             "alone (these decode eagerly); compiled=True with none of them")
    a = check_args(model, input_ids, max_new_tokens, n_loops, temperature, top_k, top_p, min_p,
                   draft_loops, draft_tokens, exit_criterion, exit_threshold, exit_fill)
    if exit_only:
        a["graph"], a["static"] = step_modes(input_ids, cuda_graph, static)
        a["graph_requested"] = cuda_graph
    new = list(_chunks(model, input_ids, a, stats))
    with torch.inference_mode(False):   # a normal tensor, also when called in inference mode
        return torch.cat([input_ids.long()] + new, 1)


__all__ = ["check_args", "generate", "stream"]
