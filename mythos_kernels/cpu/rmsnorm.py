"""The CPU training form of RMSNorm (:func:`mythos_kernels.rmsnorm.rms_norm`): one autograd
function with the closed-form backward, where autograd differentiates the formula's five ops
(``pow``, ``mean``, ``add``, ``rsqrt``, two products) one by one.

Forward: bitwise the formula (``x * rsqrt(mean(x^2) + eps) * weight``, the same ops in the same
order). Backward, with ``r = rsqrt(mean(x^2) + eps)``, ``xh = x * r`` and ``gw = g * weight``::

    dx = r * (gw - xh * mean(gw * xh))          dweight = sum over rows of g * xh

(equal to autograd's up to fp32 rounding): fewer passes over x than autograd's op-by-op
backward, and one saved tensor (``xh``) instead of the formula's intermediates.

Variant (for :func:`mythos_kernels.cpu_variant`): ``rmsnorm_autograd``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._dispatch import _compiling, _transformed, register_cpu

_DTYPES = (torch.float32, torch.float64)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()                 # [..., 1]
        xh = x * r
        ctx.save_for_backward(xh, r, weight)
        return xh * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        xh, r, weight = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dx = dw = None
        if need_x:
            gw = g * weight
            dot = (gw * xh).mean(-1, keepdim=True)
            dx = gw.sub_(xh * dot).mul_(r)
        if need_w:
            dw = (g * xh).reshape(-1, xh.shape[-1]).sum(0)
        return dx, dw, None


def _serves_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """CPU fp32/fp64 tensors of one dtype, a 1-D weight matching x's last dim, autograd through
    one of them, eager (not traced, not inside a ``torch.func`` transform)."""
    return (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and x.is_cpu and weight.is_cpu and x.dtype in _DTYPES and weight.dtype == x.dtype
            and weight.dim() == 1 and x.dim() >= 1 and weight.shape[0] == x.shape[-1]
            and not _compiling() and not _transformed())


def rms_norm_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`~mythos_kernels.rmsnorm.rms_norm_reference` with its closed-form backward (CPU
    training); forward values bitwise the formula's. x [..., D], weight [D]."""
    return _RMSNormFn.apply(x, weight, eps)


register_cpu("rms_norm", "rmsnorm_autograd", rms_norm_autograd, serves=_serves_autograd,
             doc="autograd: one function with the closed-form backward (training)")
