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
