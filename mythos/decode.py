"""The eager CPU decode step, planned once per ``generate`` call (or ``forward`` decode call).

A decode step (one new token per row over the KV cache) through the module tree spends about as
much time in Python as in its ops: ~150 module calls, a dispatch decision and an input check per
op, every product's form chosen again from the shapes (``mythos_kernels.linear.dense``), cache
bookkeeping. None of that changes from one step to the next, so :func:`decode_plan` settles it
once, after the prefill: each product's form (:func:`~mythos_kernels.linear.dense_plan`), the
packed SwiGLU weights, the absorbed MLA weights, the LoRA scale rows, the loop-index vectors.
:meth:`DecodePlan.hidden` then runs the references' own functions (RMSNorm, RoPE, the latent
attention, routing, the expert forms, the LTI + ACT step) on the same values in the same order
as ``OpenMythos._hidden``: the hidden state, hence the logits and tokens, are bitwise the same
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
import torch.nn.functional as F

import mythos_kernels as K
from mythos_kernels._dispatch import cpu_enabled, cpu_inference, record
from mythos_kernels._env import env_flag
from mythos_kernels.attention import attention_reference
from mythos_kernels.cpu import moe as _cpu_moe
from mythos_kernels.cpu.linear import dense_plan, swiglu_plan
from mythos_kernels.cpu.mla_decode import _per_head
from mythos_kernels.mla_decode import mla_absorb_weights, mla_decode_attention_reference
from mythos_kernels.moe import moe_experts_reference, moe_route_reference
from mythos_kernels.recurrent import (
    acc_dtype,
    get_A,
    loop_input_reference,
    lti_act_step_and_next_input_reference,
    lti_act_step_reference,
)


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
    around a Linear), a ``forward`` set on an instance, a model class overriding ``_hidden``.
    One pass over the modules."""
    from torch.nn.modules import module as _m

    from . import model as M

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return "the model has forward hooks"
    if type(model)._hidden is not M.OpenMythos._hidden:
        return (f"{type(model).__name__}._hidden is not one of mythos's own modules (the plan "
                "would bypass its forward)")
    stock = (M.RMSNorm, M.Linear, M.GQAttention, M.MLAttention, M.Expert, M.MoEFFN,
             M.LoRAAdapter, M.TransformerBlock, M.LTIInjection, M.ACTHalting, M.RecurrentBlock,
             torch.nn.ModuleList, torch.nn.Embedding, torch.nn.Dropout)
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return "the model has forward hooks"
        if not name:
            continue
        ok = type(mod) in stock or (name == "head" and type(mod) is torch.nn.Linear)
        if not ok or "forward" in vars(mod):
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


class _Norm:
    """An RMSNorm module's reference call (``F.rms_norm`` for the plan's fp32 CPU tensors)."""

    def __init__(self, norm):
        self.w, self.eps, self.shape = norm.weight, norm.eps, (norm.weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        record("rms_norm")
        return torch.rms_norm(x, self.shape, self.w, self.eps)


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``apply_rope_reference(x, f)`` for fp32 x [B, T, H, d] with ``freqs`` =
    ``f.unsqueeze(0).unsqueeze(2)`` (made once per step): the same complex product, without the
    reference's no-op casts."""
    record("rope")
    if x.storage_offset() % 2 or not x.is_contiguous():
        x = x.clone(memory_format=torch.contiguous_format)
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2)


class _SwiGLU:
    """``Expert.forward`` (or the sum of several, as ``MoEFFN`` adds its shared experts): the
    packed form where the model takes it, else each expert's three products in turn."""

    def __init__(self, experts, rows: int):
        gates = [e.gate.weight for e in experts]
        ups = [e.up.weight for e in experts]
        downs = [e.down.weight for e in experts]
        self.packed = swiglu_plan(gates, ups, downs, rows)
        self.each: list = []
        if self.packed is None:
            # the model's fallback: out + expert(x) in turn, each expert trying its own packing
            for e in experts:
                one = swiglu_plan([e.gate.weight], [e.up.weight], [e.down.weight], rows) \
                    if len(experts) > 1 else None
                self.each.append(one or _plain_swiglu(e, rows))

    def add_to(self, out: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``out + sum(experts(x))`` (``experts(x)`` when out is None), in the model's order."""
        if self.packed is not None:
            y = self.packed(x)
            return y if out is None else out + y
        for f in self.each:
            y = f(x)
            out = y if out is None else out + y
        return out


def _plain_swiglu(e, rows: int):
    """``Expert.forward``'s unpacked form, ``down(silu(gate(x)) * up(x))``, planned."""
    gate, up, down = (dense_plan(lin.weight, lin.bias, rows) for lin in (e.gate, e.up, e.down))
    return lambda x: down(F.silu(gate(x)) * up(x))


class _MoE:
    """``MoEFFN.forward``: route, the routed experts' CPU form, the shared experts."""

    def __init__(self, moe, rows: int):
        self.moe = moe
        self.router = dense_plan(moe.router.weight, rows=rows, lead=1)
        self.shared = _SwiGLU(list(moe.shared_experts), rows) if len(moe.shared_experts) else None
        # moe_experts_cpu's form for rows x topk pairs, chosen now (it checks on every call)
        x = torch.empty(rows, moe.w13.shape[1], dtype=moe.w13.dtype)
        idx = torch.zeros(rows, moe.topk, dtype=torch.long)
        pairs = idx.numel() <= _cpu_moe.FEW_PAIRS and _cpu_moe._pairable(x, idx, moe.w13, moe.w2)
        self.experts = _cpu_moe._pairs_two_by_two if pairs else _cpu_moe.moe_experts_cpu
        self.impl = "cpu"
        if not cpu_enabled("moe_experts_cpu"):      # switched off: the reference, as moe_experts
            self.experts, self.impl = moe_experts_reference, "reference"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        record("moe_route")
        weights, idx = moe_route_reference(self.router(flat), moe.router_bias, moe.topk)
        moe._last_idx = idx.detach()
        record("moe_experts", self.impl)
        out = self.experts(flat, weights, idx, moe.w13, moe.w2)
        if self.shared is not None:
            out = self.shared.add_to(out, flat)
        return out.view(B, T, D)


class _MLA:
    """``MLAttention.forward`` for one token per row appended to the cache."""

    def __init__(self, a, rows: int):
        self.a = a
        self.q_down, self.kv_down = (dense_plan(a.q_down.weight, rows=rows),
                                     dense_plan(a.kv_down.weight, rows=rows))
        self.q_up_nope = dense_plan(a.q_up_nope.weight, rows=rows)
        self.q_up_rope = dense_plan(a.q_up_rope.weight, rows=rows)
        self.wo = dense_plan(a.wo.weight, rows=rows)
        self.q_norm, self.kv_norm = _Norm(a.q_norm), _Norm(a.kv_norm)
        w_uk, w_uv = mla_absorb_weights(a.kv_up.weight, a.n_heads, a.qk_nope_dim, a.v_dim)
        self.w_uk, self.w_uv_t = w_uk, w_uv.transpose(1, 2)

    def __call__(self, x: torch.Tensor, freqs: torch.Tensor, lc) -> torch.Tensor:
        a = self.a
        B, T, _ = x.shape
        H, r = a.n_heads, a.kv_lora_rank
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, H, a.qk_nope_dim)
        q_rope = _rope(self.q_up_rope(c_q).view(B, T, H, a.qk_rope_dim), freqs)
        kv_raw = self.kv_down(x)
        k_rope = kv_raw[..., r:].unsqueeze(2)    # the model's RoPE over min(2, H) copies
        k_rope = _rope(k_rope.expand(B, T, min(2, H), a.qk_rope_dim), freqs)[:, :, 0]
        kv = lc.append_next(c_kv=self.kv_norm(kv_raw[..., :r]), k_rope=k_rope)
        c_kv, k_rope = kv["c_kv"], kv["k_rope"]
        S = c_kv.shape[1]
        if not a._absorbed_is_cheaper(T, S):    # a short cache: the model decompresses
            k, v = K.mla_decompress(c_kv, k_rope, a.kv_up.weight, H, a.qk_nope_dim, a.v_dim)
            return a._attend(q_nope, q_rope, k, v, None)
        record("mla_decode_attention")
        scale = a.q_head_dim ** -0.5
        if B == 1:    # mla_decode's bmm absorption and reference attention, all views at B = 1
            q_lat = torch.bmm(q_nope.view(H, 1, a.qk_nope_dim), self.w_uk).view(1, H, r)
            s = torch.baddbmm(torch.bmm(q_rope.view(1, H, a.qk_rope_dim), k_rope.transpose(1, 2)),
                              q_lat, c_kv.transpose(1, 2)).mul_(scale)          # [1, H, S]
            out = torch.bmm(torch.softmax(s, dim=-1), c_kv).view(H, 1, r)
            return self.wo(torch.bmm(out, self.w_uv_t).view(1, 1, H * a.v_dim))
        out = mla_decode_attention_reference(_per_head(q_nope, self.w_uk), q_rope, c_kv, k_rope,
                                             S, scale)
        return self.wo(_per_head(out, self.w_uv_t).reshape(B, T, -1))


class _GQA:
    """``GQAttention.forward`` for one token per row appended to the cache."""

    def __init__(self, a, rows: int):
        self.a = a
        self.wq, self.wk, self.wv, self.wo = (dense_plan(lin.weight, rows=rows)
                                              for lin in (a.wq, a.wk, a.wv, a.wo))

    def __call__(self, x: torch.Tensor, freqs: torch.Tensor, lc) -> torch.Tensor:
        a = self.a
        B, T, _ = x.shape
        q = _rope(self.wq(x).view(B, T, a.n_heads, a.head_dim), freqs)
        k = _rope(self.wk(x).view(B, T, a.n_kv_heads, a.head_dim), freqs)
        kv = lc.append_next(k=k, v=self.wv(x).view(B, T, a.n_kv_heads, a.head_dim))
        record("attention")
        out = attention_reference(q, kv["k"], kv["v"], scale=a.head_dim ** -0.5, causal=False)
        return self.wo(out.reshape(B, T, -1))


class _Block:
    """``TransformerBlock.forward`` (eval: no residual dropout)."""

    def __init__(self, block, rows: int):
        from .model import MLAttention, MoEFFN

        self.attn_norm, self.ffn_norm = _Norm(block.attn_norm), _Norm(block.ffn_norm)
        self.attn = (_MLA if isinstance(block.attn, MLAttention) else _GQA)(block.attn, rows)
        if isinstance(block.ffn, MoEFFN):
            self.ffn = _MoE(block.ffn, rows)
        else:
            dense = _SwiGLU([block.ffn], rows)
            self.ffn = lambda x: dense.add_to(None, x)

    def __call__(self, x: torch.Tensor, freqs: torch.Tensor, lc) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs, lc)
        return x + self.ffn(self.ffn_norm(x))


class DecodePlan:
    """``OpenMythos._hidden`` for ``[B, 1]`` tokens appended to a filled cache (``generate``'s
    eager decode), its per-call decisions taken once at construction (module docstring)."""

    def __init__(self, model, batch: int, n_loops: Optional[int]):
        n_loops = n_loops or model.cfg.max_loop_iters          # as RecurrentBlock.forward
        self.model, self.n_loops = model, n_loops
        cfg = model.cfg
        self.prelude = [_Block(b, batch) for b in model.prelude]
        self.coda = [_Block(b, batch) for b in model.coda]
        rb = model.recurrent
        self.loop = _Block(rb.block, batch)
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


__all__ = ["DecodePlan", "decode_plan", "enabled", "why_not"]
