"""RMSNorm (Zhang & Sennrich, 2019): ``y = x * rsqrt(mean(x^2, -1) + eps) * weight``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import cpu_enabled, pick, register_cpu

_EXACT_FUSED = (torch.float32, torch.float64)


def _fused_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.rms_norm`` gives open-mythos's exact values: CPU, fp32/fp64, same dtypes, the
    ``rmsnorm`` variant on."""
    return (cpu_enabled("rmsnorm") and x.is_cpu and weight.is_cpu and x.dtype in _EXACT_FUSED
            and weight.dtype == x.dtype and weight.dim() == 1 and x.dim() >= 1 and weight.shape[0] == x.shape[-1])


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm, as open-mythos computes it. x: [..., D], weight: [D].

    On the CPU in fp32/fp64 this is ``F.rms_norm``, which gives bitwise the same values and gradients as
    open-mythos's ``x * x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt() * weight``
    (tests/test_cpu_rmsnorm.py checks it) in one call, so the reference keeps it (and the dispatch
    record says ``reference``). Half types upcast inside ``F.rms_norm`` (not
    open-mythos's rounding) and CUDA may fuse it, so they keep the formula."""
    if _fused_ok(x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    rms = x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
    return x * rms * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. No Triton kernel yet: a registered CPU form (training:
    :mod:`mythos_kernels.cpu.rmsnorm`) or the reference serves."""
    _, form = pick("rms_norm", x, weight, has_kernel=False, cpu_args=(x, weight, eps))
    if form is not None:
        return form(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


register_cpu("rms_norm", "rmsnorm", doc="CPU fp32/fp64: the reference as F.rms_norm, bitwise the formula "
             "(off: the formula)")
