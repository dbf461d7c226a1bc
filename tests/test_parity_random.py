"""Parity with open-mythos 0.5.0 over randomly drawn configurations (hypothesis): logits,
cached decode and sampled generation with the same seed."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_pair

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.parity


@st.composite
def configs(draw):
    attn = draw(st.sampled_from(["gqa", "mla"]))
    n_heads = draw(st.integers(1, 6))
    kw = dict(attn_type=attn, n_heads=n_heads, vocab_size=draw(st.integers(5, 120)),
              max_seq_len=48, max_loop_iters=draw(st.integers(1, 4)),
              prelude_layers=draw(st.integers(0, 2)), coda_layers=draw(st.integers(0, 2)),
              n_experts=draw(st.integers(1, 9)), n_shared_experts=draw(st.integers(0, 2)),
              expert_dim=draw(st.integers(1, 20)), lora_rank=draw(st.integers(1, 5)),
              act_threshold=draw(st.sampled_from([0.3, 0.99, 1.7, 1e4])), rope_theta=10000.0)
    kw["n_experts_per_tok"] = draw(st.integers(1, kw["n_experts"]))
    if attn == "gqa":
        head_dim = 2 * draw(st.integers(1, 6))
        kw["dim"] = n_heads * head_dim
        kw["n_kv_heads"] = draw(st.sampled_from([d for d in range(1, n_heads + 1)
                                                 if n_heads % d == 0]))
    else:
        # odd kv_lora_rank: open-mythos's RoPE fails on the odd-offset key slice when
        # B*T*n_heads == 1 (README, documented differences); mythos handles it (test below)
        kw.update(dim=draw(st.integers(8, 48)), kv_lora_rank=2 * draw(st.integers(1, 12)),
                  q_lora_rank=draw(st.integers(1, 24)),
                  qk_rope_head_dim=2 * draw(st.integers(1, 4)),
                  qk_nope_head_dim=draw(st.integers(1, 12)), v_head_dim=draw(st.integers(1, 12)))
    return kw


def _check(om, kw, B, T, seed, backend):
    import mythos

    a, b = make_pair(om, seed=seed, **kw)
    with mythos.use_backend(backend):
        _compare(a, b, kw, B, T, seed)


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=configs(), B=st.integers(1, 3), T=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_configs_match(om, kw, B, T, seed):
    _check(om, kw, B, T, seed, "reference")


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("mythos_kernels").interpreter_active()),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=configs(), B=st.integers(1, 3), T=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_random_configs_match_triton(om, kw, B, T, seed):
    """The same with every Triton kernel forced (through the interpreter on CPU)."""
    import mythos

    mythos.reset_dispatch_counts()
    _check(om, kw, B, T, seed, "triton")
    served = {op for (op, impl), n in mythos.dispatch_counts().items() if impl == "triton" and n}
    assert {"lti_act_step", "moe_route", "moe_experts", "mla_decompress"} & served


def _compare(a, b, kw, B, T, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, kw["vocab_size"], (B, T + 2), generator=g, device="cpu").to(
        a.embed.weight.device)
    n_loops = kw["max_loop_iters"] + 1
    with torch.no_grad():
        assert_close("logits", a(ids, n_loops=n_loops), b(ids, n_loops=n_loops), 1e-5)
        ca, cb = {}, {}
        assert_close("prefill", a(ids[:, :T], kv_cache=ca), b(ids[:, :T], kv_cache=cb), 1e-5)
        for i in (T, T + 1):
            assert_close("decode", a(ids[:, i:i + 1], kv_cache=ca, start_pos=i),
                         b(ids[:, i:i + 1], kv_cache=cb, start_pos=i), 1e-5)
    torch.manual_seed(seed)
    ga = a.generate(ids[:, :T], max_new_tokens=4, n_loops=2, top_k=3)
    torch.manual_seed(seed)
    gb = b.generate(ids[:, :T], max_new_tokens=4, n_loops=2, top_k=3)
    assert torch.equal(ga, gb)


def test_odd_latent_rank_single_token():
    """kv_lora_rank odd with B = T = n_heads = 1: open-mythos raises inside its RoPE (the rope key
    slice starts at an odd offset); mythos runs and matches a run with a larger batch."""
    from conftest import tiny_kwargs

    import mythos

    kw = tiny_kwargs("mla", n_heads=1, kv_lora_rank=5)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    ids = torch.randint(0, kw["vocab_size"], (2, 1))
    with torch.no_grad():
        one = m(ids[:1])
        two = m(ids)
    assert_close("B=1 vs row 0 of B=2", two[:1], one, 1e-6)


@st.composite
def mid_configs(draw):
    """Configs large enough that the CPU inference forms' size floors are crossed (oneDNN and
    the split products above 2^14-2^17-element weights, the sorted MoE above 32 pairs), so the
    forms the mid-config benchmark uses are what is checked, with their real floors."""
    attn = draw(st.sampled_from(["gqa", "mla"]))
    n_heads = draw(st.sampled_from([2, 4, 8]))
    dim = draw(st.sampled_from([256, 384, 512, 640]))
    kw = dict(attn_type=attn, n_heads=n_heads, dim=dim, vocab_size=draw(st.integers(500, 3000)),
              max_seq_len=160, max_loop_iters=draw(st.integers(1, 3)),
              prelude_layers=draw(st.integers(0, 1)), coda_layers=draw(st.integers(0, 1)),
              n_experts=draw(st.integers(2, 40)), n_shared_experts=draw(st.integers(0, 2)),
              expert_dim=draw(st.sampled_from([64, 100, 128, 256])),
              lora_rank=draw(st.integers(1, 16)),
              act_threshold=draw(st.sampled_from([0.99, 1e4])), rope_theta=10000.0)
    kw["n_experts_per_tok"] = draw(st.integers(1, min(kw["n_experts"], 6)))
    if attn == "gqa":
        kw["n_kv_heads"] = draw(st.sampled_from([d for d in (1, 2, 4, 8) if n_heads % d == 0]))
    else:
        kw.update(kv_lora_rank=draw(st.sampled_from([64, 128, 200])),
                  q_lora_rank=draw(st.sampled_from([96, 256])),
                  qk_rope_head_dim=2 * draw(st.integers(4, 16)),
                  qk_nope_head_dim=draw(st.integers(8, 48)), v_head_dim=draw(st.integers(8, 80)))
    return kw


@pytest.mark.slow
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=mid_configs(), B=st.integers(1, 2), T=st.sampled_from([1, 9, 40, 130]),
       seed=st.integers(0, 2**16))
def test_mid_size_random_configs_match(om, kw, B, T, seed):
    """Parity at mid sizes with the CPU forms' real size floors (the small configs above stay
    below every floor). Weights perturbed by 0.02 rather than 0.1: at these sizes the larger
    perturbation makes the model ill-conditioned enough that open-mythos's own fp32 logits are
    up to 8e-5 from fp64 (measured), so no fp32 implementation could be held to 1e-5."""
    import mythos

    a, b = make_pair(om, seed=seed, perturb=0.02, **kw)
    with mythos.use_backend("reference"):
        _compare(a, b, kw, B, T, seed)
