"""The recurrent step around the shared block: loop-index signal + RMSNorm on the way in, and the
LTI-stable update + ACT halting on the way out.

Per loop iteration t (open-mythos 0.5.0 ``RecurrentBlock.forward``)::

    x_t    = RMSNorm(h + loop_emb(t) + e)                                   # loop_input
    out    = Block(x_t) + LoRA(Block(x_t), t)                               # outside this file
    A      = exp(-exp(clamp(log_dt + log_A, -20, 20)))                       # 0 < A < 1
    h'     = A * h + B * e + out
    p      = sigmoid(h' . w_halt + b_halt)                                   # [B, T]
    run    = cum_p < threshold                                               # not yet halted
    w      = where(cum_p + p >= threshold, clamp(1 - cum_p, min=0), p) * run
    h_out += w * h'
    cum_p += p * run

``halted`` of open-mythos is ``cum_p >= threshold``: cum_p never decreases, so the running OR of
that test equals the test on the current cum_p, and only cum_p needs carrying. ACT state (cum_p,
h_out) is fp32 whatever the activation dtype.
"""

from __future__ import annotations

import torch

from ._dispatch import choose

_EMB_CACHE: dict = {}


def loop_index_embedding(h: torch.Tensor, loop_t: int, loop_dim: int,
                         theta: float = 10000.0) -> torch.Tensor:
    """Add a sinusoidal loop-index signal to the first ``loop_dim`` channels of h (open-mythos)."""
    return h + loop_embedding_vector(loop_t, loop_dim, h.shape[-1], h.dtype, h.device, theta)


def loop_embedding_vector(loop_t: int, loop_dim: int, dim: int, dtype: torch.dtype,
                          device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    """The [dim] vector that :func:`loop_index_embedding` adds, computed in ``dtype`` exactly as
    open-mythos does (so bf16 rounding matches too); cached per (t, dim, dtype, device)."""
    key = (loop_t, loop_dim, dim, dtype, str(device), theta)
    emb = _EMB_CACHE.get(key)
    if emb is None:
        freqs = 1.0 / (theta ** (torch.arange(0, loop_dim, 2, device=device, dtype=dtype) / loop_dim))
        angles = loop_t * freqs
        emb_v = torch.cat([angles.sin(), angles.cos()], dim=-1)[:loop_dim]
        emb = torch.zeros(dim, device=device, dtype=dtype)
        emb[:loop_dim] = emb_v
        if len(_EMB_CACHE) > 4096:
            _EMB_CACHE.clear()
        _EMB_CACHE[key] = emb
    return emb


def get_A(log_A: torch.Tensor, log_dt: torch.Tensor) -> torch.Tensor:
    """Discretized diagonal state matrix, exactly open-mythos's ``LTIInjection.get_A``."""
    return torch.exp(-torch.exp((log_dt + log_A).clamp(-20, 20)))


def loop_input_reference(h: torch.Tensor, e: torch.Tensor, loop_t: int, norm_weight: torch.Tensor,
                         eps: float, loop_dim: int) -> torch.Tensor:
    """RMSNorm(loop_index_embedding(h, t) + e). h, e: [B, T, D] -> [B, T, D]."""
    x = loop_index_embedding(h, loop_t, loop_dim) + e
    rms = x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
    return x * rms * norm_weight


def lti_act_step_reference(h: torch.Tensor, e: torch.Tensor, out: torch.Tensor,
                           h_out: torch.Tensor, cum_p: torch.Tensor, log_A: torch.Tensor,
                           log_dt: torch.Tensor, B: torch.Tensor, w_halt: torch.Tensor,
                           b_halt: torch.Tensor, threshold: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LTI update + ACT accumulation (formula in the module docstring).

    Args:
        h, e, out: [B, T, D] hidden state, injected input, block output (LoRA delta included).
        h_out:     [B, T, D] fp32 ACT-weighted output accumulated so far.
        cum_p:     [B, T] fp32 cumulative halting probability.
        log_A [D], log_dt [1], B [D]: LTI parameters; w_halt [1, D] or [D], b_halt [1]: halting head.
        threshold: ACT threshold.

    Returns:
        (h' [B, T, D] in h's dtype, h_out' fp32, cum_p' fp32)
    """
    A = get_A(log_A, log_dt)
    h_new = A * h + B * e + out
    p = torch.sigmoid(torch.nn.functional.linear(h_new, w_halt.reshape(1, -1), b_halt)).squeeze(-1)
    still = (cum_p < threshold).float()
    remainder = (1.0 - cum_p).clamp(min=0)
    weight = torch.where(cum_p + p >= threshold, remainder, p) * still
    h_out = h_out + weight.unsqueeze(-1) * h_new
    cum_p = cum_p + p * still
    return h_new, h_out, cum_p


def loop_input(h: torch.Tensor, e: torch.Tensor, loop_t: int, norm_weight: torch.Tensor,
               eps: float, loop_dim: int) -> torch.Tensor:
    """Dispatching entry point for :func:`loop_input_reference`."""
    choose("loop_input", h, e, has_kernel=False)
    return loop_input_reference(h, e, loop_t, norm_weight, eps, loop_dim)


def lti_act_step(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold):
    """Dispatching entry point for :func:`lti_act_step_reference` (same arguments and returns)."""
    choose("lti_act_step", h, e, out, has_kernel=False)
    return lti_act_step_reference(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt,
                                  threshold)
