"""The eager CPU decode step, planned once per ``generate`` call (or ``forward`` decode call).

A decode step (one new token per row over the KV cache) through the module tree spends about as
much time in Python as in its ops: ~150 module calls, a dispatch decision and an input check per
op, every product's form chosen again from the shapes (``mythos_kernels.linear.dense``), cache
bookkeeping. None of that changes from one step to the next, so :func:`decode_plan` settles it
once, after the prefill: each product's form (:func:`~mythos_kernels.linear.dense_plan`), the
packed SwiGLU weights, the absorbed MLA weights, the LoRA scale rows, the loop-index vectors.
Each module builds its own piece through its public ``decode_plan`` method (``mythos.modules``);
:meth:`DecodePlan.hidden` strings them together and runs the references' own functions (RMSNorm, RoPE, the latent
attention, routing, the expert forms, the LTI + ACT step) on the same values in the same order
as ``OpenMythos.hidden_states``: the hidden state, hence the logits and tokens, are bitwise the same
(``tests/test_decode.py`` checks it over configurations). ``tools/cpu_ab.py --switches
decode_plan`` times it against the module path.

It serves ``generate``'s eager append-mode decode, and ``forward`` with one token per row onto a
cache that holds every layer the call uses (a plan per call), when everything it settles stays
settled: CPU tensors, an fp32 model, no autograd or autocast, no torch.func transform or tracing
(``mythos_kernels._dispatch.cpu_inference``), no forward hooks (a plan calls no modules, so a hook
would miss its calls), only mythos's own module types with their own ``forward`` (a submodule
swapped for another class, e.g. an adapter library's LoRA wrapper around a Linear, would be
bypassed), the backend not forced to ``triton``, no active dropout, and
``$MYTHOS_CPU_DECODE_PLAN`` not off. Otherwise :func:`decode_plan` returns None and the steps run
through the modules as before. Each step adds the ops it runs to the dispatch record
(``mythos_kernels.dispatch_counts``), as the module path's calls would.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn.modules import module as _torch_module

import mythos_kernels as K
from mythos_kernels._dispatch import cpu_inference, record
from mythos_kernels._env import env_flag
from mythos_kernels.cpu.linear import dense_plan
from mythos_kernels.recurrent import (
    acc_dtype,
    get_A,
    loop_input_reference,
    lti_act_step_and_next_input_reference,
    lti_act_step_reference,
)

from . import modules as M

_MODELS: list = []   # the model classes whose hidden_states the plan reproduces (register_model)
# the module classes a plan reproduces, with their forwards as defined (a forward replaced on
# the class afterwards is not what the plan runs)
_STOCK = {c: c.forward for c in (
    M.RMSNorm, M.Linear, M.GQAttention, M.MLAttention, M.Expert, M.MoEFFN, M.LoRAAdapter,
    M.TransformerBlock, M.LTIInjection, M.ACTHalting, M.RecurrentBlock, torch.nn.ModuleList,
    torch.nn.Embedding, torch.nn.Dropout, torch.nn.Linear)}


def register_model(cls: type) -> type:
    """Register a model class whose ``hidden_states`` :class:`DecodePlan` reproduces (``mythos.model``
    registers ``OpenMythos``; this module cannot import it)."""
    _MODELS.append(cls)
    return cls


def enabled() -> bool:
    """``$MYTHOS_CPU_DECODE_PLAN`` (a switch, default on: ``mythos_kernels._env``): whether
    ``generate`` may plan its CPU decode."""
    return env_flag("MYTHOS_CPU_DECODE_PLAN", True)


def why_not(model, input_ids: torch.Tensor) -> Optional[str]:
    """Why :func:`decode_plan` would not plan this model's decode here, or None if it would."""
    if not enabled():
        return "MYTHOS_CPU_DECODE_PLAN is off"
    if not input_ids.is_cpu:
        return "not on the CPU"
    if any(t.dtype != torch.float32 for t in model.parameters()) or any(
            t.is_floating_point() and t.dtype != torch.float32 for t in model.buffers()):
        return "not an fp32 model"
    if K.get_backend() in ("triton", "reference"):
        return f"the {K.get_backend()} backend is forced"
    if not cpu_inference(model.embed.weight):
        return "autograd, autocast, a torch.func transform or tracing is active"
    bypassed = _bypassed_module(model)
    if bypassed is not None:
        return bypassed
    if model.training and model.cfg.dropout > 0:
        return "dropout is active"
    return None


def _bypassed_module(model) -> Optional[str]:
    """Why a plan, which calls no modules, would skip computation or hooks the model has, or
    None: a forward hook (global or on a submodule: it would miss its calls), a module of
    another type than the model's own (a subclass too, or e.g. an adapter library's wrapper
    around a Linear), a ``forward`` set on an instance, a model class overriding ``hidden_states``.
    One pass over the modules."""
    _m = _torch_module
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return "the model has forward hooks"
    if not any(type(model).hidden_states is cls.hidden_states for cls in _MODELS):
        return (f"{type(model).__name__}.hidden_states is not one of mythos's own modules (the plan "
                "would bypass its forward)")
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return "the model has forward hooks"
        if not name:
            continue
        cls = type(mod)
        ok = cls in _STOCK and (cls is not torch.nn.Linear or name == "head")   # (head: not planned)
        if not ok or "forward" in vars(mod) or cls.forward is not _STOCK[cls]:
            return (f"module {name!r} ({type(mod).__name__}) is not one of mythos's own modules "
                    "(the plan would bypass its forward)")
    return None


def decode_plan(model, batch: int, n_loops: Optional[int], input_ids: torch.Tensor
                ) -> Optional["DecodePlan"]:
    """A :class:`DecodePlan` for ``batch`` rows and ``n_loops`` loops, or None (see
    :func:`why_not`). Build it where the steps will run (same autograd state, threads)."""
    if why_not(model, input_ids) is not None:
        return None
    return DecodePlan(model, batch, n_loops)


class DecodePlan:
    """``OpenMythos.hidden_states`` for ``[B, 1]`` tokens appended to a filled cache (``generate``'s
    eager decode), its per-call decisions taken once at construction (module docstring)."""

    def __init__(self, model, batch: int, n_loops: Optional[int]):
        n_loops = n_loops or model.cfg.max_loop_iters          # as RecurrentBlock.forward
        self.model, self.n_loops = model, n_loops
        cfg = model.cfg
        self.prelude = [b.decode_plan(batch) for b in model.prelude]
        self.coda = [b.decode_plan(batch) for b in model.coda]
        rb = model.recurrent
        self.loop = rb.block.decode_plan(batch)
        lora = rb.lora
        self.lora_down = dense_plan(lora.down.weight, rows=batch)
        last = lora.scale.num_embeddings - 1
        self.lora_scale = [lora.scale.weight[min(t, last)] for t in range(n_loops)]
        self.freqs = model.freqs_cis_mla if cfg.attn_type == "mla" else model.freqs_cis

    def hidden(self, tokens: torch.Tensor, cache: dict, pos: int) -> torch.Tensor:
        """Tokens ``[B, 1]`` at position ``pos`` (cache filled up to it) -> hidden [B, D] (before
        the final norm and head), appending this position to every layer's cache."""
        model, rb = self.model, self.model.recurrent
        freqs = self.freqs[pos:pos + 1].unsqueeze(0).unsqueeze(2)        # [1, 1, 1, d/2]
        x = model.embed(tokens)
        for i, block in enumerate(self.prelude):
            x = block(x, freqs, cache[f"prelude_{i}"])
        h = e = x
        B, T, D = h.shape
        acc = acc_dtype(h.dtype)
        cum_p = torch.zeros(B, T, dtype=acc)
        h_out = torch.zeros(B, T, D, dtype=acc)
        inj, halt, norm = rb.injection, rb.act.halt, rb.norm
        thr, loop_dim, lora_b = rb.cfg.act_threshold, rb.loop_dim, rb.lora.B
        record("loop_input")
        x = loop_input_reference(h, e, 0, norm.weight, norm.eps, loop_dim)
        A = get_A(inj.log_A, inj.log_dt)                         # once, not once per loop
        for t in range(self.n_loops):
            out = self.loop(x, freqs, cache[f"recurrent_loop_{t}"])
            out = out + (self.lora_down(out) * self.lora_scale[t]) @ lora_b
            record("lti_act_step")
            if t + 1 < self.n_loops:
                h, h_out, cum_p, x = lti_act_step_and_next_input_reference(
                    h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B, halt.weight,
                    halt.bias, thr, (t + 1, norm.weight, norm.eps, loop_dim), A)
            else:
                h, h_out, cum_p = lti_act_step_reference(
                    h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B, halt.weight,
                    halt.bias, thr, A)
        x = h_out.to(h.dtype)
        for i, block in enumerate(self.coda):
            x = block(x, freqs, cache[f"coda_{i}"])
        return x[:, -1]


__all__ = ["DecodePlan", "decode_plan", "enabled", "register_model", "why_not"]
