"""Fused linear + cross-entropy (the tied head's loss): ``F.cross_entropy(x @ W^T, t)``, x [N, D],
W [V, D], t [N] with a few ignored rows.

Providers: ``eager`` (full logits, what open-mythos's training loss does), ``reference`` (the
chunked plain-torch path the CPU runs), ``compile`` (torch.compile of eager), ``triton`` (the
chunked path with the Triton row kernel, CUDA only). On CUDA each row carries ``peak_mem_bytes``
(the eager provider's holds the [N, V] logits and their gradient; the chunked ones one chunk).
The chunked providers compute the gradients inside the forward when a gradient is wanted (Liger's
design), so their ``backward`` rows time only the final scaling: compare ``full`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mythos_kernels as mk
from mythos_kernels.linear_ce import linear_cross_entropy_chunked, linear_cross_entropy_flops

from .harness import OpBench, compiled_provider, dispatch_provider, register


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    N, D, V = shape["N"], shape["D"], shape["V"]
    target = torch.randint(0, V, (N,), device=device)
    target[::17] = -100                                   # a few padded positions
    return {"x": torch.randn(N, D, device=device, dtype=dtype),
            "weight": (torch.randn(V, D, device=device) * D ** -0.5).to(dtype),
            "target": target}


def linear_ce_eager(x, weight, target):
    """The plain loss: logits [N, V] materialized, then ``F.cross_entropy``."""
    return F.cross_entropy(x @ weight.t(), target, ignore_index=-100)


OP = register(OpBench(
    name="linear_ce",
    description="tied head + cross-entropy, logits chunked (Liger's fused linear CE)",
    make_inputs=_inputs,
    flops=lambda s: linear_cross_entropy_flops(s["N"], s["D"], s["V"]),
    grad_inputs=("x", "weight"),
    shapes={
        "tiny": [{"N": 64, "D": 32, "V": 257}],
        # mid config: B=2, T=128 and B=4, T=256
        "cpu": [{"N": 256, "D": 512, "V": 32000}, {"N": 1024, "D": 512, "V": 32000}],
        # mythos_1b: 16k tokens per step
        "cuda": [{"N": 16384, "D": 2048, "V": 32000}],
        "full": [{"N": 4096, "D": 2048, "V": 32000}, {"N": 16384, "D": 2048, "V": 32000},
                 {"N": 8192, "D": 2048, "V": 128256}],
    },
    dtypes_cuda=(torch.bfloat16,),
))
OP.provider("eager")(linear_ce_eager)
OP.provider("reference")(linear_cross_entropy_chunked)
OP.add(compiled_provider(linear_ce_eager))
OP.add(dispatch_provider("linear_cross_entropy", mk.linear_cross_entropy))
