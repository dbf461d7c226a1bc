"""The recurrent step around the shared block (``mythos_kernels/recurrent.py``).

* ``lti_act_step``: LTI update ``h' = A*h + B*e + out`` + ACT halting accumulation.
* ``loop_input``:   ``RMSNorm(h + loop_emb(t) + e)`` on the way into the block.
* ``loop_tail``:    the whole per-iteration tail: ``lti_act_step`` followed by
  the next iteration's ``loop_input``. Eager is open-mythos's op sequence for both; Triton is the
  fused kernel (one pass: the step and the next input, ``lti_act_step(..., next_loop=...)``).

Bytes are what the Triton kernels must move (``lti_act_step_bytes``: each row read or written
once, h_out fp32), so "% of ceiling" is the kernel's share of the copy bandwidth.

Tokens N = B*T are laid out as [1, N, D]. Performance targets: N in {1k, 16k, 64k}
x D in {2048, 4096}, fp32 and bf16, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mythos_kernels as mk

from .harness import OpBench, Provider, compiled_provider, dispatch_provider, register
from .ops_rmsnorm import rmsnorm_eager

# ---------------------------------------------------------------------------------------------
# Bytes / FLOPs for the benchmark (what the kernels must move: each input once, each output once)
# ---------------------------------------------------------------------------------------------

def lti_act_step_bytes(n_tokens: int, D: int, dtype: torch.dtype, fused: bool = True,
                       backward: bool = False, delta: bool = False) -> int:
    """HBM bytes the Triton path moves for one step over ``n_tokens`` rows of width D.

    Forward: read h, e, out (act), h_out (fp32), cum_p; write h' (act), h_out (fp32), cum_p, p
    (+ x_next (act) when fused). Backward: read h, e, h', grad h' (act), grad h_out (fp32),
    cum_p, p, grad cum_p (+ grad x when fused); write grad h, grad e, grad out (act), grad cum_p.
    ``delta``: the LoRA delta is read too (forward only; its gradient is grad out).
    Parameter vectors and column partials are O(D) and not counted.
    """
    a = torch.empty((), dtype=dtype, device="cpu").element_size()
    if not backward:
        per_row = 3 * a + 4 + a + 4 + (a if fused else 0) + (a if delta else 0)
        per_tok = 4 + 4 + 4
    else:
        per_row = 4 * a + 4 + 3 * a + (a if fused else 0)
        per_tok = 4 * 4
    return n_tokens * (D * per_row + per_tok)


def lti_act_step_flops(n_tokens: int, D: int, fused: bool = True, backward: bool = False) -> int:
    """Approximate elementwise FLOPs (the kernels are far below the compute roofline)."""
    per = (4 + 2 + 2 + (6 if fused else 0)) if not backward else (10 + (10 if fused else 0))
    return n_tokens * D * per

THRESHOLD = 0.99
_SHAPES = {
    "tiny": [{"N": 48, "D": 64}],
    "cpu": [{"N": 1024, "D": 512}, {"N": 4096, "D": 2048}],
    "cuda": [{"N": 16384, "D": 2048}, {"N": 16384, "D": 4096}],
    "full": [{"N": n, "D": d} for d in (2048, 4096) for n in (1024, 16384, 65536)],
}


# --------------------------------------------------------------------------- lti_act_step


def _step_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, D = shape["N"], shape["D"]
    f32 = dict(device=device, dtype=torch.float32)
    return {
        "h": torch.randn(1, N, D, device=device, dtype=dtype),
        "e": torch.randn(1, N, D, device=device, dtype=dtype),
        "out": torch.randn(1, N, D, device=device, dtype=dtype),
        "h_out": 0.1 * torch.randn(1, N, D, **f32),
        "cum_p": 1.2 * torch.rand(1, N, **f32),                    # some positions halted
        "log_A": 0.5 * torch.randn(D, **f32),
        "log_dt": torch.zeros(1, **f32),
        "B": 0.1 * torch.ones(D, **f32),
        "w_halt": (0.02 * torch.randn(1, D, **f32)),
        "b_halt": torch.zeros(1, **f32),
        "threshold": THRESHOLD,
    }


def _eager_prepare(inp: dict) -> dict:
    """open-mythos carries a bool ``halted`` and keeps h_out in the activation dtype."""
    inp = dict(inp)
    inp["halted"] = inp["cum_p"].detach() >= inp["threshold"]
    inp["h_out"] = inp["h_out"].to(inp["h"].dtype)
    params = ("log_A", "log_dt", "B", "w_halt", "b_halt")
    for k in params:  # open-mythos parameters live in the model dtype
        inp[k] = inp[k].to(inp["h"].dtype)
    return inp


def lti_act_step_eager(h, e, out, h_out, cum_p, halted, log_A, log_dt, B, w_halt, b_halt,
                       threshold):
    """open-mythos 0.5.0: ``LTIInjection.forward`` + ``ACTHalting`` + one iteration of the ACT
    bookkeeping in ``RecurrentBlock.forward``, op for op."""
    A = torch.exp(-torch.exp((log_dt + log_A).clamp(-20, 20)))
    h = A * h + B * e + out
    p = torch.sigmoid(F.linear(h, w_halt, b_halt)).squeeze(-1)
    still_running = ~halted
    remainder = (1.0 - cum_p).clamp(min=0)
    weight = torch.where(cum_p + p >= threshold, remainder, p)
    weight = weight * still_running.float()
    h_out = h_out + weight.unsqueeze(-1) * h
    cum_p = cum_p + p * still_running.float()
    halted = halted | (cum_p >= threshold)
    return h, h_out, cum_p


def _step_bytes(fused: bool):
    def nb(s: dict, dtype: torch.dtype, mode: str) -> float:
        fwd = lti_act_step_bytes(s["N"], s["D"], dtype, fused=fused)
        bwd = lti_act_step_bytes(s["N"], s["D"], dtype, fused=fused, backward=True)
        return float({"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode])
    return nb


STEP = register(OpBench(
    name="lti_act_step",
    description="LTI injection + ACT halting accumulation, one loop iteration",
    make_inputs=_step_inputs,
    bytes=_step_bytes(fused=False),
    # A*h, B*e, two adds, halting dot (2), weight*h, accumulate  -> ~8 per element
    flops=lambda s: 8.0 * s["N"] * s["D"],
    grad_inputs=("h", "e", "out", "h_out", "cum_p", "log_A", "log_dt", "B", "w_halt", "b_halt"),
    shapes=_SHAPES,
    dtypes_cuda=(torch.float32, torch.bfloat16),
))
STEP.add(Provider("eager", lti_act_step_eager, prepare=_eager_prepare))
STEP.provider("reference")(mk.lti_act_step_reference)
STEP.add(compiled_provider(lti_act_step_eager, prepare=_eager_prepare))
STEP.add(dispatch_provider("lti_act_step", mk.lti_act_step))


# --------------------------------------------------------------------------- loop_input


def _loop_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, D = shape["N"], shape["D"]
    return {
        "h": torch.randn(1, N, D, device=device, dtype=dtype),
        "e": torch.randn(1, N, D, device=device, dtype=dtype),
        "loop_t": 3,
        "norm_weight": (1 + 0.1 * torch.randn(D, device=device)).to(dtype),
        "eps": 1e-6,
        "loop_dim": D // 8,
    }


def loop_input_eager(h, e, loop_t, norm_weight, eps, loop_dim):
    """open-mythos 0.5.0: ``loop_index_embedding`` (rebuilt every call) then ``RMSNorm(h + e)``."""
    theta = 10000.0
    freqs = 1.0 / (theta ** (torch.arange(0, loop_dim, 2, device=h.device, dtype=h.dtype)
                             / loop_dim))
    angles = loop_t * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)[:loop_dim]
    emb_full = torch.zeros(h.shape[-1], device=h.device, dtype=h.dtype)
    emb_full[:loop_dim] = emb
    return rmsnorm_eager(h + emb_full.unsqueeze(0).unsqueeze(0) + e, norm_weight, eps)


LOOP = register(OpBench(
    name="loop_input",
    description="RMSNorm(h + loop_emb(t) + e)",
    make_inputs=_loop_inputs,
    flops=lambda s: 6.0 * s["N"] * s["D"],
    grad_inputs=("h", "e", "norm_weight"),
    shapes=_SHAPES,
    dtypes_cuda=(torch.float32, torch.bfloat16),
))
LOOP.provider("eager")(loop_input_eager)
LOOP.provider("reference")(mk.loop_input_reference)
LOOP.add(compiled_provider(loop_input_eager))
LOOP.add(dispatch_provider("loop_input", mk.loop_input))


# --------------------------------------------------------------------------- loop_tail


def _tail_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    inp = _step_inputs(shape, dtype, device)
    D = shape["D"]
    inp.update(norm_weight=(1 + 0.1 * torch.randn(D, device=device)).to(dtype), loop_t=3,
               eps=1e-6, loop_dim=D // 8)
    return inp


def _tail_eager_prepare(inp: dict) -> dict:
    out = _eager_prepare({k: v for k, v in inp.items()
                          if k not in ("norm_weight", "loop_t", "eps", "loop_dim")})
    out.update(norm_weight=inp["norm_weight"], loop_t=inp["loop_t"], eps=inp["eps"],
               loop_dim=inp["loop_dim"])
    return out


def loop_tail_eager(h, e, out, h_out, cum_p, halted, log_A, log_dt, B, w_halt, b_halt, threshold,
                    norm_weight, loop_t, eps, loop_dim):
    """open-mythos 0.5.0: the end of iteration t (LTI + ACT) and the start of iteration t+1
    (loop-index embedding + RMSNorm of h + e), op for op."""
    h, h_out, cum_p = lti_act_step_eager(h, e, out, h_out, cum_p, halted, log_A, log_dt, B,
                                         w_halt, b_halt, threshold)
    return h, h_out, cum_p, loop_input_eager(h, e, loop_t + 1, norm_weight, eps, loop_dim)


def loop_tail_reference(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold,
                        norm_weight, loop_t, eps, loop_dim):
    return mk.lti_act_step_and_next_input_reference(
        h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold,
        (loop_t + 1, norm_weight, eps, loop_dim))


def loop_tail(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold, norm_weight,
              loop_t, eps, loop_dim):
    """The dispatching entry the model calls each iteration: step + next input in one kernel."""
    return mk.lti_act_step(h, e, out, h_out, cum_p, log_A, log_dt, B, w_halt, b_halt, threshold,
                           next_loop=(loop_t + 1, norm_weight, eps, loop_dim))


TAIL = register(OpBench(
    name="loop_tail",
    description="LTI + ACT step then the next iteration's loop embedding + RMSNorm (fused)",
    make_inputs=_tail_inputs,
    flops=lambda s: 14.0 * s["N"] * s["D"],
    bytes=_step_bytes(fused=True),
    grad_inputs=("h", "e", "out", "h_out", "cum_p", "log_A", "log_dt", "B", "w_halt", "b_halt",
                 "norm_weight"),
    shapes=_SHAPES,
    dtypes_cuda=(torch.float32, torch.bfloat16),
))
TAIL.add(Provider("eager", loop_tail_eager, prepare=_tail_eager_prepare))
TAIL.provider("reference")(loop_tail_reference)
TAIL.add(compiled_provider(loop_tail_eager, prepare=_tail_eager_prepare))
TAIL.add(dispatch_provider("lti_act_step", loop_tail))
