"""The OpenMythos recurrent-depth transformer (its modules: ``mythos.modules``).

    tokens -> embed -> Prelude (dense blocks, once)
           -> RecurrentBlock: one MoE TransformerBlock looped T times with LTI injection + ACT
           -> Coda (dense blocks, once) -> RMSNorm -> tied head -> logits

Module and parameter names equal open-mythos 0.5.0's, so its state_dicts load strictly; the one
layout change is that routed experts are stacked (``w13 [E, D, 2F]``, ``w2 [E, F, D]``) for
grouped GEMMs, converted by a load hook (``mythos.checkpoint``). Every module name is importable
from here as from ``mythos.modules``; ``generate`` runs in ``mythos.generate``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Optional

import torch
import torch.nn as nn

import mythos_kernels as K
from mythos_kernels._dispatch import _compiling, _transformed

from . import decode
from ._validate import ArgumentTypeError, check_int, check_loops, device_memory_bytes
from .adaptive import generate as adaptive_generate
from .cache import CacheWrite, LayerCache, cache_length, check_cache
from .checkpoint import rope_load_hook
from .config import MythosConfig, check_allocation
from .decode import decode_plan
from .generate import compiled_cache_capacity, sample
from .generate import generate as _generate
from .modules import (
    CAUSAL,
    ACTHalting,
    Expert,
    ExpertView,
    GQAttention,
    Linear,
    LoRAAdapter,
    LTIInjection,
    MLAttention,
    MoEFFN,
    RecurrentBlock,
    RMSNorm,
    RoutedExperts,
    TransformerBlock,
    must_call,
    apply_rope,
    loop_index_embedding,
    precompute_rope_freqs,
)


def _weights_unchanged(fn):
    """Run ``fn`` inside ``K.weights_unchanged()`` (the CPU forms' cached weight copies check
    their sources once per call, not once per use); traced code runs it as it is."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _compiling():
            return fn(*args, **kwargs)
        with K.weights_unchanged():
            return fn(*args, **kwargs)
    return wrapper


def _hooked(model: nn.Module) -> bool:
    """Whether a forward hook (global, or on any submodule of ``model``) could see tensors."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())


def _inference_scope(model: nn.Module):
    """``torch.inference_mode()`` where the caller cannot tell the difference, else a null
    context. Under it each torch op skips autograd's version counting and view tracking. Only with
    grad already disabled (no_grad), outside tracing, and when the model has no forward hooks:
    the tensors a hook sees would be inference tensors, which cannot be saved for backward (a
    probe trained on captured activations) or changed in place outside inference mode; nor
    inside ``torch.func`` transforms or forward-mode AD (:func:`_transformed`). What
    the caller gets back stays a normal tensor (``forward`` computes the logits outside it,
    ``generate`` allocates its output outside it). (Not ``torch.inference_mode(False)`` for the
    other case: that turns grad mode back on.)"""
    if (_compiling() or torch.is_grad_enabled() or torch.is_inference_mode_enabled()
            or _transformed() or _hooked(model)):
        return contextlib.nullcontext()
    return torch.inference_mode()


def _in_inference_scope(fn):
    """Run the method ``fn`` in :func:`_inference_scope` (generate: grad already disabled)."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with _inference_scope(self):
            return fn(self, *args, **kwargs)
    return wrapper


class OpenMythos(nn.Module):
    """Recurrent-depth transformer language model (drop-in for ``open_mythos.OpenMythos``)."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        if not isinstance(cfg, MythosConfig):
            raise ArgumentTypeError(f"cfg must be a mythos.MythosConfig, got {type(cfg).__name__}")
        cfg.validate()
        # refuse before allocating what the device cannot hold (meta: nothing is allocated)
        dev = torch.get_default_device()
        check_allocation(cfg, device_memory_bytes(dev), torch.get_default_dtype().itemsize,
                         f"the default device ({dev})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        for name, table in self._rope_tables().items():
            self.register_buffer(name, table)
        self.prelude = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.prelude_layers)])
        self.recurrent = RecurrentBlock(cfg)
        self.coda = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.coda_layers)])
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # weight tying
        self._init_weights()
        self._register_load_state_dict_pre_hook(rope_load_hook, with_module=True)

    def _apply(self, fn, recurse=True):
        """``Module._apply`` (behind ``.to``, ``.cuda``, ``.half``, ...), keeping the RoPE phasors
        complex64: ``model.to(torch.bfloat16)`` would cast the complex buffers to the real dtype,
        dropping the imaginary part with only a warning (RoPE silently reduced to a scaling by
        cos; open-mythos has that defect). They are recomputed on their new device instead."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Casting complex values to real")
            super()._apply(fn, recurse)
        for name, table in self._rope_tables().items():
            buf = getattr(self, name)
            if not buf.is_complex():
                setattr(self, name, table.to(buf.device))
        return self

    def _rope_tables(self) -> dict[str, torch.Tensor]:
        """The RoPE phasor buffers (complex64, on the CPU) for this config: GQA's over the head
        dim, MLA's over the rope dim."""
        cfg = self.cfg
        return {name: precompute_rope_freqs(dim, cfg.max_seq_len, cfg.rope_theta)
                for name, dim in (("freqs_cis", cfg.dim // cfg.n_heads),
                                  ("freqs_cis_mla", cfg.qk_rope_head_dim))}

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def check_inputs(self, input_ids: torch.Tensor, n_loops: Optional[int], kv_cache: Optional[dict],
                     start_pos: Optional[int]) -> None:
        """Validate ``forward``'s arguments (and the cache against this model) before any compute,
        so a bad call leaves the cache untouched; raises ValueError / ArgumentTypeError naming the
        argument. Generation and custom decoding loops call it before :meth:`hidden_states`."""
        cfg = self.cfg
        if not isinstance(input_ids, torch.Tensor):
            raise ArgumentTypeError(f"input_ids must be a torch.Tensor of int64 or int32 token "
                                    f"ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):   # what the embedding takes
            raise ArgumentTypeError(f"input_ids must be an integer tensor of dtype int64 or "
                                    f"int32, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if B < 1 or T < 1:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        check_loops("n_loops", n_loops)
        check_int("start_pos", start_pos, lo=0)
        if start_pos + T > cfg.max_seq_len:
            raise ValueError(f"start_pos + seq_len = {start_pos} + {T} exceeds max_seq_len "
                             f"{cfg.max_seq_len}")
        if kv_cache is not None:
            if not isinstance(kv_cache, dict):
                raise ArgumentTypeError(f"kv_cache must be a dict or None, got {type(kv_cache).__name__}")
            check_cache(kv_cache, cfg, input_ids, start_pos)   # fits, consistent, start_pos
        if _compiling():  # a host read would break the graph; eager checks it
            return
        K.check_environment()   # every MYTHOS_* variable parsed now, before any compute
        lo, hi = torch.aminmax(input_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={cfg.vocab_size}), got values "
                             f"in [{lo}, {hi}]")

    @_weights_unchanged
    def forward(self, input_ids: torch.Tensor, n_loops: Optional[int] = None,
                kv_cache: Optional[dict] = None, start_pos: Optional[int] = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab_size].

        Args:
            n_loops: recurrent depth (None or 0: cfg.max_loop_iters, as open-mythos; may
                exceed it at inference).
            kv_cache: a dict (``{}`` to start) reused across calls for incremental decoding;
                refused before any compute if it does not fit the model or was left
                inconsistent, and left as it was if the call raises (``mythos.cache``).
            start_pos: position of input_ids[:, 0] in the sequence (selects RoPE frequencies).
                With a cache it must equal the positions the cache holds; omitted (None), it
                is taken from the cache (0 without one).
        """
        n_loops = check_loops("n_loops", n_loops)
        start_pos = check_int("start_pos", start_pos, lo=0, none_ok=True)
        if start_pos is None:
            start_pos = cache_length(kv_cache) if isinstance(kv_cache, dict) else 0
        self.check_inputs(input_ids, n_loops, kv_cache, start_pos)
        with CacheWrite(kv_cache), _inference_scope(self):   # rollback on error; no_grad: scope
            plan = self._decode_plan(input_ids, n_loops, kv_cache)
            if plan is not None:   # one token per row onto a filled cache, on the CPU
                h = plan.hidden(input_ids, kv_cache, start_pos).unsqueeze(1)
            else:
                h = self.hidden_states(input_ids, n_loops, kv_cache, start_pos)
        return self.logits(h)                   # a normal tensor whatever the scope

    def _decode_plan(self, input_ids, n_loops, kv_cache):
        """A decode plan (``mythos.decode``) for this call: one token per row appended to a
        cache that holds every layer this call uses, where the plan serves (None otherwise)."""
        if input_ids.shape[1] != 1 or not kv_cache or _compiling():
            return None
        cfg = self.cfg
        keys = ([f"prelude_{i}" for i in range(cfg.prelude_layers)]
                + [f"recurrent_loop_{t}" for t in range(n_loops or cfg.max_loop_iters)]
                + [f"coda_{i}" for i in range(cfg.coda_layers)])
        if not all(isinstance(kv_cache.get(k), LayerCache) for k in keys):
            return None
        return decode_plan(self, input_ids.shape[0], n_loops, input_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[..., D]`` (:meth:`hidden_states`) -> logits ``[..., vocab_size]``: the
        final RMSNorm and the tied head."""
        if self.head_called():
            return self.head(self.norm(h))
        return K.lm_head(self.norm(h), self.head.weight)

    def head_called(self) -> bool:
        """Whether the head must be called as a module (hooked, patched, replaced, or with a
        bias: :func:`mythos.modules.must_call`) rather than computed from its weight alone."""
        return must_call(self.head, nn.Linear) or self.head.bias is not None

    def hidden_states(self, input_ids: torch.Tensor, n_loops: Optional[int], kv_cache: Optional[dict],
                      start_pos: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embedding -> prelude -> recurrent loop -> coda: ``[B, T, D]`` before the final norm and
        head (``forward`` is ``logits(hidden_states(...))`` after ``check_inputs``); no checks.
        ``positions`` (int64 device tensor [T]) selects the static decode path: cache writes and
        RoPE by tensor index, attention over the full preallocated cache (CUDA-graph safe)."""
        T = input_ids.shape[1]
        x = self.embed(input_ids)
        freqs = self.freqs_cis_mla if self.cfg.attn_type == "mla" else self.freqs_cis
        freqs_cis = freqs[start_pos:start_pos + T] if positions is None else \
            freqs.index_select(0, positions)
        mask = CAUSAL if T > 1 else None             # open-mythos: its causal mask if T > 1
        for i, layer in enumerate(self.prelude):
            x = layer(x, freqs_cis, mask, kv_cache, f"prelude_{i}", positions)
        e = x
        x = self.recurrent(x, e, freqs_cis, mask, n_loops, kv_cache, positions)
        for i, layer in enumerate(self.coda):
            x = layer(x, freqs_cis, mask, kv_cache, f"coda_{i}", positions)
        return x

    @torch.no_grad()
    @_in_inference_scope
    @_weights_unchanged
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, n_loops: int = 8,
                 temperature: float = 1.0, top_k: int = 50,
                 cuda_graph: Optional[bool] = None,
                 static: Optional[bool] = None,
                 compiled: bool = False, top_p: Optional[float] = None,
                 min_p: Optional[float] = None, draft_loops: Optional[int] = None,
                 draft_tokens: int = 4, exit_criterion: Optional[str] = None,
                 exit_threshold: Optional[float] = None,
                 exit_fill: str = "recompute") -> torch.Tensor:
        """Autoregressive sampling with a preallocated KV cache: [B, T] -> [B, T + max_new_tokens].

        Same sampling as open-mythos (logits / temperature, top-k filter, multinomial); top_k=1
        reproduces its tokens; ``temperature=0`` is greedy decoding. The prompt is prefilled in
        one forward into a cache preallocated for the whole generation. Runs under
        ``torch.inference_mode()``, or under ``torch.no_grad()`` as open-mythos's does when the
        model has forward hooks (so what they capture are normal tensors); returns a normal
        tensor either way.

        Args:
            cuda_graph: capture the decode step once in a CUDA graph and replay it per token
                (default: on for CUDA inputs unless the reference backend is forced).
            static: decode with the static-shape step (cache written by a position tensor,
                attention over the full preallocated cache masked by length, no host sync);
                default: the same as ``cuda_graph``. Otherwise each step appends to the cache
                and attends over the valid prefix (fewer ops: faster eagerly, e.g. on CPU).
                On the CPU those steps run through a decode plan (``mythos.decode``: each
                step's forms and checks settled once, after the prefill; bitwise the same
                values) where its conditions hold (fp32, no hooks, backend not forced to triton;
                ``MYTHOS_CPU_DECODE_PLAN=0`` turns it off).
            top_p, min_p, draft_loops, draft_tokens, exit_criterion, exit_threshold, exit_fill:
                nucleus / min-p filters, self-speculative decoding and per-token early exit, run
                by :func:`mythos.adaptive.generate` (eager, module path) when any differs from
                its default.
            compiled: run the static decode step through ``torch.compile`` (inductor; on the CPU
                it needs a C++ compiler). Meant for the CPU: on a GPU the captured eager step
                is faster. The first call per configuration and shape compiles (tens of
                seconds); later calls reuse it. Same tokens as the eager step within fp32
                rounding. On the CPU the compiled step keeps the head's transposed copy and the
                few-row products split over two cores (``K.compiled_split``). Dynamo compiles
                again per model configuration, batch size, loop count and cache capacity
                (:func:`mythos.generate.compiled_cache_capacity`), up to
                ``torch._dynamo.config.recompile_limit`` per process; past that the step runs
                eagerly (same tokens).
        """
        adaptive = (top_p, min_p, draft_loops, draft_tokens, exit_criterion, exit_threshold,
                    exit_fill)
        if adaptive != (None, None, None, 4, None, None, "recompute"):
            return adaptive_generate(self, input_ids, max_new_tokens, n_loops, temperature, top_k,
                                     *adaptive, cuda_graph=cuda_graph, static=static,
                                     compiled=compiled)
        return _generate(self, input_ids, max_new_tokens, n_loops, temperature, top_k,
                         cuda_graph, static, compiled)


__all__ = [
    "CAUSAL", "ACTHalting", "Expert", "ExpertView", "GQAttention", "LTIInjection", "Linear", "LoRAAdapter",
    "MLAttention", "MoEFFN", "OpenMythos", "RMSNorm", "RecurrentBlock", "RoutedExperts", "TransformerBlock",
    "apply_rope", "compiled_cache_capacity", "loop_index_embedding", "precompute_rope_freqs", "sample",
]


decode.register_model(OpenMythos)   # the model class whose hidden_states a decode plan reproduces
