"""Checkpoint compatibility with open-mythos 0.5.0.

open-mythos stores each routed expert as three nn.Linear weights::

    {prefix}routed_experts.{e}.gate.weight  [F, D]
    {prefix}routed_experts.{e}.up.weight    [F, D]
    {prefix}routed_experts.{e}.down.weight  [D, F]

mythos stacks them for grouped GEMMs::

    {prefix}w13 [E, D, 2F] = cat(gate.weight.T, up.weight.T, dim=-1)
    {prefix}w2  [E, F, D]  = down.weight.T

:func:`moe_load_hook` converts on ``load_state_dict`` (strict loading keeps working) and
:func:`to_open_mythos_state_dict` converts back. Every other key is identical; a RoPE phasor
buffer that a dtype cast made real is restored (:func:`rope_load_hook`).
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch

# an open-mythos routed-expert weight key: (prefix, expert index, gate|up|down)
EXPERT_KEY_RE = re.compile(r"^(.*)routed_experts\.(\d+)\.(gate|up|down)\.weight$")


def moe_load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                  unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of MoEFFN: stack open-mythos per-expert weights in place."""
    keys = [k for k in state_dict if k.startswith(prefix + "routed_experts.")]
    if not keys:
        return
    both = [k for k in (prefix + "w13", prefix + "w2") if k in state_dict]
    if both:
        error_msgs.append(f"the state_dict holds {prefix!r}'s routed experts in both layouts "
                          f"(per-expert routed_experts.* and stacked {', '.join(both)}): keep one")
        return
    E = module.n_experts
    found = {int(m.group(2)) for k in keys if (m := EXPERT_KEY_RE.match(k[len(prefix):]))}
    if found and max(found) + 1 != E:
        error_msgs.append(f"open-mythos checkpoint holds {max(found) + 1} routed experts under "
                          f"{prefix!r}, the model's config has n_experts={E}")
        return
    try:
        gate = [state_dict.pop(f"{prefix}routed_experts.{e}.gate.weight") for e in range(E)]
        up = [state_dict.pop(f"{prefix}routed_experts.{e}.up.weight") for e in range(E)]
        down = [state_dict.pop(f"{prefix}routed_experts.{e}.down.weight") for e in range(E)]
    except KeyError as exc:
        error_msgs.append(f"open-mythos checkpoint is missing routed expert weight {exc}")
        return
    state_dict[prefix + "w13"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1
                                           ).transpose(1, 2).contiguous()
    state_dict[prefix + "w2"] = torch.stack(down).transpose(1, 2).contiguous()
    for k in [k for k in state_dict if k.startswith(prefix + "routed_experts.")]:
        unexpected_keys.append(k)
        state_dict.pop(k)


def rope_load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of OpenMythos: a RoPE phasor buffer saved without its imaginary
    part (open-mythos cast with ``model.to(torch.bfloat16)`` before saving; torch then turns the
    complex buffer real) is replaced by the phasors for the model's config: copying it into the
    complex buffer would silently zero the sine half of every rotation."""
    for name in ("freqs_cis", "freqs_cis_mla"):
        t = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor) and not t.is_complex():
            state_dict[prefix + name] = getattr(module, name).detach().clone()


def to_open_mythos_state_dict(state_dict_or_model) -> "OrderedDict[str, torch.Tensor]":
    """A mythos state_dict (or model) in open-mythos 0.5.0's key layout.

    ``open_mythos.OpenMythos(cfg).load_state_dict(to_open_mythos_state_dict(model))`` works
    strictly; tensors are contiguous copies where layouts differ, shared otherwise."""
    sd = state_dict_or_model.state_dict() if hasattr(state_dict_or_model, "state_dict") \
        else state_dict_or_model
    out: OrderedDict = OrderedDict()
    for k, v in sd.items():
        if k.endswith("ffn.w13"):
            prefix = k[: -len("w13")]
            if prefix + "w2" not in sd:
                raise ValueError(f"mythos state_dict has {k} but no {prefix}w2")
            F = v.shape[-1] // 2
            w = v.transpose(1, 2)                                   # [E, 2F, D]
            for e in range(v.shape[0]):
                out[f"{prefix}routed_experts.{e}.gate.weight"] = w[e, :F].contiguous()
                out[f"{prefix}routed_experts.{e}.up.weight"] = w[e, F:].contiguous()
                w2 = sd[prefix + "w2"]
                out[f"{prefix}routed_experts.{e}.down.weight"] = w2[e].t().contiguous()
        elif k.endswith("ffn.w2"):
            continue
        else:
            out[k] = v
    return out


def from_open_mythos_state_dict(state_dict) -> "OrderedDict[str, torch.Tensor]":
    """An open-mythos state_dict in mythos's layout (what the load hook does, as a function)."""
    sd = OrderedDict(state_dict)
    prefixes = sorted({m.group(1) for k in sd if (m := EXPERT_KEY_RE.match(k))})
    for p in prefixes:
        E = 1 + max(int(m.group(2)) for k in sd if (m := EXPERT_KEY_RE.match(k)) and m.group(1) == p)
        missing = [k for e in range(E) for w in ("gate", "up", "down")
                   if (k := f"{p}routed_experts.{e}.{w}.weight") not in sd]
        if missing:
            raise ValueError(f"open-mythos state_dict is missing routed expert weight(s) "
                             f"{', '.join(missing)} ({E} experts under {p!r})")
        g = torch.stack([sd.pop(f"{p}routed_experts.{e}.gate.weight") for e in range(E)])
        u = torch.stack([sd.pop(f"{p}routed_experts.{e}.up.weight") for e in range(E)])
        d = torch.stack([sd.pop(f"{p}routed_experts.{e}.down.weight") for e in range(E)])
        sd[p + "w13"] = torch.cat([g, u], dim=1).transpose(1, 2).contiguous()
        sd[p + "w2"] = d.transpose(1, 2).contiguous()
    return sd
