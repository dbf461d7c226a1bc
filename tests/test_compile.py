"""torch.compile: the model compiles (graph breaks only at the data-dependent reference MoE
dispatch and the ACT early-exit check) and gives the eager numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_kwargs

import mythos


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
    g = torch.Generator().manual_seed(1)
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
    from mythos.cache import MythosCache

    torch._dynamo.reset()
    kw = tiny_kwargs(attn, act_threshold=0.99)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).cuda().eval()
    ids = torch.randint(0, kw["vocab_size"], (2, 6), device="cuda")
    with torch.no_grad(), mythos.use_backend("triton"):
        cache = MythosCache(12)
        m._hidden(ids, 3, cache, 0)
        tok = ids[:, -1:].clone()
        pos = torch.full((1,), 6, dtype=torch.long, device="cuda")

        def step():
            return m._logits(m._hidden(tok, 3, cache, 0, pos)[:, -1])

        ref = step()
        out = torch.compile(step, backend="eager", fullgraph=True)()
    assert_close("compiled decode step", ref, out, 1e-5)
