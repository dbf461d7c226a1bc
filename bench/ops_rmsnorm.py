"""RMSNorm: ``y = x * rsqrt(mean(x^2) + eps) * w`` over rows of x [N, D]."""

from __future__ import annotations

import torch

import mythos_kernels as mk

from .harness import OpBench, compiled_provider, dispatch_provider, register


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, D = shape["N"], shape["D"]
    return {"x": torch.randn(N, D, device=device, dtype=dtype),
            "weight": (1 + 0.1 * torch.randn(D, device=device)).to(dtype), "eps": 1e-6}


def rmsnorm_eager(x, weight, eps):
    """open-mythos 0.5.0 ``RMSNorm.forward``."""
    rms = x.pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
    return x * rms * weight


OP = register(OpBench(
    name="rmsnorm",
    description="RMSNorm over the last dim",
    make_inputs=_inputs,
    flops=lambda s: 4.0 * s["N"] * s["D"],          # square, sum, scale, weight
    grad_inputs=("x", "weight"),
    shapes={
        "tiny": [{"N": 64, "D": 128}],
        "cpu": [{"N": 4096, "D": 512}, {"N": 4096, "D": 2048}],
        "cuda": [{"N": 16384, "D": 2048}],
        "full": [{"N": n, "D": d} for d in (2048, 4096) for n in (1024, 16384, 65536)],
    },
    dtypes_cuda=(torch.bfloat16, torch.float32),
))
OP.provider("eager")(rmsnorm_eager)
OP.provider("reference")(mk.rms_norm_reference)
OP.add(compiled_provider(rmsnorm_eager))
OP.add(dispatch_provider("rms_norm", mk.rms_norm))
