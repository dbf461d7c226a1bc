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
