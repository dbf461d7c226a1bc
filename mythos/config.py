"""MythosConfig: every field and default of open-mythos 0.5.0's, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from ._validate import check_choice, check_float, check_int


@dataclass
class MythosConfig:
    """Hyperparameters of the recurrent-depth transformer (same fields/defaults as open-mythos).

    Core: vocab_size, dim, n_heads, n_kv_heads (GQA only), max_seq_len, max_loop_iters,
    prelude_layers, coda_layers. Attention: attn_type ("gqa" | "mla"); MLA: kv_lora_rank,
    q_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim. MoE: n_experts,
    n_shared_experts, n_experts_per_tok, expert_dim. Other: act_threshold, rope_theta, lora_rank,
    max_output_tokens, dropout.

    Raises:
        ArgumentTypeError (a TypeError) naming the field for a wrong type, ValueError naming
        the field for a value out of range or an invalid combination (:mod:`mythos._validate`).
    """

    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    max_seq_len: int = 4096
    max_loop_iters: int = 16
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: str = "mla"
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    max_output_tokens: int = 4096
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field by the rule of :mod:`mythos._validate` and normalize it in place
        (numpy / tensor integers to int, numbers to float): ArgumentTypeError (a TypeError) for a
        wrong type, ValueError for a bad value or combination, naming the field."""
        check_choice("attn_type", self.attn_type, ("gqa", "mla"))
        positive = ["vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters", "n_experts",
                    "n_experts_per_tok", "expert_dim", "lora_rank", "max_output_tokens"]
        # fields the other attention type never reads stay unchecked, as open-mythos ignores them
        positive += (["n_kv_heads"] if self.attn_type == "gqa" else
                     ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                      "v_head_dim"])
        for name in positive:
            setattr(self, name, check_int(name, getattr(self, name), lo=1))
        for name in ("prelude_layers", "coda_layers", "n_shared_experts"):
            setattr(self, name, check_int(name, getattr(self, name), lo=0))
        # +inf: never halt, every loop runs (open-mythos runs it so)
        self.act_threshold = check_float("act_threshold", self.act_threshold, lo=0, lo_open=True,
                                         inf_ok=True)
        self.rope_theta = check_float("rope_theta", self.rope_theta, lo=0, lo_open=True)
        self.dropout = check_float("dropout", self.dropout, lo=0, hi=1, hi_open=True)
        if self.attn_type == "gqa":
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads "
                                 f"({self.n_heads})")
            if (self.dim // self.n_heads) % 2:
                raise ValueError(f"head_dim = dim // n_heads = {self.dim // self.n_heads} must be "
                                 "even for RoPE")
        elif self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(f"n_experts_per_tok ({self.n_experts_per_tok}) must be <= n_experts "
                             f"({self.n_experts})")


def allocation_terms(cfg: MythosConfig, dtype_bytes: int = 4) -> dict[str, int]:
    """Approximate bytes ``OpenMythos(cfg)`` allocates, per term, keyed by the fields that size
    it: weights of ``dtype_bytes`` each (norms and other vectors left out) and the complex64 RoPE
    tables over ``max_seq_len`` positions. Python ints: exact arithmetic for any size."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attn_type == "gqa":
        hd = D // H
        attn = 2 * D * H * hd + 2 * D * cfg.n_kv_heads * hd
    else:
        r, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
        attn = (D * cfg.q_lora_rank + cfg.q_lora_rank * H * (nope + r)
                + D * (cfg.kv_lora_rank + r) + cfg.kv_lora_rank * H * (nope + cfg.v_head_dim)
                + H * cfg.v_head_dim * D)
    dense = 3 * D * (D * 4 // 3)
    F = cfg.expert_dim
    routed = cfg.n_experts * (D + 3 * D * F)
    shared = cfg.n_shared_experts * 3 * D * F * cfg.n_experts_per_tok
    lora = 2 * D * cfg.lora_rank + cfg.max_loop_iters * cfg.lora_rank
    rope_entries = (D // H) // 2 + cfg.qk_rope_head_dim // 2
    return {
        "vocab_size x dim (embedding)": cfg.vocab_size * D * dtype_bytes,
        "prelude_layers + coda_layers (dense blocks)":
            (cfg.prelude_layers + cfg.coda_layers) * (attn + dense) * dtype_bytes,
        "n_experts x expert_dim (routed experts)": routed * dtype_bytes,
        "n_shared_experts x n_experts_per_tok x expert_dim (shared experts)": shared * dtype_bytes,
        "dim and attention sizes (recurrent block)": (attn + lora) * dtype_bytes,
        "max_seq_len (RoPE tables)": cfg.max_seq_len * rope_entries * 8,
    }


def check_allocation(cfg: MythosConfig, limit_bytes: int | None, dtype_bytes: int = 4,
                     where: str = "its device") -> None:
    """Raise ValueError naming the fields of the largest term if :func:`allocation_terms` add up
    to more than ``limit_bytes`` (None: no limit), before anything is allocated."""
    terms = allocation_terms(cfg, dtype_bytes)
    total = sum(terms.values())
    if limit_bytes is None or total <= limit_bytes:
        return
    big = max(terms, key=terms.get)
    raise ValueError(f"this config needs about {total / 2**30:.4g} GiB for the model, more than "
                     f"the {limit_bytes / 2**30:.4g} GiB of memory of {where}; the largest term, "
                     f"{terms[big] / 2**30:.4g} GiB, is sized by {big}")
