"""torch.compile: the model compiles (graph breaks only at the data-dependent reference MoE
dispatch and the ACT early-exit check) and gives the eager numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, gen, tiny_kwargs

import mythos


def _step_inputs(m, ids, n_loops: int = 2):
    """generate()'s static decode-step inputs after prefilling ``ids`` (call under no_grad):
    the layer caches as a plain dict, the last token, its position tensor."""
    from mythos.cache import MythosCache

    T = ids.shape[1]
    cache = MythosCache(T + 6)
    m.hidden_states(ids, n_loops, cache, 0)
    return dict(cache), ids[:, -1:].clone(), torch.full((1,), T, dtype=torch.long,
                                                        device=ids.device)


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(
        "gqa", prelude_layers=0, coda_layers=0, act_threshold=1e4))).eval()
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad(), mythos.use_backend("reference"):
        ref = m(ids, n_loops=1)
        out = torch.compile(m)(ids, n_loops=1)
    assert_close("compiled logits", ref, out, 1e-5)


def test_rope_traces_without_graph_break():
    """apply_rope compiles as one graph (fullgraph), also for an input at an odd storage offset
    (the eager path reads storage_offset(), which Dynamo cannot trace), with eager's numbers."""
    torch._dynamo.reset()
    g = gen(1)
    base = torch.randn(2 * 3 * 4 * 6 + 1, generator=g)
    x = base[1:].view(2, 3, 4, 6)                           # odd storage offset
    freqs = mythos.precompute_rope_freqs(6, 3, 10000.0)
    ref = mythos.apply_rope(x, freqs)
    out = torch.compile(mythos.apply_rope, backend="eager", fullgraph=True)(x, freqs)
    assert_close("compiled rope", ref, out, 1e-6)


def test_expert_traces_without_graph_break():
    """A (shared-expert sized) SwiGLU Expert under no_grad compiles as one graph on the CPU: the
    packed-weight check must not call Tensor.is_inference() (untraceable) while compiling."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    e = mythos.Expert(64, 300).eval()          # 3 x 19200 elements: above the packing floor
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        ref = e(x)
        out = torch.compile(e, backend="eager", fullgraph=True)(x)
    assert_close("compiled expert", ref, out, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Dynamo cannot trace "
                    "a Triton launch through the CPU interpreter)")
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_static_decode_step_is_one_graph(attn):
    """generate()'s static decode step (the one a CUDA graph captures) traces with fullgraph=True
    on the Triton path: no graph break anywhere in a token's forward, as issue 6 asks of a
    torch.compile-friendly generate; and it gives the eager logits."""
    from mythos.generate import _decode_step

    torch._dynamo.reset()
    kw = tiny_kwargs(attn, act_threshold=0.99)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).cuda().eval()
    ids = torch.randint(0, kw["vocab_size"], (2, 6), device="cuda")
    with torch.no_grad(), mythos.use_backend("triton"):
        layers, tok, pos = _step_inputs(m, ids)
        ref = _decode_step(m, tok, 2, layers, pos)
        out = torch.compile(_decode_step, backend="eager", fullgraph=True)(m, tok, 2, layers, pos)
    assert_close("compiled decode step", ref, out, 1e-5)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_cpu_static_decode_step_is_one_graph(attn):
    """On the CPU, on the references, generate()'s static decode step traces as one graph
    (fullgraph): the MoE takes its traceable gather form for decode-sized batches."""
    from mythos.generate import _decode_step

    torch._dynamo.reset()
    kw = tiny_kwargs(attn, act_threshold=0.99)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    ids = torch.randint(0, kw["vocab_size"], (2, 6))
    with torch.no_grad(), mythos.use_backend("reference"):
        layers, tok, pos = _step_inputs(m, ids)
        ref = _decode_step(m, tok, 2, layers, pos)
        out = torch.compile(_decode_step, backend="eager", fullgraph=True)(m, tok, 2, layers, pos)
    assert_close("compiled decode step", ref, out, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_generate_compiled_matches_eager(attn):
    """generate(compiled=True) (the decode step through inductor) gives the eager tokens, greedy
    and sampled with the same seed, and a second call reuses the compiled step. The GQA model
    has trainable weights, the MLA one frozen weights (as the bench's models, whose compiled
    step test_bench's model suite then shares)."""
    torch.manual_seed(0)
    kw = tiny_kwargs(attn)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval().requires_grad_(attn == "gqa")
    p = torch.randint(0, kw["vocab_size"], (2, 5))
    assert torch.equal(m.generate(p, 7, n_loops=2, top_k=1, compiled=True),
                       m.generate(p, 7, n_loops=2, top_k=1))
    torch.manual_seed(1)
    a = m.generate(p, 7, n_loops=2, top_k=10, compiled=True)
    torch.manual_seed(1)
    assert torch.equal(a, m.generate(p, 7, n_loops=2, top_k=10))


def test_compiled_cache_capacity():
    """generate(compiled=True)'s cache capacity: the next power of two (at least 64), at most
    max_seq_len."""
    from mythos.generate import compiled_cache_capacity as cap

    assert [cap(n, 1000) for n in (1, 17, 64, 65, 127, 128, 129, 511, 513, 999, 1000)] == \
        [64, 64, 64, 128, 128, 128, 256, 512, 1000, 1000, 1000]
    assert cap(17, 40) == 40 and cap(40, 40) == 40


@pytest.mark.slow
def test_generate_compiled_reuses_the_step_across_lengths():
    """Other prompt and max_new_tokens lengths within one capacity bucket reuse the compiled step
    (no new graph; before, every new length compiled again), with the eager tokens."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    kw = tiny_kwargs("mla")
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval().requires_grad_(False)
    graphs = []
    for plen, new in ((5, 7), (9, 4), (3, 20)):
        p = torch.randint(0, kw["vocab_size"], (2, plen))
        out = m.generate(p, new, n_loops=2, top_k=1, compiled=True)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.equal(out, m.generate(p, new, n_loops=2, top_k=1))
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0]


def test_generate_compiled_bad_combinations():
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa"))).eval()
    p = torch.randint(0, 97, (1, 3))
    with pytest.raises(ValueError, match="cuda_graph"):
        m.generate(p, 2, compiled=True, cuda_graph=True)
    with pytest.raises(ValueError, match="static"):
        m.generate(p, 2, compiled=True, static=False)


def _graph_ops(record: list):
    """A torch.compile backend that records each graph's call targets and runs it eagerly."""
    def backend(gm, example_inputs):
        record.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    return backend


@pytest.mark.parametrize("split", [False, True])
def test_dense_split_in_compiled_code_only_when_enabled(split, on_cpu):
    """Compiled code traces dense()'s split product (one bmm over the weight's two row halves)
    only inside K.compiled_split(True) with autograd off; otherwise plain F.linear. Same numbers
    either way; a change of the switch recompiles rather than reusing the other graph."""
    import mythos_kernels as K
    from mythos_kernels.cpu import linear as L

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(130, 128, generator=g)                 # 16640 elements: over the floor
    x = torch.randn(1, 3, 128, generator=g)
    assert w.numel() >= L.SPLIT_MIN_WEIGHT
    ops: list = []
    f = torch.compile(lambda a: K.dense(a, w), backend=_graph_ops(ops), fullgraph=True)
    with torch.no_grad(), K.compiled_split(split):
        out = f(x)
    assert ("bmm" in " ".join(ops)) is split
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    ops.clear()
    with torch.no_grad(), K.compiled_split(not split):
        f(x)
    assert ("bmm" in " ".join(ops)) is (not split)
    ops.clear()
    with K.compiled_split(True):                           # autograd on: never split
        torch.compile(lambda a: K.dense(a, w), backend=_graph_ops(ops), fullgraph=True)(
            x.requires_grad_())
    assert "bmm" not in " ".join(ops)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_cpu_decode_step_with_cpu_forms_is_one_graph(attn, on_cpu):
    """The step generate(compiled=True) compiles on the CPU: the head's transposed copy passed in
    (K.decode_head_weight, multiplied by K.lm_head_transposed) and the split products traced
    (K.compiled_split); one graph (fullgraph), the eager step's logits. Dims above the CPU
    forms' size floors."""
    import mythos_kernels as K
    from mythos.generate import _decode_step

    torch._dynamo.reset()
    kw = tiny_kwargs(attn, dim=132, n_heads=6, n_kv_heads=3, vocab_size=4099, expert_dim=130,
                    q_lora_rank=130)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    ids = torch.randint(0, kw["vocab_size"], (1, 6))
    ops: list = []
    with torch.no_grad(), mythos.use_backend("cpu"):
        layers, tok, pos = _step_inputs(m, ids)
        head_t = K.decode_head_weight(m.head.weight)
        assert head_t is not None and head_t.shape == (132, 4099)
        ref = _decode_step(m, tok, 2, layers, pos)
        bmms = {}
        for split in (False, True):
            ops.clear()
            with K.compiled_split(split):
                out = torch.compile(_decode_step, backend=_graph_ops(ops), fullgraph=True)(
                    m, tok, 2, layers, pos, head_t)
            assert_close(f"compiled decode step (split {split})", ref, out, 1e-5)
            bmms[split] = sum("bmm" in op for op in ops)
    assert bmms[True] > bmms[False]          # the projections' split products were traced


def test_generate_compiled_retries_without_graph_cache(monkeypatch):
    """If inductor fails to build the cached decode step (BackendCompilerFailed), generate warns,
    recompiles without the on-disk graph cache, and later calls go straight to that one; the
    tokens are the eager ones. (The failing and the retried compiles are stand-ins here.)"""
    from torch._dynamo.exc import BackendCompilerFailed

    import mythos.generate as MM

    calls = {"cached": 0, "uncached": 0}

    def failing(*a):
        calls["cached"] += 1
        raise BackendCompilerFailed(lambda *x: None, RuntimeError("C++ compile error"), None)

    def uncached(*a):
        calls["uncached"] += 1
        return MM._decode_step(*a)

    monkeypatch.setattr(MM, "_GRAPH_CACHE_FAILED", [])
    monkeypatch.setattr(MM, "_compiled_decode_step",
                        lambda fx_graph_cache=True: failing if fx_graph_cache else uncached)
    torch.manual_seed(0)
    kw = tiny_kwargs("mla")
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    p = torch.randint(0, kw["vocab_size"], (2, 5))
    with pytest.warns(RuntimeWarning, match="without its on-disk graph cache"):
        out = m.generate(p, 6, n_loops=2, top_k=1, compiled=True)
    assert torch.equal(out, m.generate(p, 6, n_loops=2, top_k=1))
    assert calls["cached"] == 1 and calls["uncached"] == 5
    m.generate(p, 3, n_loops=2, top_k=1, compiled=True)     # no second failure, no warning
    assert calls["cached"] == 1 and calls["uncached"] == 7


@pytest.mark.parametrize("isa_ok", [False, True])
def test_scalar_inductor_warning(monkeypatch, isa_ok):
    """An x86 CPU with AVX flags whose inductor ISA check failed gets a warning naming the likely
    cause (the compiled step would be scalar C++); a passing check stays silent."""
    import warnings

    import torch._inductor.cpu_vec_isa as isa_mod

    import mythos.generate as MM

    class _Isa:
        def __bool__(self):
            return isa_ok

    monkeypatch.setattr(isa_mod, "pick_vec_isa", lambda: _Isa())
    monkeypatch.setattr(isa_mod, "x86_isa_checker", lambda: ["avx2", "avx512"])
    if isa_ok:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            MM._warn_if_scalar_inductor()
    else:
        with pytest.warns(RuntimeWarning, match="avx2, avx512.*vector-ISA check failed.*nt.py"):
            MM._warn_if_scalar_inductor()
