"""The absorbed MLA decode's CPU form (per-head bmms) against the decompressed reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import rand as _rand

import mythos_kernels as K

# every test here is of the CPU inference forms: new tensors on the CPU also on a GPU machine
pytestmark = pytest.mark.usefixtures("on_cpu", "no_cpu_size_floors")

L = importlib.import_module("mythos_kernels.cpu.linear")   # the CPU forms (K.dense is the op)
M = importlib.import_module("mythos_kernels.cpu.moe")



@pytest.mark.parametrize("B,T,H", [(1, 1, 8), (3, 1, 5), (2, 4, 3)])
@pytest.mark.parametrize("S", [4, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_cpu_absorption_matches_decompressed(B, T, H, S, dtype):
    MD = importlib.import_module("mythos_kernels.cpu.mla_decode")
    dn, dr, dv, r, cap = 12, 6, 10, 20, 41
    q_nope, q_rope = _rand(B, T, H, dn, dtype=dtype), _rand(B, T, H, dr, dtype=dtype)
    c_kv, k_rope = _rand(B, cap, r, dtype=dtype), _rand(B, cap, dr, dtype=dtype)
    c_kv[:, S:] = float("nan")                       # past the valid length: never read
    k_rope[:, S:] = float("nan")
    w_up = _rand(H * (dn + dv), r, dtype=dtype, scale=0.3)
    scale = (dn + dr) ** -0.5
    with torch.no_grad():
        assert MD._cpu_inference(q_nope, q_rope, c_kv, k_rope, w_up)
        out = K.mla_decode(q_nope, q_rope, c_kv, k_rope, w_up, dn, dv, S, scale)
        ref = K.mla_decode_reference(q_nope, q_rope, c_kv, k_rope, w_up, dn, dv, S, scale)
    assert out.shape == (B, T, H, dv) and out.dtype == dtype and not out.isnan().any()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out, ref.to(dtype), **tol)
