"""The modules of the OpenMythos model; each ``forward`` calls ``mythos_kernels`` ops.

Module and parameter names equal open-mythos 0.5.0's, so its state_dicts load strictly; the one
layout change is that routed experts are stacked (``w13 [E, D, 2F]``, ``w2 [E, F, D]``) for
grouped GEMMs, converted by a load hook (``mythos.checkpoint``) and read back per expert through
:attr:`MoEFFN.routed_experts`.

Each module also builds its piece of the CPU decode plan (``decode_plan(rows)``, used by
``mythos.decode``): the same ops on the same values as its ``forward`` for one token per row
appended to a filled cache, with every per-call decision (product forms, packed and absorbed
weights) taken once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _torch_module

import mythos_kernels as K
from mythos_kernels._dispatch import cpu_enabled, record
from mythos_kernels.attention import attention_reference
from mythos_kernels.cpu.linear import dense_plan, swiglu_plan
from mythos_kernels.cpu.moe import FEW_PAIRS, moe_experts_cpu, moe_experts_few_pairs
from mythos_kernels.mla_decode import mla_absorb_weights, mla_decode_attention_reference, mla_decode_num_splits
from mythos_kernels.moe import moe_experts_reference, moe_route_reference
from mythos_kernels.recurrent import act_accumulate_reference

from .cache import layer_cache
from .checkpoint import moe_load_hook
from .config import MythosConfig


def must_call(mod: nn.Module, cls: type) -> bool:
    """Whether ``mod``, whose weights a fused kernel reads where open-mythos calls the module,
    must be called as a module instead: a forward hook or pre-hook on it (or a global one), a
    ``forward`` set on the instance or replaced on its class, or a module of another type in
    its place. The caller then takes its module-by-module path, so that hooks see the calls
    open-mythos makes and patches take effect."""
    return bool(type(mod) is not cls or "forward" in vars(mod)
                or cls.forward is not _STOCK_FORWARDS.get(cls)
                or mod._forward_hooks or mod._forward_pre_hooks
                or _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


class RMSNorm(nn.Module):
    """RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def decode_plan(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """This norm's CPU decode-plan piece: ``x -> forward(x)`` for fp32 CPU tensors."""
        return _Norm(self)

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
        return "mythos.modules.CAUSAL"


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

    def decode_plan(self, rows: int) -> Callable:
        """The CPU decode-plan piece ``(x [rows, 1, D], freqs, layer cache) -> out``: ``forward``
        for one token per row appended to the cache, its product forms chosen now."""
        return _GQA(self, rows)

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
        return mla_decode_num_splits(c_kv.shape[0], self.n_heads, c_kv.shape[1], c_kv.shape[2],
                                     c_kv.device)

    def _absorbed_is_cheaper(self, T: int, S: int) -> bool:
        """Attend over the latent cache (W_UK/W_UV absorbed) instead of decompressing K and V
        when that takes fewer FLOPs: decode and short chunks over a long cache."""
        r, dn, dv, dr = self.kv_lora_rank, self.qk_nope_dim, self.v_dim, self.qk_rope_dim
        decompress = S * r * (dn + dv) + T * S * (dn + dr + dv)
        absorbed = T * (dn * r + S * (2 * r + dr) + r * dv)
        return absorbed < decompress

    def decode_plan(self, rows: int) -> Callable:
        """The CPU decode-plan piece ``(x [rows, 1, D], freqs, layer cache) -> out``: ``forward``
        for one token per row appended to the cache, with the absorbed weights made now."""
        return _MLA(self, rows)

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
        if positions is None and (must_call(self.kv_norm, RMSNorm) or must_call(self.kv_up, Linear)):
            return self._forward_modules(q_nope, q_rope, kv_raw, k_rope, mask, kv_cache, cache_key)
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
            kv = layer_cache(kv_cache, cache_key, self.max_seq_len, H).write_at(
                positions, c_kv=c_kv, k_rope=k_rope)
            out = K.mla_decode(q_nope, q_rope, *_one_dtype(q_nope, kv["c_kv"], kv["k_rope"],
                                                           self.kv_up.weight),
                               self.qk_nope_dim, self.v_dim, positions[-1:] + 1,
                               self.q_head_dim ** -0.5, num_splits=self._static_splits(kv["c_kv"]))
            return self.wo(out.reshape(B, T, -1))
        kv = layer_cache(kv_cache, cache_key, self.max_seq_len, H).append(c_kv=c_kv, k_rope=k_rope)
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

    def _forward_modules(self, q_nope, q_rope, kv_raw, k_rope, mask, kv_cache, cache_key
                         ) -> torch.Tensor:
        """``forward`` with ``kv_norm`` and ``kv_up`` called as modules, as open-mythos calls them
        (:func:`must_call`): the latent normalized, cached, and every cached position
        decompressed through ``kv_up``; then attention over K, V."""
        B, T, H = *q_nope.shape[:2], self.n_heads
        c_kv = self.kv_norm(kv_raw[..., :self.kv_lora_rank])                  # [B, T, r]
        if c_kv.dtype != kv_raw.dtype:
            c_kv = c_kv.to(kv_raw.dtype)
        if kv_cache is not None:
            kv = layer_cache(kv_cache, cache_key, self.max_seq_len, H).append(c_kv=c_kv,
                                                                               k_rope=k_rope)
            c_kv, k_rope = kv["c_kv"], kv["k_rope"]
        S = c_kv.shape[1]
        kv = self.kv_up(c_kv).view(B, S, H, self.qk_nope_dim + self.v_dim)
        k_nope, v = kv.split([self.qk_nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, H, self.qk_rope_dim
                                                          ).to(k_nope.dtype)], dim=-1)
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

    def decode_plan(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The CPU decode-plan piece ``x [rows, 1, D] -> forward(x)`` (packed where ``forward``
        packs)."""
        swiglu = _SwiGLU([self], rows)
        return lambda x: swiglu.add_to(None, x)

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
        self._register_load_state_dict_pre_hook(moe_load_hook, with_module=True)
        self._last_idx: Optional[torch.Tensor] = None  # [N, k] experts chosen, last forward

    @property
    def routed_experts(self) -> "RoutedExperts":
        """open-mythos's ``routed_experts``: a read-only sequence of :class:`ExpertView` modules
        over slices of ``w13`` / ``w2`` (views, not parameters of their own)."""
        return RoutedExperts(self)

    @property
    def last_counts(self) -> Optional[torch.Tensor]:
        """Tokens routed to each expert in the last forward (int64 [E]), for load balancing."""
        if self._last_idx is None:
            return None
        return K.expert_counts(self._last_idx, self.n_experts)

    def decode_plan(self, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The CPU decode-plan piece ``x [rows, 1, D] -> forward(x)``: routing, the routed
        experts' CPU form for ``rows`` tokens, the shared experts; records ``last_counts``."""
        return _MoE(self, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = self.router(flat)                                            # [N, E] unbiased
        weights, idx = K.moe_route(logits, self.router_bias, self.topk)       # [N, k] each
        self._last_idx = idx.detach()
        xe, w13, w2 = flat, self.w13, self.w2
        if torch.is_autocast_enabled(flat.device.type):
            # autocast runs open-mythos's expert nn.Linear layers in its low-precision dtype; the
            # grouped GEMMs take the same (else fp32 activations of the recurrent state would keep
            # the kernels in fp32)
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


class _WeightView(nn.Module):
    """A bias-free linear layer whose ``weight`` [out, in] is a view of a stacked MoE weight,
    taken on each access (so it follows ``load_state_dict``, ``.to`` and autograd)."""

    def __init__(self, moe: "MoEFFN", e: int, part: str):
        super().__init__()
        self.__dict__["_moe"] = moe          # not a submodule: no parameter is registered twice
        self.e, self.part = e, part
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        moe, e = self._moe, self.e
        F_ = moe.w2.shape[1]
        if self.part == "gate":
            return moe.w13[e, :, :F_].t()
        if self.part == "up":
            return moe.w13[e, :, F_:].t()
        return moe.w2[e].t()

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class ExpertView(nn.Module):
    """Routed expert ``e`` of a :class:`MoEFFN` as open-mythos's ``Expert``: ``gate``, ``up`` and
    ``down`` whose weights view ``w13[e]`` (gate | up) and ``w2[e]``;
    ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, moe: "MoEFFN", e: int):
        super().__init__()
        self.gate = _WeightView(moe, e, "gate")
        self.up = _WeightView(moe, e, "up")
        self.down = _WeightView(moe, e, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RoutedExperts(Sequence):
    """``MoEFFN.routed_experts``: a read-only sequence of :class:`ExpertView` (indexing, slicing,
    iterating, ``len``), made on access; the weights stay stacked in ``w13`` / ``w2``."""

    def __init__(self, moe: "MoEFFN"):
        self._moe = moe

    def __len__(self) -> int:
        return self._moe.n_experts

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"routed_experts index must be an int or a slice, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"routed_experts index {i} out of range for {n} experts")
        return ExpertView(self._moe, i % n)

    def __repr__(self) -> str:
        return f"RoutedExperts({len(self)} x {self[0]!r})" if len(self) else "RoutedExperts()"


class LoRAAdapter(nn.Module):
    """Depth-wise LoRA: ``delta(x, t) = (down(x) * scale[min(t, max_loops-1)]) @ B``."""

    def __init__(self, dim: int, rank: int, max_loops: int):
        super().__init__()
        self.down = Linear(dim, rank, bias=False)
        self.B = nn.Parameter(torch.randn(rank, dim) * 0.02)
        self.scale = nn.Embedding(max_loops, rank)

    def forward(self, x: torch.Tensor, loop_t: int) -> torch.Tensor:
        t_idx = min(loop_t, self.scale.num_embeddings - 1)
        if must_call(self.scale, nn.Embedding):     # open-mythos looks the scale up by a call
            s = self.scale(torch.tensor(t_idx, device=x.device))
        else:
            s = self.scale.weight[t_idx]
        return (self.down(x) * s) @ self.B


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``+ ffn(norm(x))`` (MoE when use_moe)."""

    def __init__(self, cfg: MythosConfig, use_moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
        self.ffn = MoEFFN(cfg) if use_moe else Expert(cfg.dim, cfg.dim * 4 // 3)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def decode_plan(self, rows: int) -> Callable:
        """The CPU decode-plan piece ``(x [rows, 1, D], freqs, layer cache) -> out``: ``forward``
        in eval (no residual dropout) for one token per row appended to the cache."""
        return _Block(self, rows)

    def forward(self, x, freqs_cis, mask=None, kv_cache=None, cache_key="default", positions=None):
        drop = self.resid_drop
        # eval: identity, the call skipped (unless it must be called: a hook on it)
        drop = drop if (drop.training and drop.p > 0) or must_call(drop, nn.Dropout) else None
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

    def calls_modules(self) -> bool:
        """Whether one of the modules the fused step reads only the weights of must be called
        (:func:`must_call`: the loop norm, the injection, the halting head); then each loop runs
        :meth:`loop_input_modules` and :meth:`step_modules`."""
        return any(must_call(m, c) for m, c in ((self.norm, RMSNorm), (self.injection, LTIInjection),
                                                (self.act, ACTHalting), (self.act.halt, Linear)))

    def loop_input_modules(self, h: torch.Tensor, e: torch.Tensor, t: int) -> torch.Tensor:
        """Loop t's input as open-mythos computes it: ``norm(loop_index_embedding(h, t) + e)``."""
        return self.norm(loop_index_embedding(h, t, self.loop_dim) + e)

    def step_modules(self, h, e, out, h_out, cum_p, t: int):
        """Loop t after the block, each module called as in open-mythos (LoRA, injection, ACT):
        ``(h', h_out', cum_p', None)`` (the next loop makes its input when it runs, as
        open-mythos does: :meth:`loop_input_modules`); the ACT sums as :meth:`forward`'s."""
        out = out + self.lora(out, t)
        h = self.injection(h, e, out)
        h_out, cum_p = act_accumulate_reference(h, self.act(h), h_out, cum_p,
                                                self.cfg.act_threshold)
        return h, h_out, cum_p, None

    def forward(self, h, e, freqs_cis, mask=None, n_loops=None, kv_cache=None, positions=None):
        n_loops = n_loops or self.cfg.max_loop_iters
        modules = self.calls_modules()
        B, T, D = h.shape
        thr = self.cfg.act_threshold
        acc = K.acc_dtype(h.dtype)                 # ACT state: fp32 (fp64 for an fp64 model)
        cum_p = torch.zeros(B, T, device=h.device, dtype=acc)
        h_out = torch.zeros(B, T, D, device=h.device, dtype=acc)
        inj, halt, norm = self.injection, self.act.halt, self.norm
        x = None if modules else K.loop_input(h, e, 0, norm.weight, norm.eps, self.loop_dim)
        halted = self.halt_reducer or K.HaltCheck(h.device, lag=self.halt_lag)  # lag 0 by default
        for t in range(n_loops):
            if modules:                    # hooked, patched or replaced: open-mythos's calls
                x = self.loop_input_modules(h, e, t)
            out = self.block(x, freqs_cis, mask, kv_cache, f"recurrent_loop_{t}", positions)
            last = t + 1 == n_loops
            if modules:
                h, h_out, cum_p, x = self.step_modules(h, e, out, h_out, cum_p, t)
            else:
                delta = self.lora(out, t)  # the step kernel adds it (rounded as out + delta)
                if delta.dtype != out.dtype:   # autocast: a low-precision delta, promoted as
                    out, delta = out + delta, None                # in open-mythos's out + lora
                nxt = None if last else (t + 1, norm.weight, norm.eps, self.loop_dim)
                # h' = A h + B e + out + delta, ACT accumulation, the next loop's normed input
                res = K.lti_act_step(h, e, out, h_out, cum_p, inj.log_A, inj.log_dt, inj.B,
                                     halt.weight, halt.bias, thr, next_loop=nxt, delta=delta)
                h, h_out, cum_p = res[:3]
                x = None if last else res[3]
            if kv_cache is None and not last and halted(cum_p, thr):
                break
        return h_out.to(h.dtype)


# ----------------------------------------------------------------------------------------------
# The modules' CPU decode-plan pieces (fp32 CPU tensors, no autograd: ``mythos.decode``)
# ----------------------------------------------------------------------------------------------

def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, a], w [H, a, b] -> [B, T, H, b] with ``out[:, :, h] = x[:, :, h] @ w[h]`` (the
    product ``mla_decode``'s reference absorbs with)."""
    B, T, H, a = x.shape
    y = torch.bmm(x.permute(2, 0, 1, 3).reshape(H, B * T, a), w)             # [H, B*T, b]
    return y.view(H, B, T, -1).permute(1, 2, 0, 3)


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
        # moe_experts_cpu's branch for rows x topk pairs, chosen now
        self.experts = moe_experts_few_pairs if rows * moe.topk <= FEW_PAIRS else moe_experts_cpu
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
        self.q_norm, self.kv_norm = a.q_norm.decode_plan(), a.kv_norm.decode_plan()
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
        self.attn_norm, self.ffn_norm = block.attn_norm.decode_plan(), block.ffn_norm.decode_plan()
        self.attn = block.attn.decode_plan(rows)
        self.ffn = block.ffn.decode_plan(rows)

    def __call__(self, x: torch.Tensor, freqs: torch.Tensor, lc) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), freqs, lc)
        return x + self.ffn(self.ffn_norm(x))


# the forwards of the modules whose weights fused kernels read (:func:`must_call`), as defined
_STOCK_FORWARDS: dict[type, Callable] = {c: c.forward for c in (
    RMSNorm, Linear, LTIInjection, ACTHalting, nn.Linear, nn.Embedding, nn.Dropout)}
