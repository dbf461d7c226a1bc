"""The dispatch point: backend switch, forced-triton errors, dispatch record."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mythos_kernels as K
from mythos_kernels import _dispatch


def test_reference_backend_records_reference():
    K.reset_dispatch_counts()
    x = torch.randn(3, 5, device="cpu")
    with K.use_backend("reference"):
        assert _dispatch.choose("some_op", x) == "reference"
    assert K.dispatch_counts() == {("some_op", "reference"): 1}
    K.reset_dispatch_counts()
    assert K.dispatch_counts() == {}


def test_auto_uses_reference_for_cpu_tensors():
    with K.use_backend("auto"):
        assert _dispatch.choose("op", torch.randn(2, device="cpu")) == "reference"


def test_op_without_kernel_uses_reference_even_when_forced():
    with K.use_backend("triton"):
        assert _dispatch.choose("op", torch.randn(2, device="cpu"), has_kernel=False) == "reference"


def test_forced_triton_raises_when_kernel_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with K.use_backend("triton"):
        with pytest.raises(K.BackendUnavailable, match="TRITON_INTERPRET"):
            _dispatch.choose("op", torch.randn(2, device="cpu"))
        with pytest.raises(K.BackendUnavailable, match="too large"):
            _dispatch.choose("op", torch.randn(2, device="cpu"), supported="D too large")


def test_forced_triton_runs_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not K.triton_available():
        pytest.skip("triton not installed")
    with K.use_backend("triton"):
        assert _dispatch.choose("op", torch.randn(2, device="cpu")) == "triton"


def test_nested_context_and_set_backend():
    K.set_backend("reference")
    try:
        assert K.get_backend() == "reference"
        with K.use_backend("triton"):
            assert K.get_backend() == "triton"
        assert K.get_backend() == "reference"
    finally:
        K.set_backend(None)


def test_environment_variable_selects_backend():
    code = "import mythos_kernels as K; print(K.get_backend())"
    env = dict(os.environ, MYTHOS_BACKEND="reference", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "reference", out.stderr
    env["MYTHOS_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "MYTHOS_BACKEND must be one of" in out.stderr


def test_model_records_every_op():
    from conftest import tiny_kwargs

    import mythos

    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    K.reset_dispatch_counts()
    with K.use_backend("reference"), torch.no_grad():   # the plain math only, on every op
        m(torch.randint(0, 97, (1, 5)), n_loops=2)
        cache = {}
        m(torch.randint(0, 97, (1, 5)), n_loops=2, kv_cache=cache)
        m(torch.randint(0, 97, (1, 1)), n_loops=2, kv_cache=cache, start_pos=5)
    ops = {op for op, impl in K.dispatch_counts()}
    assert {"loop_input", "lti_act_step", "moe_route", "moe_experts", "attention",
            "mla_decompress", "rms_norm", "rope", "mla_decode_attention"} <= ops
    assert all(impl == "reference" for _, impl in K.dispatch_counts())


def test_moe_expert_counts_of_last_forward():
    from conftest import tiny_kwargs

    import mythos

    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla", n_experts_per_tok=3))).eval()
    ffn = m.recurrent.block.ffn
    assert ffn.last_counts is None
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        m(ids, n_loops=1)
        x = m.recurrent.block.ffn_norm(torch.randn(2, 5, 60, device=ids.device))
        ffn(x)
    counts = ffn.last_counts
    assert counts.shape == (7,) and int(counts.sum()) == 2 * 5 * 3
    ref = torch.bincount(ffn._last_idx.reshape(-1).cpu(), minlength=7)
    assert torch.equal(counts.cpu(), ref)


def _registered_form(name="test_form"):
    """A throwaway CPU form of op ``test_op`` that serves 2-D inputs."""
    _dispatch.register_cpu("test_op", name, lambda x: x * 2, serves=lambda x: x.dim() == 2,
                           doc="test")


def test_cpu_form_chosen_by_auto_and_cpu_and_switched_by_name():
    _registered_form()
    try:
        x2, x1 = torch.randn(2, 3, device="cpu"), torch.randn(3, device="cpu")
        for backend in ("auto", "cpu"):
            with K.use_backend(backend):
                impl, form = _dispatch.pick("test_op", x2, cpu_args=(x2,))
                assert impl == "cpu" and torch.equal(form(x2), x2 * 2)
                assert _dispatch.choose("test_op", x1, cpu_args=(x1,)) == "reference"   # serves not
        with K.use_backend("reference"):
            assert _dispatch.choose("test_op", x2, cpu_args=(x2,)) == "reference"
        assert ("test_form", "test_op", True, "test") in K.cpu_variants()
        with K.cpu_variant("test_form", False):
            assert _dispatch.choose("test_op", x2, cpu_args=(x2,)) == "reference"
        assert _dispatch.choose("test_op", x2, cpu_args=(x2,)) == "cpu"
        K.reset_dispatch_counts()
        _dispatch.choose("test_op", x2, cpu_args=(x2,))
        assert K.dispatch_counts() == {("test_op", "cpu"): 1}
        with pytest.raises(ValueError, match="no CPU variant 'nope'"):
            K.set_cpu_variant("nope", False)
    finally:
        _dispatch._VARIANTS.pop("test_form", None)
        _dispatch._FORMS["test_op"].clear()


def test_forced_cpu_raises_for_other_devices():
    x = torch.empty(2, 3, device="meta")
    with K.use_backend("cpu"), pytest.raises(K.BackendUnavailable, match="MYTHOS_BACKEND=cpu"):
        _dispatch.choose("op", x, cpu_args=(x,))
    with K.use_backend("auto"):
        assert _dispatch.choose("op", x, cpu_args=(x,)) == "reference"


def test_reference_backend_turns_every_cpu_form_off():
    a = torch.randn(2, 3, device="cpu")
    with torch.no_grad():
        assert _dispatch.cpu_inference(a)
        with K.use_backend("reference"):
            assert not _dispatch.cpu_inference(a)
