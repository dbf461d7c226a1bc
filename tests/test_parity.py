"""Parity with the real open-mythos 0.5.0 package: logits, cached decode, generate, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_close, gen, make_pair, tiny_kwargs

import mythos

pytestmark = pytest.mark.parity

def _assert_grads_match(a, b, tol: float = 1e-4) -> None:
    """Every non-zero gradient of open-mythos model ``a`` matches mythos model ``b``'s (converted
    to open-mythos's layout) within ``tol``."""
    gb = mythos.to_open_mythos_state_dict({k: p.grad for k, p in b.named_parameters()})
    for k, p in a.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert_close(f"grad {k}", p.grad, gb[k], tol)


CASES = [
    ("gqa", {}),
    ("mla", {}),
    ("gqa", dict(dim=48, n_heads=4, n_kv_heads=4, n_experts=5, n_experts_per_tok=1)),
    ("mla", dict(dim=40, n_heads=5, n_experts=9, n_experts_per_tok=2, qk_rope_head_dim=4,
                 n_shared_experts=0, kv_lora_rank=10, lora_rank=2, max_loop_iters=3)),
    ("mla", dict(prelude_layers=0, coda_layers=2, n_shared_experts=2)),
]


@pytest.mark.parametrize("attn,over", CASES)
@pytest.mark.parametrize("threshold", [0.99, 1e4], ids=["act-exit", "all-loops"])
@pytest.mark.parametrize("loops", ["below", "at", "above"])
def test_logits_match(om, attn, over, threshold, loops, cpu_forms):
    kw = tiny_kwargs(attn, act_threshold=threshold, **over)
    n_loops = {"below": 2, "at": None, "above": kw["max_loop_iters"] + 3}[loops]
    a, b = make_pair(om, seed=hash((attn, loops)) % 1000, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 11))
    with torch.no_grad():
        ref, out = a(ids, n_loops=n_loops), b(ids, n_loops=n_loops)
    assert_close("logits", ref, out, 1e-5)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("threshold", [0.99, 1e4])
def test_prefill_then_decode_with_cache(om, attn, threshold, cpu_forms):
    kw = tiny_kwargs(attn, act_threshold=threshold)
    a, b = make_pair(om, seed=3, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 12))
    ca, cb = {}, {}
    with torch.no_grad():
        assert_close("prefill", a(ids[:, :7], kv_cache=ca), b(ids[:, :7], kv_cache=cb), 1e-5)
        for i in range(7, 12):
            ra = a(ids[:, i:i + 1], kv_cache=ca, start_pos=i)
            rb = b(ids[:, i:i + 1], kv_cache=cb, start_pos=i)
            assert_close(f"decode step {i}", ra, rb, 1e-5)
    assert set(ca) == set(cb)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_generate_top1_identical(om, attn, cpu_forms):
    kw = tiny_kwargs(attn)
    a, b = make_pair(om, seed=5, **kw)
    prompt = torch.randint(0, kw["vocab_size"], (2, 5))
    torch.manual_seed(0)
    ga = a.generate(prompt, max_new_tokens=9, n_loops=3, top_k=1)
    gb = b.generate(prompt, max_new_tokens=9, n_loops=3, top_k=1)
    assert torch.equal(ga, gb)
    assert torch.equal(b.generate(prompt, max_new_tokens=9, n_loops=3, temperature=0), gb)


def test_training_gradients_match(om):
    kw = tiny_kwargs("mla", act_threshold=1e4)
    a, b = make_pair(om, seed=7, **kw)
    a.train(), b.train()
    ids = torch.randint(0, kw["vocab_size"], (2, 9))
    a(ids, n_loops=3).logsumexp(-1).mean().backward()
    b(ids, n_loops=3).logsumexp(-1).mean().backward()
    _assert_grads_match(a, b)


def test_config_fields_and_variants_match(om):
    fa = {f.name: f.default for f in dataclasses.fields(om.MythosConfig)}
    fb = {f.name: f.default for f in dataclasses.fields(mythos.MythosConfig)}
    assert fa == fb
    for name in ["mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b",
                 "mythos_500b", "mythos_1t"]:
        assert dataclasses.asdict(getattr(om, name)()) == \
            dataclasses.asdict(getattr(mythos, name)())


def test_public_names_match(om):
    for name in om.__all__:
        if name in ("load_tokenizer", "get_vocab_size", "MythosTokenizer"):
            continue
        assert hasattr(mythos, name), name


def test_component_functions_match(om):
    x = torch.randn(2, 5, 3, 8)
    f = om.precompute_rope_freqs(8, 16, 10000.0)
    assert torch.equal(f, mythos.precompute_rope_freqs(8, 16, 10000.0))
    assert torch.equal(om.apply_rope(x, f[:5]), mythos.apply_rope(x, f[:5]))
    h = torch.randn(2, 5, 200)
    for t in (0, 3, 17):
        assert torch.equal(om.loop_index_embedding(h, t, 25), mythos.loop_index_embedding(h, t, 25))


def test_documented_difference_chunked_prefill(om):
    """open-mythos's T x T mask fails when a multi-token chunk is appended to a non-empty cache;
    mythos computes the correct causal result (equal to a full forward, see test_cache.py)."""
    kw = tiny_kwargs("mla", act_threshold=1e4)
    a, b = make_pair(om, **kw)
    ids = torch.randint(0, kw["vocab_size"], (1, 9))
    ca, cb = {}, {}
    with torch.no_grad():
        a(ids[:, :5], n_loops=2, kv_cache=ca)
        b(ids[:, :5], n_loops=2, kv_cache=cb)
        with pytest.raises(RuntimeError):
            a(ids[:, 5:], n_loops=2, kv_cache=ca, start_pos=5)
        out = b(ids[:, 5:], n_loops=2, kv_cache=cb, start_pos=5)
        assert_close("chunk vs full", a(ids, n_loops=2, kv_cache={})[:, 5:], out, 1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available()
                         or __import__("mythos_kernels").interpreter_active()),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_training_gradients_match_with_triton_kernels(om, attn):
    """A training step with every Triton kernel forced: each parameter's gradient matches
    open-mythos's (ACT early exit included) and the kernels really served the step."""
    kw = tiny_kwargs(attn, act_threshold=0.99)
    a, b = make_pair(om, seed=11, **kw)
    a.train(), b.train()
    ids = torch.randint(0, kw["vocab_size"], (2, 7))
    a(ids, n_loops=3).logsumexp(-1).mean().backward()
    mythos.reset_dispatch_counts()
    with mythos.use_backend("triton"):
        b(ids, n_loops=3).logsumexp(-1).mean().backward()
    served = {op for (op, impl) in mythos.dispatch_counts() if impl == "triton"}
    assert {"lti_act_step", "loop_input", "moe_route", "moe_experts"} <= served
    if attn == "mla":
        assert "mla_decompress" in served
    _assert_grads_match(a, b)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_residual_dropout_train_vs_eval(om, attn, monkeypatch):
    """With dropout > 0: training mode drops residual branches (two calls differ, the dropout
    module runs), eval skips it and equals open-mythos."""
    kw = tiny_kwargs(attn, dropout=0.3, act_threshold=1e4)
    a, b = make_pair(om, seed=11, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 9))
    calls = []
    real = torch.nn.Dropout.forward
    monkeypatch.setattr(torch.nn.Dropout, "forward",
                        lambda self, x: (calls.append(1), real(self, x))[1])
    with torch.no_grad():
        assert_close("eval logits", a.eval()(ids), b.eval()(ids), 1e-5)
        n_eval = len(calls)
        b.train()
        torch.manual_seed(0)
        y1 = b(ids)
        torch.manual_seed(1)
        y2 = b(ids)
    assert len(calls) > n_eval          # the residual dropout ran in training
    assert not torch.allclose(y1, y2)
    assert torch.isfinite(y1).all()


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("threshold", [0.99, 1e4], ids=["act-exit", "all-loops"])
def test_float64_models_match(om, attn, threshold):
    """Both models in fp64 (``.double()``, as for gradient checks): mythos keeps the ACT state and
    the latent-attention references in fp64 too, so logits, cached decode, sampled tokens and
    gradients agree to fp64 rounding. Both compute RoPE in fp32 (open-mythos's rule); the MLA
    gradient sums each head's RoPE gradient after that fp32 step (open-mythos before), hence
    its looser bound."""
    kw = tiny_kwargs(attn, act_threshold=threshold)
    a, b = make_pair(om, seed=11, **kw)
    a, b = a.double(), b.double()
    ids = torch.randint(0, kw["vocab_size"], (2, 12))
    with torch.no_grad():
        for n_loops in (1, None, kw["max_loop_iters"] + 2):
            assert_close("logits", a(ids, n_loops=n_loops), b(ids, n_loops=n_loops), 1e-12)
        ca, cb = {}, {}
        assert_close("prefill", a(ids[:, :8], kv_cache=ca), b(ids[:, :8], kv_cache=cb), 1e-12)
        for i in range(8, 12):
            assert_close(f"decode {i}", a(ids[:, i:i + 1], kv_cache=ca, start_pos=i),
                         b(ids[:, i:i + 1], kv_cache=cb, start_pos=i), 1e-12)
    torch.manual_seed(0)
    ga = a.generate(ids[:, :5], max_new_tokens=6, n_loops=3, top_k=5)
    torch.manual_seed(0)
    assert torch.equal(ga, b.generate(ids[:, :5], max_new_tokens=6, n_loops=3, top_k=5))
    a.train(), b.train()
    a(ids, n_loops=3).logsumexp(-1).mean().backward()
    b(ids, n_loops=3).logsumexp(-1).mean().backward()
    gb = mythos.to_open_mythos_state_dict({k: p.grad for k, p in b.named_parameters()})
    for k, p in a.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert_close(f"grad {k}", p.grad, gb[k], 1e-12 if attn == "gqa" else 1e-7)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_dtype_casts_keep_rope_complex(attn):
    """``model.to(torch.bfloat16)`` casts complex buffers to the real dtype in torch (open-mythos
    then computes RoPE with cos only); mythos keeps its phasors complex64 through every cast,
    so a half-precision model stays within half-precision error of the fp32 one."""
    import copy
    import warnings

    kw = tiny_kwargs(attn)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    ids = torch.randint(0, kw["vocab_size"], (2, 20))
    with torch.no_grad():
        ref = m(ids)
        for cast in (lambda x: x.to(torch.bfloat16), lambda x: x.to(torch.float16),
                     lambda x: x.bfloat16(), lambda x: x.to(ids.device, torch.float64)):
            with warnings.catch_warnings():
                warnings.simplefilter("error")          # no "discards the imaginary part"
                m2 = cast(copy.deepcopy(m))
            for name in ("freqs_cis", "freqs_cis_mla"):
                assert torch.equal(getattr(m2, name), getattr(m, name)), name
            assert_close("cast model logits", ref.double(), m2(ids).double(), 3e-2)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_inference_mode_cache_continued_outside_it(om, attn, cpu_forms):
    """A cache prefilled under torch.inference_mode() and continued under no_grad (and back):
    open-mythos's torch.cat cache allows it, so mythos's preallocated buffers (and the CPU forms'
    scratch buffers) must be normal tensors. Logits match open-mythos at every step."""
    import mythos_kernels as K

    kw = tiny_kwargs(attn, act_threshold=1e4)
    a, b = make_pair(om, seed=13, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 11))
    K.release_scratch()
    ca, cb = {}, {}
    with torch.inference_mode():
        assert_close("prefill", a(ids[:, :6], kv_cache=ca), b(ids[:, :6], kv_cache=cb), 1e-5)
    for i in range(6, 11):
        with torch.inference_mode() if i % 2 else torch.no_grad():
            ra = a(ids[:, i:i + 1], kv_cache=ca, start_pos=i)
            rb = b(ids[:, i:i + 1], kv_cache=cb, start_pos=i)
        assert_close(f"decode step {i}", ra, rb, 1e-5)
    with torch.no_grad():
        assert_close("forward", a(ids), b(ids), 1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_after_inference_mode(om, backend, monkeypatch):
    """Inference under torch.inference_mode() (forward, generate) fills mythos's module-level
    caches (loop-index embeddings, CPU scratch); a training step afterwards still works and its
    gradients match open-mythos's (an inference tensor in a cache could not be saved for
    backward by the Triton path's autograd Functions)."""
    import importlib

    import mythos_kernels as K

    if backend == "triton" and not (torch.cuda.is_available() or K.interpreter_active()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    monkeypatch.setattr(importlib.import_module("mythos_kernels.recurrent"), "_EMB_CACHE", {})
    K.release_scratch()
    kw = tiny_kwargs("mla", act_threshold=0.99)
    a, b = make_pair(om, seed=17, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 7))
    with torch.inference_mode(), mythos.use_backend(backend):
        b(ids, n_loops=3)
        b.generate(ids[:, :4], max_new_tokens=3, n_loops=3, top_k=1)
    a.train(), b.train()
    a(ids, n_loops=3).logsumexp(-1).mean().backward()
    with mythos.use_backend(backend):
        b(ids, n_loops=3).logsumexp(-1).mean().backward()
    _assert_grads_match(a, b)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_weights_edited_through_data_between_decode_steps(om, attn, cpu_forms):
    """Weights changed through ``.data`` (no version-counter bump: EMA-style ``p.data.mul_``,
    ``p.data.copy_``) between decode steps: the CPU forms' cached copies (the head's transposed
    copy, packed shared-expert / FFN weights) are remade, so logits still match open-mythos
    edited the same way. (Not the MLA ``kv_norm`` weights: mythos caches the normalized latent,
    open-mythos renormalizes its raw cached latent with the current weight at every step; a
    documented difference.)"""
    kw = tiny_kwargs(attn, act_threshold=1e4)
    a, b = make_pair(om, seed=19, **kw)
    ids = torch.randint(0, kw["vocab_size"], (1, 10))
    ca, cb = {}, {}
    with torch.no_grad():
        assert_close("prefill", a(ids[:, :6], kv_cache=ca), b(ids[:, :6], kv_cache=cb), 1e-5)
        for i in range(6, 10):
            g = gen(i)
            for k, p in a.named_parameters():                              # EMA-like update
                if "kv_norm" not in k:
                    p.data.mul_(0.97).add_(torch.randn(p.shape, generator=g) * 0.02)
            new = mythos.from_open_mythos_state_dict(
                {k: v.detach().clone() for k, v in a.state_dict().items()})
            versions = {k: p._version for k, p in b.named_parameters()}
            for k, p in b.named_parameters():
                p.data.copy_(new[k])
            assert all(p._version == versions[k] for k, p in b.named_parameters())
            ra = a(ids[:, i:i + 1], kv_cache=ca, start_pos=i)
            rb = b(ids[:, i:i + 1], kv_cache=cb, start_pos=i)
            assert_close(f"decode step {i} after .data edits", ra, rb, 1e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_autocast_bf16_runs_as_open_mythos_does(om, attn, cpu_forms):
    """Under torch.autocast(bf16) (mixed precision: bf16 products, fp32 weights and residual
    stream) mythos runs where open-mythos runs: forward, cached decode (also with a cache started
    in the other autocast state), generate. Its error against open-mythos's fp32 logits stays
    within 3x open-mythos's own autocast error (+0.005: one bf16 rounding more or less), where
    a real fault (a wrong position, a dropped term) is of order 1."""
    kw = tiny_kwargs(attn, act_threshold=1e4)
    a, b = make_pair(om, seed=23, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 9), generator=gen(1))
    dev = torch.get_default_device().type          # CUDA autocast on a GPU machine
    ac = lambda: torch.autocast(dev, dtype=torch.bfloat16)    # noqa: E731
    with torch.no_grad():
        ref = a(ids)
        with ac():
            ra, rb = a(ids), b(ids)
        assert _rel(rb, ref) <= 3 * _rel(ra, ref) + 5e-3
        for prefill_ac, decode_ac in ((True, True), (False, True), (True, False)):
            ca, cb, c32 = {}, {}, {}
            a(ids[:, :5], kv_cache=c32)
            with ac() if prefill_ac else torch.autocast(dev, enabled=False):
                a(ids[:, :5], kv_cache=ca), b(ids[:, :5], kv_cache=cb)
            for i in range(5, 9):
                r32 = a(ids[:, i:i + 1], kv_cache=c32, start_pos=i)
                with ac() if decode_ac else torch.autocast(dev, enabled=False):
                    ra = a(ids[:, i:i + 1], kv_cache=ca, start_pos=i)
                    rb = b(ids[:, i:i + 1], kv_cache=cb, start_pos=i)
                assert rb.isfinite().all()
                assert _rel(rb, r32) <= 3 * _rel(ra, r32) + 5e-3, (prefill_ac, decode_ac, i)
        with ac():
            out = b.generate(ids[:, :4], max_new_tokens=5, n_loops=3, top_k=1)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids[:, :4])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_autocast_bf16_training_gradients(om, attn, backend):
    """A training step under torch.autocast(bf16), the kernels forced or not, against open-mythos's
    fp32 gradients: the error over all gradients together stays within 1.5x open-mythos's own
    autocast error, and no single parameter's gradient is grossly off (its error at most half
    its norm plus four times open-mythos's error on it). Every loop runs (ACT
    halting is a discrete decision: bf16 rounding can flip it near the threshold, and the Triton
    step computes the halting logit in fp32 where open-mythos's is a bf16 product)."""
    import mythos_kernels as K

    if backend == "triton" and not (torch.cuda.is_available() or K.interpreter_active()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    kw = tiny_kwargs(attn, act_threshold=1e4)
    ids = torch.randint(0, kw["vocab_size"], (2, 7), generator=gen(2))
    ref, _ = make_pair(om, seed=29, **kw)
    a, b = make_pair(om, seed=29, **kw)
    for m in (ref, a, b):
        m.train()
    ref(ids, n_loops=3).logsumexp(-1).mean().backward()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        la = a(ids, n_loops=3).logsumexp(-1).float().mean()
        with mythos.use_backend(backend):
            lb = b(ids, n_loops=3).logsumexp(-1).float().mean()
    la.backward()
    lb.backward()
    gb = mythos.to_open_mythos_state_dict({k: p.grad for k, p in b.named_parameters()})
    ga = dict(a.named_parameters())
    err_a = err_b = norm = 0.0
    for k, p in ref.named_parameters():
        if p.grad is None or p.grad.abs().sum() == 0:
            continue
        err_a += float((ga[k].grad - p.grad).norm()) ** 2
        err_b += float((gb[k] - p.grad).norm()) ** 2
        norm += float(p.grad.norm()) ** 2
        # per parameter: no gross error (a gradient that nearly cancels, e.g. the halting
        # bias's, has a large relative error in both implementations)
        assert float((gb[k] - p.grad).norm()) <= 0.5 * float(p.grad.norm()) + \
            4 * float((ga[k].grad - p.grad).norm()), k
    assert (err_b / norm) ** 0.5 <= 1.5 * (err_a / norm) ** 0.5 + 2e-3


def test_autocast_runs_the_expert_gemms_in_its_dtype(monkeypatch):
    """Under autocast the routed experts' grouped GEMMs take autocast's dtype (as open-mythos's
    expert nn.Linear layers do), not the fp32 of the recurrent state; without autocast, the
    weights' dtype. The fp32 expert weights still get fp32 gradients; the cast weights are made
    once per forward."""
    import mythos_kernels as K

    seen, stacks = [], []
    orig = K.moe_experts

    def spy(x, weights, idx, w13, w2):
        seen.append((x.dtype, w13.dtype, w2.dtype))
        stacks.append(w13)
        return orig(x, weights, idx, w13, w2)

    monkeypatch.setattr(K, "moe_experts", spy)
    kw = tiny_kwargs("mla", act_threshold=1e4)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).train()
    ids = torch.randint(0, kw["vocab_size"], (2, 5), generator=gen(3))
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = m(ids, n_loops=2).float().logsumexp(-1).mean()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    # the cast weights are made once per forward, shared by its loops (prelude/coda: dense FFNs)
    assert len(stacks) == 2 and stacks[0] is stacks[1]
    loss.backward()
    ffn = m.recurrent.block.ffn
    assert ffn.w13.grad.dtype == torch.float32 and torch.isfinite(ffn.w13.grad).all()
    assert ffn.w13.grad.abs().sum() > 0 and ffn.w2.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        m(ids, n_loops=2)                       # the next forward casts again (weights may change)
    assert len(stacks) == 4 and stacks[2] is stacks[3] and stacks[2] is not stacks[0]
    seen.clear()
    with torch.no_grad():
        m(ids, n_loops=2)
    assert seen and all(d == (torch.float32,) * 3 for d in seen), seen


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("mask_kind", ["none", "causal-tensor", "custom", "bool"])
def test_components_take_open_mythos_masks(om, attn, mask_kind, cpu_forms):
    """Blocks called directly, with open-mythos's ``mask`` values: None (no mask: every query
    sees every key), its additive causal [1, 1, T, T] tensor, another additive mask, a bool one.
    The attention, a TransformerBlock and the RecurrentBlock match open-mythos's, with and
    without a cache. (The model itself passes mythos.model.CAUSAL: SDPA's causal path.)"""
    kw = tiny_kwargs(attn, act_threshold=1e4)
    a, b = make_pair(om, seed=31, **kw)
    g = gen(5)
    B, T, D = 2, 7, kw["dim"]
    x = torch.randn(B, T, D, generator=g)
    name = "freqs_cis_mla" if attn == "mla" else "freqs_cis"
    fa, fb = getattr(a, name)[:T], getattr(b, name)[:T]
    if mask_kind == "none":
        ma = mb = None
    elif mask_kind == "causal-tensor":
        ma = mb = a._causal_mask(T, x.device)
    else:
        keep = torch.rand(T, T, generator=g) < 0.6
        keep |= torch.eye(T, dtype=torch.bool)                       # every query sees a key
        add = torch.zeros(1, 1, T, T).masked_fill(~keep, float("-inf"))
        ma, mb = add, (keep if mask_kind == "bool" else add)
    with torch.no_grad():
        pairs = [("attn", a.recurrent.block.attn, b.recurrent.block.attn, (x, fa, ma), (x, fb, mb)),
                 ("block", a.prelude[0], b.prelude[0], (x, fa, ma), (x, fb, mb)),
                 ("recurrent", a.recurrent, b.recurrent, (x, x * 0.5, fa, ma, 3),
                  (x, x * 0.5, fb, mb, 3))]
        for what, ma_, mb_, args_a, args_b in pairs:
            assert_close(f"{what} ({mask_kind})", ma_(*args_a), mb_(*args_b), 1e-5)
        if mask_kind != "bool":                      # open-mythos's attention adds the mask
            ca, cb = {}, {}
            ra = a.prelude[0](x, fa, ma, ca, "p")
            rb = b.prelude[0](x, fb, mb, cb, "p")
            assert_close(f"block with a cache ({mask_kind})", ra, rb, 1e-5)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("no_grad", [False, True])
def test_forward_mode_ad_matches(om, attn, no_grad):
    """torch.func.jvp of the logits along a random direction in weight space: the same tangent
    as open-mythos's (SDPA's fused kernels have no forward-AD formula: mythos's attention takes
    its math backend there), with grad enabled or under no_grad (no inference mode inside)."""
    from torch.func import functional_call, jvp

    kw = tiny_kwargs(attn, act_threshold=1e4)
    a, b = make_pair(om, seed=13, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 6), generator=gen(4))
    pa = {k: v.detach() for k, v in a.named_parameters()}
    ta = {k: torch.randn(v.shape, generator=gen(100 + i)) for i, (k, v) in enumerate(pa.items())}
    pb = {k: v.detach() for k, v in b.named_parameters()}
    tb = mythos.from_open_mythos_state_dict(ta)
    assert set(tb) >= set(pb)
    tb = {k: tb[k] for k in pb}
    with torch.set_grad_enabled(not no_grad):
        _, da = jvp(lambda p: functional_call(a, p, (ids,), {"n_loops": 3}), (pa,), (ta,))
        _, db = jvp(lambda p: functional_call(b, p, (ids,), {"n_loops": 3}), (pb,), (tb,))
    assert_close("logit tangents", da, db, 1e-5)
