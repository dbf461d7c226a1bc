"""Generation: prefill into a preallocated cache, then one token per step.

The step is one of: the eager append step (on the CPU through a decode plan, ``mythos.decode``),
the static step (cache written by a position tensor, attention over the whole buffer masked by
position), that step captured in a CUDA graph, or compiled by ``torch.compile``.
:func:`sample` turns each step's logits into tokens.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import mythos_kernels as K

from ._validate import check_bool, check_float, check_int, check_loops
from .cache import MythosCache
from .decode import decode_plan
from .sampling import check_finite_rows, multinomial_one, top_k_filter


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 64, n_loops: int = 8,
             temperature: float = 1.0, top_k: int = 50, cuda_graph: Optional[bool] = None,
             static: Optional[bool] = None, compiled: bool = False) -> torch.Tensor:
    """``OpenMythos.generate``'s body (see there): checks, prefill, then the decode loop. Run it
    under ``torch.no_grad()`` (the method does, with its inference scope)."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, lo=0)
    # +inf: uniform sampling, as open-mythos's logits / inf
    temperature = check_float("temperature", temperature, lo=0, inf_ok=True)
    top_k = check_int("top_k", top_k, none_ok=True)       # <= 0 or None: no top-k filter
    top_k = 0 if top_k is None else top_k
    n_loops = check_loops("n_loops", n_loops)
    cuda_graph = check_bool("cuda_graph", cuda_graph, none_ok=True)
    static = check_bool("static", static, none_ok=True)
    compiled = check_bool("compiled", compiled)
    model.check_inputs(input_ids, n_loops, None, 0)
    if max_new_tokens == 0:
        return input_ids
    B, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens - 1
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) - 1 = "
                         f"{total} exceeds max_seq_len {model.cfg.max_seq_len}")
    graph_requested = cuda_graph
    cuda_graph, static = step_modes(input_ids, cuda_graph, static, compiled)
    # compiled: a bucketed capacity, so calls with other lengths reuse the compiled step
    cache = MythosCache(compiled_cache_capacity(total, model.cfg.max_seq_len) if compiled
                        else total)
    # int64 whatever the prompt's integer dtype (open-mythos's torch.cat with the sampled
    # int64 tokens promotes); a normal tensor even under _in_inference_scope
    with torch.inference_mode(False):
        out = input_ids.new_empty(B, prompt_len + max_new_tokens, dtype=torch.long)
    out[:, :prompt_len] = input_ids
    h = model.hidden_states(input_ids, n_loops, cache, 0)[:, -1]                   # prefill
    out[:, prompt_len] = sample(model.logits(h), temperature, top_k)
    if max_new_tokens == 1:
        return out
    if not static:
        # on the CPU, the steps' per-call decisions taken once (mythos.decode): same values
        plan = decode_plan(model, B, n_loops, input_ids)
        for i in range(1, max_new_tokens):
            cur = out[:, prompt_len + i - 1:prompt_len + i]
            if plan is not None:
                h = plan.hidden(cur, cache, prompt_len + i - 1)
            else:
                h = model.hidden_states(cur, n_loops, cache, prompt_len + i - 1)[:, -1]
            out[:, prompt_len + i] = sample(model.logits(h), temperature, top_k)
        return out
    # static inputs (fresh [B, 1]: a clone of the slice would keep its row stride, which
    # depends on the lengths, and Dynamo guards on strides)
    tok = out.new_empty(B, 1).copy_(out[:, prompt_len:prompt_len + 1])
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=out.device)

    def step() -> torch.Tensor:
        return model.logits(model.hidden_states(tok, n_loops, cache, 0, pos)[:, -1])

    run = step
    if compiled:
        layers = dict(cache)  # a plain dict of the filled layer caches: traceable lookups
        compiled_step = _compiled_decode_step(fx_graph_cache=not _GRAPH_CACHE_FAILED)
        # the CPU decode forms compiled code can take: the head's transposed copy as an
        # input (None elsewhere) and the split few-row products (mythos_kernels.linear)
        head_t = K.decode_head_weight(model.head.weight) if input_ids.is_cpu else None
        split = input_ids.is_cpu and K.two_threads()

        from torch._dynamo.exc import BackendCompilerFailed

        def run() -> torch.Tensor:
            nonlocal compiled_step
            with K.compiled_split(split):
                try:
                    return compiled_step(model, tok, n_loops, layers, pos, head_t)
                except BackendCompilerFailed as exc:
                    uncached = _compiled_decode_step(fx_graph_cache=False)
                    if compiled_step is uncached:
                        raise
                    warnings.warn("generate(compiled=True): inductor failed to build the "
                                  f"decode step ({type(exc).__name__}); compiling it again "
                                  "without its on-disk graph cache", RuntimeWarning,
                                  stacklevel=3)
                    _GRAPH_CACHE_FAILED.append(True)   # later calls skip the cache too
                    compiled_step = uncached
                    return compiled_step(model, tok, n_loops, layers, pos, head_t)
    if cuda_graph:
        graphed = capture_step(step, graph_requested)
        if graphed is not None:
            run = graphed

    for i in range(1, max_new_tokens):
        tok.copy_(out[:, prompt_len + i - 1:prompt_len + i])
        pos.fill_(prompt_len + i - 1)
        out[:, prompt_len + i] = sample(run(), temperature, top_k)
    for c in cache.values():
        c.length = total
    return out



def step_modes(input_ids: torch.Tensor, cuda_graph: Optional[bool], static: Optional[bool],
               compiled: bool = False) -> tuple[bool, bool]:
    """``(cuda_graph, static)`` for a decode loop from the caller's choices (None: the default).
    A CUDA graph by default for CUDA inputs, unless ``static=False``, ``compiled``, the reference
    backend forced or Triton missing; the static step wherever a graph or a compiled step runs.
    ValueError for a combination that cannot run."""
    if compiled and cuda_graph:
        raise ValueError("compiled=True and cuda_graph=True: choose one (a CUDA graph "
                         "already replays the decode step without launch overhead)")
    if cuda_graph is None:
        cuda_graph = (not compiled and input_ids.is_cuda and static is not False
                      and K.get_backend() != "reference" and K.triton_available())
    if cuda_graph and not input_ids.is_cuda:
        raise ValueError("cuda_graph=True needs CUDA input_ids")
    static = (cuda_graph or compiled) if static is None else static
    if cuda_graph and not static:
        raise ValueError("cuda_graph=True needs the static decode step (static=True)")
    if compiled and not static:
        raise ValueError("compiled=True needs the static decode step (static=True)")
    return bool(cuda_graph), bool(static)


def capture_step(step: Callable[[], Any], requested: Optional[bool]) -> Optional[Callable[[], Any]]:
    """``step`` (idempotent: the same token at the same position) run twice on a side stream,
    then captured in a CUDA graph: returns a function that replays it and returns the captured
    outputs. Where the step used the reference MoE dispatch, which reads expert counts on the
    host (not capturable), nothing is captured: ValueError if the graph was ``requested``,
    else a warning and None (the caller runs ``step`` as it is)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    before = K.dispatch_counts()
    with torch.cuda.stream(stream):  # warm up
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    syncing = K.dispatch_counts().get(("moe_experts", "reference"), 0) > \
        before.get(("moe_experts", "reference"), 0)
    if syncing and requested:
        raise ValueError("cuda_graph=True: the decode step uses the reference MoE "
                         "dispatch (host sync), which a CUDA graph cannot capture")
    if syncing:
        warnings.warn("generate: the MoE runs on its reference path here (no Triton "
                      "kernel for this config), so the decode step is not captured in a "
                      "CUDA graph", RuntimeWarning, stacklevel=4)
        return None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    def replay() -> Any:
        graph.replay()
        return captured
    return replay


def compiled_cache_capacity(needed: int, max_seq_len: int) -> int:
    """The cache capacity ``generate(..., compiled=True)`` allocates for ``needed`` positions: the
    next power of two (at least 64), at most ``max_seq_len``. Dynamo compiles the step once per
    capacity, so without buckets every new prompt + max_new_tokens length compiled again (tens
    of seconds each, eager after ``recompile_limit`` of them). The static step attends over the
    whole buffer masked by position: the tokens are the same; the extra positions cost memory
    and masked attention work."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(max_seq_len, needed))


def _decode_step(model: nn.Module, tok: torch.Tensor, n_loops: Optional[int], layers: dict,
                 pos: torch.Tensor, head_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """generate()'s static decode step as a free function, compiled once per process (Dynamo
    then keeps one graph per model configuration, batch, loop count and cache capacity; a new
    instance of a configuration reuses its graph). ``head_t``: the head
    weight's transposed copy (``K.decode_head_weight``), multiplied instead of the head when
    given."""
    h = model.hidden_states(tok, n_loops, layers, 0, pos)[:, -1]
    if head_t is None:
        return model.logits(h)
    return K.lm_head_transposed(model.norm(h), head_t)


_GRAPH_CACHE_FAILED: list = []   # non-empty once a cached build failed in this process


@functools.cache
def _compiled_decode_step(fx_graph_cache: bool = True):
    """The compiled ``_decode_step`` (one per process and cache setting).

    Inductor's C++ code is vectorized only if its vector-ISA check passes, and that check runs a
    child Python with ``PYTHONPATH`` set to this process's ``sys.path``. A module on that path
    named like a standard one (e.g. a stray ``nt.py`` beside the running script) breaks the
    child, so the check fails, silently: inductor then emits scalar code, and a step loaded from
    the on-disk graph cache, generated vectorized by an earlier process, fails to build ("'at::vec'
    has not been declared"). So the ISA is resolved here, with a warning when an x86 CPU that
    reports AVX2 or AVX-512 gets no vector ISA, and generate() retries with
    ``fx_graph_cache=False`` if the build fails."""
    _warn_if_scalar_inductor()
    return torch.compile(_decode_step, dynamic=False,
                         options=None if fx_graph_cache else {"fx_graph_cache": False})


def _warn_if_scalar_inductor() -> None:
    """Warn when inductor's CPU vector-ISA check fails on an x86 CPU with AVX2 / AVX-512."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa, x86_isa_checker
        isa, flags = pick_vec_isa(), x86_isa_checker()
    except Exception:  # noqa: BLE001 - private helpers: without them inductor decides alone
        return
    if not isa and flags:
        warnings.warn(
            f"generate(compiled=True): the CPU reports {', '.join(flags)} but inductor's "
            "vector-ISA check failed, so the compiled step is scalar C++ (about 2-3x slower). "
            "The check runs a child Python with PYTHONPATH = sys.path: look for a module there "
            "that shadows a standard one (e.g. an nt.py beside your script).",
            RuntimeWarning, stacklevel=6)   # the caller of generate()


def sample(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """logits [B, V] -> next token [B]: open-mythos's temperature / top-k / multinomial rule, with
    open-mythos's random draws (:func:`mythos.sampling.multinomial_one` on the CPU);
    ``temperature=0`` takes the argmax. Either way a row whose maximum is not finite (a NaN or
    +inf in it, or only -inf) raises :class:`mythos.sampling.NonFiniteLogitsError` before any
    token is chosen or drawn (:func:`mythos.sampling.check_finite_rows`: one host read per step)."""
    if temperature == 0:
        top, tok = logits.max(-1)                 # the argmax (first of ties) and its value
        check_finite_rows(top)
        return tok
    check_finite_rows(logits.amax(-1))
    logits = top_k_filter(logits / temperature, top_k)
    # torch.multinomial(probs, 1), the same tokens and random stream (mythos.sampling)
    return multinomial_one(F.softmax(logits, dim=-1)).squeeze(-1)
