"""MythosConfig: every field and default of open-mythos 0.5.0's, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MythosConfig:
    """Hyperparameters of the recurrent-depth transformer (same fields/defaults as open-mythos).

    Core: vocab_size, dim, n_heads, n_kv_heads (GQA only), max_seq_len, max_loop_iters,
    prelude_layers, coda_layers. Attention: attn_type ("gqa" | "mla"); MLA: kv_lora_rank,
    q_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim. MoE: n_experts,
    n_shared_experts, n_experts_per_tok, expert_dim. Other: act_threshold, rope_theta, lora_rank,
    max_output_tokens, dropout.

    Raises:
        ValueError naming the field on an invalid combination.
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
        """Check the configuration; raise ValueError naming the offending field."""
        positive = ["vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters", "n_experts",
                    "n_experts_per_tok", "expert_dim", "lora_rank", "max_output_tokens"]
        non_negative = ["prelude_layers", "coda_layers", "n_shared_experts"]
        if self.attn_type not in ("gqa", "mla"):
            raise ValueError(f"attn_type must be 'gqa' or 'mla', got {self.attn_type!r}")
        if self.attn_type == "gqa":
            positive.append("n_kv_heads")
        else:
            positive += ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                         "v_head_dim"]
        for name in positive + non_negative:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            if name in positive and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
            if name in non_negative and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
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
        if not (self.act_threshold > 0):  # also rejects NaN
            raise ValueError(f"act_threshold must be > 0, got {self.act_threshold}")
        if not (self.rope_theta > 0):
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
