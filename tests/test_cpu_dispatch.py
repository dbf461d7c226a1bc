"""The CPU inference predicate and the CPU forms' standing aside under autocast."""

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



def test_cpu_inference_predicate():
    from mythos_kernels._dispatch import cpu_inference
    a, w = _rand(2, 3), _rand(3, 3).requires_grad_()
    assert cpu_inference(a) and cpu_inference()
    assert not cpu_inference(a, w)                    # autograd through w
    with torch.no_grad():
        assert cpu_inference(a, w)                    # no autograd in no_grad mode
    assert not cpu_inference(a, torch.empty(3, device="meta"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_inference(a)                   # CPU autocast: the general path


def test_cpu_autocast_inference_takes_the_general_path():
    """Under CPU autocast the CPU forms stand aside and the general path's ops take autocast's
    casts. Before, fp32 inputs under autocast reached the CPU forms, which computed in fp32
    unlike autocast's ops (and at the mid config the sorted MoE form's out= product raised on a
    cast input: a forward under autocast failed before c5f9881 cast the experts' inputs)."""
    N, k, E, D, Fh = 41, 3, 64, 24, 10
    x = _rand(N, D)
    w13, w2 = _rand(E, D, 2 * Fh, scale=0.2), _rand(E, Fh, D, scale=0.2)
    idx = torch.stack([torch.ones(N, dtype=torch.long), torch.zeros(N, dtype=torch.long),
                       torch.randint(2, E, (N,))], 1)                   # skewed: sorted form
    weights = torch.softmax(torch.randn(N, k), -1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = K.moe_experts(x, weights, idx, w13, w2)
        ref = K.moe_experts_reference(x, weights, idx, w13, w2)
        head_w = _rand(5000, 64)
        h = _rand(3, 64)
        logits = K.lm_head(h, head_w)
    assert torch.equal(out, ref)
    assert logits.dtype == torch.bfloat16                 # as autocast's F.linear gives
    ref_logits = h @ head_w.t()
    assert float((logits.float() - ref_logits).norm() / ref_logits.norm()) <= 1e-2


@pytest.mark.parametrize("name, env", [("onednn", "MYTHOS_CPU_ONEDNN"),
                                       ("weight_copies", "MYTHOS_CPU_WEIGHT_COPIES")])
def test_env_switch_sets_the_variant_default(monkeypatch, name, env):
    """A variant with an environment switch: the variable (read on each use) sets its default,
    shown by ``cpu_variants``; ``set_cpu_variant`` overrides it, ``None`` goes back to it."""
    def shown():
        return {n: on for n, _, on, _ in K.cpu_variants()}[name]

    monkeypatch.delenv(env, raising=False)
    assert shown() is True
    monkeypatch.setenv(env, "0")
    assert shown() is False and K._dispatch.cpu_enabled(name) is False
    K.set_cpu_variant(name, True)
    assert shown() is True
    with K.cpu_variant(name, False):
        assert shown() is False
    assert shown() is True
    K.set_cpu_variant(name, None)
    assert shown() is False
    monkeypatch.setenv(env, "on")
    assert shown() is True
