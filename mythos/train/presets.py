"""Model configurations for training: small presets, the variants of :mod:`mythos.variants`, or a
JSON file of :class:`~mythos.MythosConfig` fields."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

from mythos import variants
from mythos.config import MythosConfig


def tiny() -> MythosConfig:
    """A byte-vocabulary model that trains at several steps per second on two CPU cores
    (seq-len 64, batch 8, 4 loops)."""
    return MythosConfig(vocab_size=256, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=512,
                        max_loop_iters=8, prelude_layers=1, coda_layers=1, attn_type="gqa",
                        n_experts=8, n_shared_experts=1, n_experts_per_tok=2, expert_dim=64,
                        lora_rank=4, rope_theta=10000.0)


def small() -> MythosConfig:
    """A byte-vocabulary MLA model for a single GPU (about 20M parameters)."""
    return MythosConfig(vocab_size=256, dim=384, n_heads=6, n_kv_heads=2, max_seq_len=1024,
                        max_loop_iters=16, prelude_layers=2, coda_layers=2, attn_type="mla",
                        kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=64, n_experts=16, n_shared_experts=1,
                        n_experts_per_tok=2, expert_dim=384, lora_rank=8, rope_theta=10000.0)


PRESETS: dict[str, Callable[[], MythosConfig]] = {"tiny": tiny, "small": small}
VARIANTS: dict[str, Callable[[], MythosConfig]] = {
    name: getattr(variants, name) for name in dir(variants)
    if name.startswith("mythos_") and callable(getattr(variants, name))}


def config_names() -> list[str]:
    """Every name ``resolve_config`` accepts besides a JSON path."""
    return sorted(PRESETS) + sorted(VARIANTS)


def resolve_config(spec: str) -> MythosConfig:
    """A preset name (``tiny``, ``small``), a variant name (``mythos_1b``, ...) or the path of a
    JSON object of MythosConfig fields (missing fields take MythosConfig's defaults).

    Raises:
        ValueError naming the spec or field when it is none of these or the config is invalid.
    """
    if not isinstance(spec, str):
        raise TypeError(f"config must be a str, got {type(spec).__name__}")
    if spec in PRESETS:
        return PRESETS[spec]()
    if spec in VARIANTS:
        return VARIANTS[spec]()
    if not spec.endswith(".json") and not os.path.exists(spec):
        raise ValueError(f"config {spec!r} is not a preset ({', '.join(sorted(PRESETS))}), a "
                         f"variant ({', '.join(sorted(VARIANTS))}) or an existing JSON file")
    return config_from_json(spec)


def config_from_json(path: str) -> MythosConfig:
    """A MythosConfig from a JSON file of its fields; unknown fields raise ValueError."""
    try:
        with open(path) as f:
            fields = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path!r} is not readable JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"config file {path!r} must hold a JSON object of MythosConfig fields")
    return config_from_dict(fields, f"config file {path!r}")


def config_from_dict(fields: dict, where: str = "config") -> MythosConfig:
    """A MythosConfig from a dict of its fields; unknown fields raise ValueError."""
    known = {f.name for f in dataclasses.fields(MythosConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{where}: unknown MythosConfig field(s) {unknown}")
    try:
        return MythosConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
