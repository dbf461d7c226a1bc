"""The OpenMythos recurrent-depth transformer, as a thin model over ``mythos_kernels`` ops.

    tokens -> embed -> Prelude (dense blocks, once)
           -> RecurrentBlock: one MoE TransformerBlock looped T times with LTI injection + ACT
           -> Coda (dense blocks, once) -> RMSNorm -> tied head -> logits

Module and parameter names equal open-mythos 0.5.0's, so its state_dicts load strictly; the one
layout change is that routed experts are stacked (``w13 [E, D, 2F]``, ``w2 [E, F, D]``) for
grouped GEMMs, converted by a load hook (``mythos.checkpoint``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import mythos_kernels as K
from mythos_kernels._dispatch import _compiling, _transformed

from ._validate import ArgumentTypeError, check_bool, check_float, check_int, device_memory_bytes
from .cache import CacheWrite, LayerCache, MythosCache, cache_length, check_cache, layer_cache
from .config import MythosConfig, check_allocation
from .decode import decode_plan
from .sampling import check_finite_rows, multinomial_one, top_k_filter


class RMSNorm(nn.Module):
    """RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state_dict keys) computed by ``K.dense``: on the CPU a
    product of a few rows without autograd runs on both cores (see ``mythos_kernels.linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.dense(x, self.weight, self.bias)


precompute_rope_freqs = K.precompute_rope_freqs
apply_rope = K.apply_rope
loop_index_embedding = K.loop_index_embedding


class _CausalMask:
    """The ``mask`` OpenMythos passes its blocks for a multi-token input: causal attention aligned
    to the end of the keys (a prefill, or a chunk appended to a cache), run by SDPA's causal path.
    open-mythos passes an additive [1, 1, T, T] tensor there (wrong for a chunk after a cache).
    Components called directly take open-mythos's values: ``None`` is no mask (every query sees
    every key), a tensor an additive (or bool) mask."""

    def __repr__(self) -> str:
        return "mythos.model.CAUSAL"


CAUSAL = _CausalMask()


def _mask_args(mask) -> tuple[bool, Optional[torch.Tensor]]:
    """(causal, attn_mask) for ``K.attention`` from a block's ``mask`` argument."""
    if mask is CAUSAL:
        return True, None
    if mask is None or isinstance(mask, torch.Tensor):
        return False, mask
    raise ValueError(f"mask must be None, a tensor or mythos.model.CAUSAL, got {mask!r}")


def _one_dtype(ref: torch.Tensor, *ts: torch.Tensor) -> list[torch.Tensor]:
    """``ts`` in one floating dtype for the fused ops, which take one: ``ref``'s (the
    activations') under autocast, as autocast casts the weights of the linear layers those ops
    replace; otherwise the widest of all (e.g. a cache filled under autocast, read without)."""
    dtypes = {t.dtype for t in ts} | {ref.dtype}
    if len(dtypes) == 1:
        return list(ts)
    if torch.is_autocast_enabled(ref.device.type):
        dt = ref.dtype
    else:
        dt = functools.reduce(torch.promote_types, dtypes)
    return [t.to(dt) for t in ts]


class GQAttention(nn.Module):
    """Grouped-query attention with RoPE; caches K (rotated) and V with n_kv_heads."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.groups = cfg.n_heads // cfg.n_kv_heads
        self.max_seq_len = cfg.max_seq_len
        self.wq = Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.dropout_p = cfg.dropout

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask=None,
                kv_cache: Optional[dict] = None, cache_key: str = "default",
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = K.apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs_cis)
        k = K.apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        causal, attn_mask = _mask_args(mask)
        if positions is not None:  # static decode: full-capacity buffers, mask by position
            kv = layer_cache(kv_cache, cache_key, self.max_seq_len).write_at(positions, k=k, v=v)
            k, v = kv["k"], kv["v"]
            causal = False
            attn_mask = torch.arange(k.shape[1], device=k.device) <= positions[:, None]
        elif kv_cache is not None:
            kv = layer_cache(kv_cache, cache_key, self.max_seq_len).append(k=k, v=v)
            k, v = kv["k"], kv["v"]
        if k.dtype != q.dtype:   # buffers made in another autocast state
            q, k, v = _one_dtype(q, q, k, v)
        out = K.attention(q, k, v, scale=self.head_dim ** -0.5, causal=causal,
                          dropout_p=self.dropout_p if self.training else 0.0, attn_mask=attn_mask)
        return self.wo(out.reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-latent attention (DeepSeek-V2). Caches the normalized latent c_kv [B, S, r] and one
    RoPE'd key [B, S, dr] shared by all heads; K_nope and V are decompressed through kv_up."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_rope_dim = cfg.qk_rope_head_dim
        self.qk_nope_dim = cfg.qk_nope_head_dim
        self.v_dim = cfg.v_head_dim
        self.q_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.max_seq_len = cfg.max_seq_len
        self.q_down = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank)
        self.q_up_nope = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_nope_head_dim, bias=False)
        self.q_up_rope = Linear(cfg.q_lora_rank, cfg.n_heads * cfg.qk_rope_head_dim, bias=False)
        self.kv_down = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank)
        self.kv_up = Linear(cfg.kv_lora_rank,
                            cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, bias=False)
        self.dropout_p = cfg.dropout

    def _static_splits(self, c_kv: torch.Tensor) -> int:
        """A fixed split count for the decode kernel, chosen from the cache capacity."""
        from mythos_kernels.mla_decode import mla_decode_num_splits

        return mla_decode_num_splits(c_kv.shape[0], self.n_heads, c_kv.shape[1], c_kv.shape[2],
                                     c_kv.device)

    def _absorbed_is_cheaper(self, T: int, S: int) -> bool:
        """Attend over the latent cache (W_UK/W_UV absorbed) instead of decompressing K and V
        when that takes fewer FLOPs: decode and short chunks over a long cache."""
        r, dn, dv, dr = self.kv_lora_rank, self.qk_nope_dim, self.v_dim, self.qk_rope_dim
        decompress = S * r * (dn + dv) + T * S * (dn + dr + dv)
        absorbed = T * (dn * r + S * (2 * r + dr) + r * dv)
        return absorbed < decompress

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask=None,
                kv_cache: Optional[dict] = None, cache_key: str = "default",
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        c_q = self.q_norm(self.q_down(x))
        q_nope = self.q_up_nope(c_q).view(B, T, H, self.qk_nope_dim)
        q_rope = K.apply_rope(self.q_up_rope(c_q).view(B, T, H, self.qk_rope_dim), freqs_cis)
        kv_raw = self.kv_down(x)
        # RoPE over min(2, H) broadcast copies of the one shared key, taking the first: torch's
        # complex product then runs the loop it runs over open-mythos's per-head copies and gives
        # its last bits (over a single copy it rounds differently, ~1 ulp of fp32)
        k_rope = kv_raw[..., self.kv_lora_rank:].unsqueeze(2)
        k_rope = K.apply_rope(k_rope.expand(B, T, min(2, H), self.qk_rope_dim), freqs_cis)
        k_rope = k_rope[:, :, 0]                                               # [B, T, dr]
        if kv_cache is None:  # training / no cache: RMSNorm fused into the decompression
            w_up, w_norm = _one_dtype(kv_raw, self.kv_up.weight, self.kv_norm.weight)
            k, v = K.mla_decompress(kv_raw[..., :self.kv_lora_rank], k_rope, w_up,
                                    H, self.qk_nope_dim, self.v_dim,
                                    norm_weight=w_norm, eps=self.kv_norm.eps)
            return self._attend(q_nope, q_rope, k, v, mask)
        c_kv = self.kv_norm(kv_raw[..., :self.kv_lora_rank])                  # [B, T, r]
        if c_kv.dtype != kv_raw.dtype:  # autocast: a low-precision latent, fp32-normalized
            c_kv = c_kv.to(kv_raw.dtype)  # (open-mythos's kv_up then casts it the same way)
        if positions is not None:  # static decode: full-capacity buffers, length as a tensor
            kv = layer_cache(kv_cache, cache_key, self.max_seq_len).write_at(
                positions, c_kv=c_kv, k_rope=k_rope)
            out = K.mla_decode(q_nope, q_rope, *_one_dtype(q_nope, kv["c_kv"], kv["k_rope"],
                                                           self.kv_up.weight),
                               self.qk_nope_dim, self.v_dim, positions[-1:] + 1,
                               self.q_head_dim ** -0.5, num_splits=self._static_splits(kv["c_kv"]))
            return self.wo(out.reshape(B, T, -1))
        kv = layer_cache(kv_cache, cache_key, self.max_seq_len).append(c_kv=c_kv, k_rope=k_rope)
        c_kv, k_rope, w_up = _one_dtype(q_nope, kv["c_kv"], kv["k_rope"], self.kv_up.weight)
        S = c_kv.shape[1]
        # the absorbed path attends causally (end-aligned): for CAUSAL, or one query (where
        # causal and no mask agree); other masks take the decompressed path
        if (mask is CAUSAL or (mask is None and T == 1)) and self._absorbed_is_cheaper(T, S):
            out = K.mla_decode(q_nope, q_rope, c_kv, k_rope, w_up,
                               self.qk_nope_dim, self.v_dim, S, self.q_head_dim ** -0.5)
            return self.wo(out.reshape(B, T, -1))
        k, v = K.mla_decompress(c_kv, k_rope, w_up, H, self.qk_nope_dim, self.v_dim)
        return self._attend(q_nope, q_rope, k, v, mask)

    def _attend(self, q_nope, q_rope, k, v, mask) -> torch.Tensor:
        """Attention of q = [q_nope | q_rope] over decompressed K [B,S,H,dq], V -> wo; ``mask``
        as the block's (:data:`CAUSAL`, None or a tensor)."""
        B, T = q_nope.shape[:2]
        q = torch.cat([q_nope, q_rope], dim=-1)                                # [B, T, H, dq]
        causal, attn_mask = _mask_args(mask)
        out = K.attention(q, k, v, scale=self.q_head_dim ** -0.5, causal=causal,
                          dropout_p=self.dropout_p if self.training else 0.0,
                          attn_mask=attn_mask)
        return self.wo(out.reshape(B, T, -1))


class Expert(nn.Module):
    """SwiGLU FFN: ``down(silu(gate(x)) * up(x))`` (dense prelude/coda FFN and shared experts).
    CPU inference multiplies gate|up as one product over a cached packed copy."""

    def __init__(self, dim: int, expert_dim: int):
        super().__init__()
        self.gate = Linear(dim, expert_dim, bias=False)
        self.up = Linear(dim, expert_dim, bias=False)
        self.down = Linear(expert_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _packed_swiglu_sum(x, (self,))
        return y if y is not None else self.down(F.silu(self.gate(x)) * self.up(x))


def _packed_swiglu_sum(x: torch.Tensor, experts) -> Optional[torch.Tensor]:
    """``sum(e(x) for e in experts)`` over cached packed weights when ``K.packable`` allows (CPU
    inference, decode-sized x); None, computing nothing, otherwise."""
    if not experts or not x.is_cpu:
        return None
    gates = [e.gate.weight for e in experts]
    ups = [e.up.weight for e in experts]
    downs = [e.down.weight for e in experts]
    if not K.packable(x, *gates, *ups, *downs):
        return None
    return K.shared_swiglu_packed(x, gates, ups, downs)


class MoEFFN(nn.Module):
    """DeepSeek-style MoE: softmax router, aux-loss-free selection bias, renormalized top-k,
    routed SwiGLU experts (stacked weights) + always-on shared experts."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.n_shared = cfg.n_shared_experts
        self.topk = cfg.n_experts_per_tok
        self.expert_dim = cfg.expert_dim
        self.router = Linear(cfg.dim, cfg.n_experts, bias=False)
        self.register_buffer("router_bias", torch.zeros(cfg.n_experts))
        self.w13 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, 2 * cfg.expert_dim))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.expert_dim, cfg.dim))
        self.shared_experts = nn.ModuleList(
            [Expert(cfg.dim, cfg.expert_dim * cfg.n_experts_per_tok) for _ in range(self.n_shared)])
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        from .checkpoint import moe_load_hook
        self._register_load_state_dict_pre_hook(moe_load_hook, with_module=True)
        self._last_idx: Optional[torch.Tensor] = None  # [N, k] experts chosen, last forward

    def __getattr__(self, name: str):
        if name == "routed_experts":
            raise AttributeError(
                "mythos's MoEFFN has no routed_experts ModuleList: the routed experts are stacked "
                "as w13 [n_experts, dim, 2 * expert_dim] (gate | up) and w2 [n_experts, "
                "expert_dim, dim] for grouped products; mythos.to_open_mythos_state_dict gives "
                "open-mythos's per-expert weights")
        return super().__getattr__(name)

    @property
    def last_counts(self) -> Optional[torch.Tensor]:
        """Tokens routed to each expert in the last forward (int64 [E]), for load balancing."""
        if self._last_idx is None:
            return None
        return K.expert_counts(self._last_idx, self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = self.router(flat)                                            # [N, E] unbiased
        weights, idx = K.moe_route(logits, self.router_bias, self.topk)       # [N, k] each
        self._last_idx = idx.detach()
        xe, w13, w2 = flat, self.w13, self.w2
        if torch.is_autocast_enabled(flat.device.type):
            # autocast runs open-mythos's expert nn.Linear layers in its low-precision dtype; the
            # grouped GEMMs take the same (else fp32 activations of the recurrent state keep the
            # kernels in exact fp32: measured on an H100, a mythos_1b training step under bf16
            # autocast took 284 ms against 92 ms with bf16 weights)
            dt = torch.get_autocast_dtype(flat.device.type)
            # the weights cast once per forward, not once per loop (as autocast's own weight
            # cache does for open-mythos's expert layers)
            w13, w2 = K.scope_memo(("moe_autocast", id(w13), id(w2), dt, torch.is_grad_enabled()),
                                   lambda: (self.w13.to(dt), self.w2.to(dt)))
            xe = flat.to(dt)
        out = K.moe_experts(xe, weights, idx, w13, w2)
        shared = _packed_swiglu_sum(flat, self.shared_experts)   # CPU inference: two products
        if shared is not None:
            return (out + shared).view(B, T, D)
        for expert in self.shared_experts:
            out = out + expert(flat)
        return out.view(B, T, D)


class LoRAAdapter(nn.Module):
    """Depth-wise LoRA: ``delta(x, t) = (down(x) * scale[min(t, max_loops-1)]) @ B``."""

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.randn(rank, dim) * 0.02)
        self.scale = nn.Embedding(max_loops, rank)

    def forward(self, x: torch.Tensor, loop_t: int) -> torch.Tensor:
        t_idx = min(loop_t, self.scale.num_embeddings - 1)
        return (self.down(x) * self.scale.weight[t_idx]) @ self.B


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ ffn(norm(x))`` (MoE when use_moe)."""

    def __init__(self, cfg: MythosConfig, use_moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
        self.ffn = MoEFFN(cfg) if use_moe else Expert(cfg.dim, cfg.dim * 4 // 3)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, freqs_cis, mask=None, kv_cache=None, cache_key="default", positions=None):
        drop = self.resid_drop
        drop = drop if drop.training and drop.p > 0 else None    # eval: identity, skip the call
        a = self.attn(self.attn_norm(x), freqs_cis, mask, kv_cache, cache_key, positions)
        x = x + (a if drop is None else drop(a))
        f = self.ffn(self.ffn_norm(x))
        return x + (f if drop is None else drop(f))


class LTIInjection(nn.Module):
    """``h' = A*h + B*e + out`` with ``A = exp(-exp(clamp(log_dt + log_A, -20, 20)))`` in (0, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.ones(dim) * 0.1)

    def get_A(self) -> torch.Tensor:
        return K.get_A(self.log_A, self.log_dt)

    def forward(self, h, e, transformer_out):
        return self.get_A() * h + self.B * e + transformer_out


class ACTHalting(nn.Module):
    """Per-position halting probability ``sigmoid(h . w + b)`` (Graves, 2016)."""

    def __init__(self, dim: int):
        super().__init__()
        self.halt = Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.halt(h)).squeeze(-1)


class RecurrentBlock(nn.Module):
    """One MoE TransformerBlock looped n_loops times with LTI injection and ACT halting.

    Without a cache the loop stops once every position has halted; with a cache every loop runs
    so each depth's cache stays filled (open-mythos semantics)."""

    def __init__(self, cfg: MythosConfig):
        super().__init__()
        self.cfg = cfg
        self.block = TransformerBlock(cfg, use_moe=True)
        self.injection = LTIInjection(cfg.dim)
        self.act = ACTHalting(cfg.dim)
        self.lora = LoRAAdapter(cfg.dim, cfg.lora_rank, cfg.max_loop_iters)
        self.norm = RMSNorm(cfg.dim)
        self.loop_dim = cfg.dim // 8
        # early-exit check: None = MYTHOS_HALT_LAG (default 0, a sync per loop); 1 = read the
        # all-halted flag one loop late (no sync; one extra loop when every row halts)
        self.halt_lag: Optional[int] = None
        # the "every position halted -> stop" decision: None = K.HaltCheck (above); a callable
        # ``(cum_p, threshold) -> bool`` replaces it (a distributed trainer all-reduces it so
        # every rank runs the same number of loops)
        self.halt_reducer: Optional[Callable[[torch.Tensor, float], bool]] = None

    def forward(self, h, e, freqs_cis, mask=None, n_loops=None, kv_cache=None, positions=None):
        n_loops = n_loops or self.cfg.max_loop_iters
        B, T, D = h.shape
        thr = self.cfg.act_threshold
        acc = K.acc_dtype(h.dtype)                 # ACT state: fp32 (fp64 for an fp64 model)
        cum_p = torch.zeros(B, T, device=h.device, dtype=acc)
        h_out = torch.zeros(B, T, D, device=h.device, dtype=acc)
        inj, halt, norm = self.injection, self.act.halt, self.norm
        x = K.loop_input(h, e, 0, norm.weight, norm.eps, self.loop_dim)
        halted = self.halt_reducer or K.HaltCheck(h.device, lag=self.halt_lag)  # lag 0 by default
        for t in range(n_loops):
            out = self.block(x, freqs_cis, mask, kv_cache, f"recurrent_loop_{t}", positions)
            delta = self.lora(out, t)  # the step kernel adds it (rounded as out + delta)
            if delta.dtype != out.dtype:   # autocast: a low-precision delta, promoted as in
                out, delta = out + delta, None                    # open-mythos's out + lora
            nxt = (t + 1, norm.weight, norm.eps, self.loop_dim) if t + 1 < n_loops else None
            # h' = A h + B e + out + delta, ACT accumulation, and the next loop's normed input
            res = K.lti_act_step(h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B,
                                 halt.weight, halt.bias, thr, next_loop=nxt, delta=delta)
            h, h_out, cum_p = res[:3]
            x = res[3] if nxt is not None else None
            if kv_cache is None and nxt is not None and halted(cum_p, thr):
                break
        return h_out.to(h.dtype)


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
    context. Under it each torch op skips autograd's version counting and view tracking:
    measured on the 2-core CPU (mid config), 7.5% of a 64 + 32-token generate (0.816 -> 0.755 s,
    30 interleaved rounds) and ~1.5 ms of a ~20 ms decode step through ``forward``. Only with
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
        from .checkpoint import rope_load_hook
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

    def _check_inputs(self, input_ids, n_loops, kv_cache, start_pos) -> None:
        """Validate before any compute, so a bad call leaves the cache untouched."""
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
        check_int("n_loops", n_loops, lo=1, none_ok=True)
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
            n_loops: recurrent depth (default cfg.max_loop_iters; may exceed it at inference).
            kv_cache: a dict (``{}`` to start) reused across calls for incremental decoding;
                refused before any compute if it does not fit the model or was left
                inconsistent, and left as it was if the call raises (``mythos.cache``).
            start_pos: position of input_ids[:, 0] in the sequence (selects RoPE frequencies).
                With a cache it must equal the positions the cache holds; omitted (None), it
                is taken from the cache (0 without one).
        """
        n_loops = check_int("n_loops", n_loops, lo=1, none_ok=True)
        start_pos = check_int("start_pos", start_pos, lo=0, none_ok=True)
        if start_pos is None:
            start_pos = cache_length(kv_cache) if isinstance(kv_cache, dict) else 0
        self._check_inputs(input_ids, n_loops, kv_cache, start_pos)
        with CacheWrite(kv_cache), _inference_scope(self):   # rollback on error; no_grad: scope
            plan = self._decode_plan(input_ids, n_loops, kv_cache)
            if plan is not None:   # one token per row onto a filled cache, on the CPU
                h = plan.hidden(input_ids, kv_cache, start_pos).unsqueeze(1)
            else:
                h = self._hidden(input_ids, n_loops, kv_cache, start_pos)
        return self._logits(h)                   # a normal tensor whatever the scope

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

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and the tied head."""
        return K.lm_head(self.norm(h), self.head.weight)

    def _hidden(self, input_ids, n_loops, kv_cache, start_pos, positions=None) -> torch.Tensor:
        """Embedding -> prelude -> recurrent loop -> coda (before the final norm and head).
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
                by :func:`mythos.adaptive.generate` (eager, module path) when any is set.
            compiled: run the static decode step through ``torch.compile`` (inductor; on the CPU
                it needs a C++ compiler). Meant for the CPU: on a GPU the compiled step runs
                without a CUDA graph and is slower than the default captured eager step
                (measured on an H100, mythos_1b dims, B=1: 52 against 128 tokens/s). The first
                call per configuration and shape compiles (tens of seconds); later calls reuse
                it. Same tokens as the eager step within fp32
                rounding. On the CPU the compiled step keeps the eager CPU forms that matter
                for decode: the head multiplies its cached transposed copy (passed in as an
                input) and the few-row projections run split over two cores
                (``K.compiled_split``, when torch has at least two threads). Measured on the
                2-core CPU (mid config, B=1, ``tools/cpu_compile_probe.py``): ~8 ms per step
                against ~16 ms compiled without those forms and 19-22 ms eager. On the
                references a batch with more (token, slot) pairs than experts splits the graph
                at the MoE (its reference reads expert counts on the host): still correct, less
                gain. Dynamo compiles the step again for each model configuration (another
                instance of the same config reuses it), batch size, loop count and cache
                capacity (prompt + max_new_tokens rounded up to a power of two, at least 64,
                at most max_seq_len: :func:`compiled_cache_capacity`), up to
                ``torch._dynamo.config.recompile_limit`` (8 by default) per process; past that
                it runs the step eagerly (torch logs a warning), same tokens, eager speed.
        """
        if (top_p, min_p, draft_loops, exit_criterion, exit_threshold) != (None,) * 5:
            from .adaptive import generate as adaptive_generate  # top-p/min-p, exit, speculative
            return adaptive_generate(self, input_ids, max_new_tokens, n_loops, temperature, top_k,
                                     top_p, min_p, draft_loops, draft_tokens, exit_criterion,
                                     exit_threshold, exit_fill, cuda_graph=cuda_graph,
                                     static=static, compiled=compiled)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, lo=0)
        # +inf: uniform sampling, as open-mythos's logits / inf
        temperature = check_float("temperature", temperature, lo=0, inf_ok=True)
        top_k = check_int("top_k", top_k, none_ok=True)       # <= 0 or None: no top-k filter
        top_k = 0 if top_k is None else top_k
        n_loops = check_int("n_loops", n_loops, lo=1, none_ok=True)
        cuda_graph = check_bool("cuda_graph", cuda_graph, none_ok=True)
        static = check_bool("static", static, none_ok=True)
        compiled = check_bool("compiled", compiled)
        self._check_inputs(input_ids, n_loops, None, 0)
        if max_new_tokens == 0:
            return input_ids
        B, prompt_len = input_ids.shape
        total = prompt_len + max_new_tokens - 1
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) - 1 = "
                             f"{total} exceeds max_seq_len {self.cfg.max_seq_len}")
        graph_requested = cuda_graph
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
        # compiled: a bucketed capacity, so calls with other lengths reuse the compiled step
        cache = MythosCache(compiled_cache_capacity(total, self.cfg.max_seq_len) if compiled
                            else total)
        # int64 whatever the prompt's integer dtype (open-mythos's torch.cat with the sampled
        # int64 tokens promotes); a normal tensor even under _in_inference_scope
        with torch.inference_mode(False):
            out = input_ids.new_empty(B, prompt_len + max_new_tokens, dtype=torch.long)
        out[:, :prompt_len] = input_ids
        h = self._hidden(input_ids, n_loops, cache, 0)[:, -1]                   # prefill
        out[:, prompt_len] = sample(self._logits(h), temperature, top_k)
        if max_new_tokens == 1:
            return out
        if not static:
            # on the CPU, the steps' per-call decisions taken once (mythos.decode): same values
            plan = decode_plan(self, B, n_loops, input_ids)
            for i in range(1, max_new_tokens):
                cur = out[:, prompt_len + i - 1:prompt_len + i]
                if plan is not None:
                    h = plan.hidden(cur, cache, prompt_len + i - 1)
                else:
                    h = self._hidden(cur, n_loops, cache, prompt_len + i - 1)[:, -1]
                out[:, prompt_len + i] = sample(self._logits(h), temperature, top_k)
            return out
        # static inputs (fresh [B, 1]: a clone of the slice would keep its row stride, which
        # depends on the lengths, and Dynamo guards on strides)
        tok = out.new_empty(B, 1).copy_(out[:, prompt_len:prompt_len + 1])
        pos = torch.full((1,), prompt_len, dtype=torch.long, device=out.device)

        def step() -> torch.Tensor:
            return self._logits(self._hidden(tok, n_loops, cache, 0, pos)[:, -1])

        run = step
        if compiled:
            layers = dict(cache)  # a plain dict of the filled layer caches: traceable lookups
            compiled_step = _compiled_decode_step(fx_graph_cache=not _GRAPH_CACHE_FAILED)
            # the CPU decode forms compiled code can take: the head's transposed copy as an
            # input (None elsewhere) and the split few-row products (mythos_kernels.linear)
            head_t = K.decode_head_weight(self.head.weight) if input_ids.is_cpu else None
            split = input_ids.is_cpu and K.two_threads()

            from torch._dynamo.exc import BackendCompilerFailed

            def run() -> torch.Tensor:
                nonlocal compiled_step
                with K.compiled_split(split):
                    try:
                        return compiled_step(self, tok, n_loops, layers, pos, head_t)
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
                        return compiled_step(self, tok, n_loops, layers, pos, head_t)
        if cuda_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            before = K.dispatch_counts()
            with torch.cuda.stream(stream):  # warm up (idempotent: same token, same position)
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            # the reference MoE dispatch reads expert counts on the host: not capturable
            syncing = K.dispatch_counts().get(("moe_experts", "reference"), 0) > \
                before.get(("moe_experts", "reference"), 0)
            if syncing and graph_requested:
                raise ValueError("cuda_graph=True: the decode step uses the reference MoE "
                                 "dispatch (host sync), which a CUDA graph cannot capture")
            if syncing:
                warnings.warn("generate: the MoE runs on its reference path here (no Triton "
                              "kernel for this config), so the decode step is not captured in a "
                              "CUDA graph", RuntimeWarning, stacklevel=2)
                cuda_graph = False
        if cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits_out = step()

            def run() -> torch.Tensor:
                graph.replay()
                return logits_out

        for i in range(1, max_new_tokens):
            tok.copy_(out[:, prompt_len + i - 1:prompt_len + i])
            pos.fill_(prompt_len + i - 1)
            out[:, prompt_len + i] = sample(run(), temperature, top_k)
        for c in cache.values():
            c.length = total
        return out


def compiled_cache_capacity(needed: int, max_seq_len: int) -> int:
    """The cache capacity ``generate(..., compiled=True)`` allocates for ``needed`` positions: the
    next power of two (at least 64), at most ``max_seq_len``. Dynamo compiles the step once per
    capacity, so without buckets every new prompt + max_new_tokens length compiled again (tens
    of seconds each, eager after ``recompile_limit`` of them). The static step attends over the
    whole buffer masked by position: the tokens are the same; the extra positions cost memory
    and masked attention work."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(max_seq_len, needed))


def _decode_step(model: OpenMythos, tok: torch.Tensor, n_loops: Optional[int], layers: dict,
                 pos: torch.Tensor, head_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """generate()'s static decode step as a free function, compiled once per process (Dynamo
    then keeps one graph per model configuration, batch, loop count and cache capacity; a new
    instance of a configuration reuses its graph). ``head_t``: the head
    weight's transposed copy (``K.decode_head_weight``), multiplied instead of the head when
    given."""
    h = model._hidden(tok, n_loops, layers, 0, pos)[:, -1]
    if head_t is None:
        return model._logits(h)
    return K.lm_head_transposed(model.norm(h), head_t)


_GRAPH_CACHE_FAILED: list = []   # non-empty once a cached build failed in this process


@functools.cache
def _compiled_decode_step(fx_graph_cache: bool = True):
    """The compiled ``_decode_step`` (one per process and cache setting).

    Inductor's C++ code is vectorized only if its vector-ISA check passes, and that check runs a
    child Python with ``PYTHONPATH`` set to this process's ``sys.path``. A module on that path
    named like a standard one (found here: a stray ``nt.py`` in the directory of the running
    script) breaks the child, so the check fails, silently: inductor then emits scalar code
    (measured, mid config B=1: ~23 ms a step against ~9 ms vectorized), and a step loaded from
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
            RuntimeWarning, stacklevel=5)   # the caller of generate()


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
