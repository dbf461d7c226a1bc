"""Multi-latent attention: the decode step (``mythos_kernels/mla_decode.py``) and the prefill /
training latent decompression (``mythos_kernels/mla.py``).

``mla_decompress``: RMSNorm(c_kv) -> kv_up -> per-head K (nope part + the shared RoPE key) and V,
the layout attention wants. ``eager`` is open-mythos's op sequence (its RMSNorm, ``kv_up``, view,
split, the RoPE key expanded to every head and concatenated); ``triton`` the fused kernel
(forward and backward). Bytes: ``mla_decompress_bytes`` (latent + rope key read, K and V written);
FLOPs: the kv_up GEMM. Shapes: the roofline table in ``docs/roofline_mla.md``.

``mla_decode``: one decode token per sequence attends over a cache of S positions and returns the
per-head output before ``wo`` ([B, 1, H, dv]).

* ``eager``: open-mythos 0.5.0's path: its cache holds the raw latent and a RoPE key copied per
  head; every step re-normalizes and re-expands the whole cache through ``kv_up`` and attends
  over the decompressed K and V.
* ``reference``: our absorbed path in plain torch (W_UK folded into the query, W_UV into the
  output, attention over the normalized latent cache).
* ``triton``: the same through the flash-decoding kernel.

Bytes for the "% of ceiling" are the latent cache (``c_kv`` + one rope key) read once plus the
queries and output: the measure (% of HBM bandwidth over the bytes of the latent cache).
Shapes: open-mythos's default MLA dims (r=512, dr=64, H=16, dn=dv=128); B in {1, 64},
S in {512, 4096, 32768}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mythos_kernels as mk

from .harness import OpBench, Provider, compiled_provider, dispatch_provider, register
from .ops_rmsnorm import rmsnorm_eager

# ----------------------------------------------------------------------------------------------
# Bytes / FLOPs for the benchmark harness
# ----------------------------------------------------------------------------------------------

def mla_decompress_bytes(B: int, S: int, r: int, dr: int, H: int, nope_dim: int, v_dim: int,
                         dtype: torch.dtype = torch.bfloat16) -> int:
    """Forward bytes: c and k_rope read, W_up read, K and V written (each once)."""
    e = torch.empty(0, dtype=dtype).element_size()
    return e * (B * S * (r + dr) + H * (nope_dim + v_dim) * r
                + B * S * H * (nope_dim + dr + v_dim))


def mla_decompress_flops(B: int, S: int, r: int, H: int, nope_dim: int, v_dim: int) -> int:
    """Forward FLOPs of the kv_up GEMM (the backward is twice this)."""
    return 2 * B * S * r * H * (nope_dim + v_dim)



def mla_decode_bytes(B: int, S: int, r: int, dr: int, H: int, dtype: torch.dtype = torch.bfloat16,
                     T: int = 1) -> int:
    """Bytes the absorbed decode attention must move: the latent cache prefix read once, the
    queries read and the output written once (weights of the absorption not included)."""
    e = torch.empty(0, dtype=dtype).element_size()
    return e * (B * S * (r + dr) + B * T * H * (2 * r + dr))


def mla_decode_cache_bytes(B: int, S: int, r: int, dr: int,
                           dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the valid latent cache prefix."""
    return torch.empty(0, dtype=dtype).element_size() * B * S * (r + dr)


def mla_decode_flops(B: int, S: int, r: int, dr: int, H: int, T: int = 1) -> int:
    """FLOPs of the latent attention (scores and p @ c)."""
    return 2 * B * T * H * S * (2 * r + dr)

DIMS = {"H": 16, "r": 512, "dr": 64, "dn": 128, "dv": 128}


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, S, H, r, dr, dn, dv = (shape[k] for k in ("B", "S", "H", "r", "dr", "dn", "dv"))
    c = torch.randn(B, S, r, device=device)
    c = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)  # normalized latent
    return {
        "q_nope": torch.randn(B, 1, H, dn, device=device, dtype=dtype),
        "q_rope": torch.randn(B, 1, H, dr, device=device, dtype=dtype),
        "c_kv": c,
        "k_rope": torch.randn(B, S, dr, device=device, dtype=dtype),
        "w_up": (torch.randn(H * (dn + dv), r, device=device) * r ** -0.5).to(dtype),
        "nope_dim": dn, "v_dim": dv, "seq_len": S, "scale": (dn + dr) ** -0.5,
    }


def _eager_prepare(inp: dict) -> dict:
    """open-mythos's cache layout: the latent as written (its norm weight is ones here, so the
    normalized cache stands for it) and the rope key expanded to every head."""
    B, S, dr = inp["k_rope"].shape
    H = inp["q_nope"].shape[2]
    out = dict(inp)
    out["k_rope_heads"] = inp["k_rope"][:, :, None, :].expand(B, S, H, dr).contiguous()
    out["norm_w"] = torch.ones(inp["c_kv"].shape[-1], device=inp["c_kv"].device,
                               dtype=inp["c_kv"].dtype)
    del out["k_rope"]
    return out


def mla_decode_eager(q_nope, q_rope, c_kv, k_rope_heads, w_up, norm_w, nope_dim, v_dim, seq_len,
                     scale):
    """open-mythos 0.5.0 ``MLAttention.forward`` for one decode token, from the cache on."""
    B, S, _ = c_kv.shape
    H = q_nope.shape[2]
    q = torch.cat([q_nope, q_rope], dim=-1)
    c = c_kv * c_kv.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt() * norm_w   # kv_norm
    kv = F.linear(c, w_up).view(B, S, H, nope_dim + v_dim)                      # kv_up
    k = torch.cat([kv[..., :nope_dim], k_rope_heads], dim=-1)
    v = kv[..., nope_dim:]
    attn = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-2, -1)) * scale
    out = torch.matmul(F.softmax(attn, dim=-1), v.transpose(1, 2))
    return out.transpose(1, 2)


def mla_decode_absorbed_reference(q_nope, q_rope, c_kv, k_rope, w_up, nope_dim, v_dim, seq_len,
                                  scale):
    with mk.use_backend("reference"):
        return mk.mla_decode(q_nope, q_rope, c_kv, k_rope, w_up, nope_dim, v_dim, seq_len, scale)


def _shape(B, S):
    return dict(B=B, S=S, **DIMS)


DECODE = register(OpBench(
    name="mla_decode",
    description="MLA decode attention over the latent cache (absorbed) vs open-mythos's "
                "re-expansion of the whole cache",
    make_inputs=_inputs,
    flops=lambda s: float(mla_decode_flops(s["B"], s["S"], s["r"], s["dr"], s["H"])),
    bytes=lambda s, dtype, mode: float(mla_decode_bytes(s["B"], s["S"], s["r"], s["dr"], s["H"],
                                                        dtype)),
    modes=("forward",),
    shapes={
        "tiny": [dict(B=1, S=37, H=3, r=32, dr=8, dn=16, dv=16)],
        "cpu": [_shape(1, 512), _shape(1, 4096)],
        "cuda": [_shape(1, 4096), _shape(64, 4096)],
        "full": [_shape(b, s) for b in (1, 64) for s in (512, 4096, 32768)],
    },
))
DECODE.add(Provider("eager", mla_decode_eager, prepare=_eager_prepare))
DECODE.provider("reference")(mla_decode_absorbed_reference)
DECODE.add(dispatch_provider("mla_decode_attention", mk.mla_decode, name="triton"))


# --------------------------------------------------------------------------- decompression


def _dec_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, S, H, r, dr, dn, dv = (shape[k] for k in ("B", "S", "H", "r", "dr", "dn", "dv"))
    return {
        "c_kv": torch.randn(B, S, r, device=device, dtype=dtype),          # raw latent
        "k_rope": torch.randn(B, S, dr, device=device, dtype=dtype),       # RoPE applied
        "w_up": (torch.randn(H * (dn + dv), r, device=device) * r ** -0.5).to(dtype),
        "norm_weight": (1 + 0.1 * torch.randn(r, device=device)).to(dtype),
        "n_heads": H, "nope_dim": dn, "v_dim": dv,
    }


def mla_decompress_eager(c_kv, k_rope, w_up, norm_weight, n_heads, nope_dim, v_dim):
    """open-mythos 0.5.0 ``MLAttention.forward`` from the latent on: ``kv_norm``, ``kv_up``,
    split into K_nope / V, the RoPE key expanded to every head and concatenated."""
    B, S, _ = c_kv.shape
    kv = F.linear(rmsnorm_eager(c_kv, norm_weight, 1e-6), w_up).view(B, S, n_heads,
                                                                      nope_dim + v_dim)
    k_nope, v = torch.split(kv, [nope_dim, v_dim], dim=-1)
    k_r = k_rope.unsqueeze(2).expand(B, S, n_heads, k_rope.shape[-1])
    return torch.cat([k_nope, k_r], dim=-1), v


def mla_decompress_ref(c_kv, k_rope, w_up, norm_weight, n_heads, nope_dim, v_dim):
    return mk.mla_decompress_reference(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight)


def mla_decompress_entry(c_kv, k_rope, w_up, norm_weight, n_heads, nope_dim, v_dim):
    return mk.mla_decompress(c_kv, k_rope, w_up, n_heads, nope_dim, v_dim, norm_weight)


def _dec_bytes(s: dict, dtype: torch.dtype, mode: str) -> float:
    fwd = mla_decompress_bytes(s["B"], s["S"], s["r"], s["dr"], s["H"], s["dn"], s["dv"], dtype)
    # backward: K/V gradients and the latent re-read, latent/rope/weight gradients written
    return float(fwd if mode == "forward" else (3 * fwd if mode == "full" else 2 * fwd))


DECOMPRESS = register(OpBench(
    name="mla_decompress",
    description="RMSNorm(c_kv) + kv_up latent decompression into per-head K (with the shared "
                "RoPE key) and V",
    make_inputs=_dec_inputs,
    flops=lambda s: float(mla_decompress_flops(s["B"], s["S"], s["r"], s["H"], s["dn"],
                                               s["dv"])),
    bytes=_dec_bytes,
    grad_inputs=("c_kv", "k_rope", "w_up", "norm_weight"),
    modes=("forward", "full"),
    shapes={
        "tiny": [dict(B=1, S=37, H=3, r=32, dr=8, dn=16, dv=16)],
        "cpu": [_shape(1, 512)],
        "cuda": [_shape(1, 4096)],
        "full": [_shape(1, 4096), _shape(8, 4096), _shape(1, 32768)],
    },
))
DECOMPRESS.add(Provider("eager", mla_decompress_eager))
DECOMPRESS.add(Provider("reference", mla_decompress_ref))
DECOMPRESS.add(compiled_provider(mla_decompress_eager))
DECOMPRESS.add(dispatch_provider("mla_decompress", mla_decompress_entry))
