"""Bad input: clear ValueErrors naming the problem, raised before any compute."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_kwargs

import mythos
from mythos import MythosConfig, OpenMythos


@pytest.mark.parametrize("over,field", [
    (dict(attn_type="gqa", dim=62, n_heads=4), "dim"),
    (dict(attn_type="gqa", n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(n_experts=4, n_experts_per_tok=5), "n_experts_per_tok"),
    (dict(attn_type="mla", qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(attn_type="gqa", dim=66, n_heads=6, n_kv_heads=3), "head_dim"),
    (dict(dim=0), "dim"),
    (dict(vocab_size=-3), "vocab_size"),
    (dict(expert_dim=0), "expert_dim"),
    (dict(n_experts=0, n_experts_per_tok=0), "n_experts"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(max_loop_iters=0), "max_loop_iters"),
    (dict(prelude_layers=-1), "prelude_layers"),
    (dict(act_threshold=0.0), "act_threshold"),
    (dict(act_threshold=-1.0), "act_threshold"),
    (dict(act_threshold=float("nan")), "act_threshold"),
    (dict(attn_type="mqa"), "attn_type"),
    (dict(dim=60.0), "dim"),
])
def test_config_validation(over, field):
    kw = tiny_kwargs("mla")
    kw.update(over)
    with pytest.raises(ValueError, match=field):
        MythosConfig(**kw)


def test_mla_config_ignores_gqa_only_fields():
    # open-mythos never uses n_kv_heads or dim // n_heads in MLA: such configs stay valid.
    MythosConfig(**tiny_kwargs("mla", n_heads=7, n_kv_heads=4))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenMythos(MythosConfig(**tiny_kwargs("mla"))).eval()


def _snapshot(cache):
    # the valid prefix: positions past `length` are preallocated but never written (garbage)
    return {k: (c.length, {n: b[:, :c.length].clone() for n, b in c.buffers.items()})
            for k, c in cache.items()}


@pytest.mark.parametrize("bad,kwargs,msg", [
    (torch.zeros(2, 5), {}, "integer"),
    (torch.zeros(2, 5, dtype=torch.bool), {}, "integer"),
    (torch.zeros(5, dtype=torch.long), {}, "shape"),
    (torch.zeros(1, 2, 5, dtype=torch.long), {}, "shape"),
    (torch.zeros(2, 0, dtype=torch.long), {}, "non-empty"),
    (torch.full((2, 5), 97), {}, "vocab_size"),
    (torch.full((2, 5), -1), {}, "vocab_size"),
    (torch.zeros(2, 5, dtype=torch.long), dict(n_loops=0), "n_loops"),
    (torch.zeros(2, 5, dtype=torch.long), dict(n_loops=-2), "n_loops"),
    (torch.zeros(2, 5, dtype=torch.long), dict(n_loops=2.0), "n_loops"),
    (torch.zeros(2, 5, dtype=torch.long), dict(start_pos=60), "max_seq_len"),
    (torch.zeros(2, 5, dtype=torch.long), dict(start_pos=-1), "start_pos"),
    (torch.zeros(2, 5, dtype=torch.long), dict(start_pos=1.0), "start_pos"),
    (torch.zeros(2, 5, dtype=torch.long), dict(start_pos=True), "start_pos"),
    (torch.zeros(2, 5, dtype=torch.long), dict(start_pos=torch.tensor([1, 2])), "start_pos"),
    (torch.zeros(2, 5, dtype=torch.long), dict(n_loops=torch.tensor(2.0)), "n_loops"),
    ([[1, 2]], {}, "torch.Tensor"),
])
def test_forward_rejects_before_compute(model, bad, kwargs, msg):
    cache = {}
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 4)), kv_cache=cache)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match=msg):
        model(bad, kv_cache=cache, **kwargs)
    after = _snapshot(cache)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k][0] == after[k][0]
        for n in before[k][1]:
            assert torch.equal(before[k][1][n], after[k][1][n]), f"cache {k}.{n} was modified"


def test_cache_overflow_and_batch_mismatch(model):
    cache = mythos.MythosCache(6)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 4)), kv_cache=cache)
        with pytest.raises(ValueError, match="capacity"):
            model(torch.randint(0, 97, (1, 3)), kv_cache=cache, start_pos=4)
        with pytest.raises(ValueError, match="batch"):
            model(torch.randint(0, 97, (2, 1)), kv_cache=cache, start_pos=4)
        assert cache.length == 4
        model(torch.randint(0, 97, (1, 2)), kv_cache=cache, start_pos=4)
        assert cache.length == 6
    with pytest.raises(ValueError, match="capacity"):
        mythos.MythosCache(0)


def test_generate_rejects_bad_arguments(model):
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(ids, max_new_tokens=100)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(ids + 200, max_new_tokens=2)


def test_backend_name_validated():
    with pytest.raises(ValueError, match="MYTHOS_BACKEND"):
        with mythos.use_backend("cuda"):
            pass


def test_index_like_arguments_accepted(model):
    """Where open-mythos accepts index-likes (its slicing and ``range``), so does mythos: numpy
    integers and one-element integer tensors for start_pos and n_loops, the same logits."""
    import numpy as np

    ids = torch.randint(0, 97, (2, 4))
    with torch.no_grad():
        ref = model(ids, n_loops=2, start_pos=3)
        for n, s in ((np.int64(2), np.int32(3)), (torch.tensor(2), torch.tensor(3))):
            torch.testing.assert_close(model(ids, n_loops=n, start_pos=s), ref, rtol=0, atol=0)
        g = model.generate(ids, 3, n_loops=torch.tensor(2), top_k=1)
    assert torch.equal(g, model.generate(ids, 3, n_loops=2, top_k=1))


def test_generate_returns_int64_for_any_integer_prompt(model):
    """open-mythos's generate concatenates int64 samples onto the prompt (torch.cat promotes)."""
    ids = torch.randint(0, 97, (2, 4), dtype=torch.int32)
    out = model.generate(ids, 3, top_k=1)
    assert out.dtype == torch.int64 and torch.equal(out[:, :4], ids.long())
    assert torch.equal(out, model.generate(ids.long(), 3, top_k=1))


def test_routed_experts_attribute_explains_the_stacked_layout(model):
    with pytest.raises(AttributeError, match="stacked as w13"):
        model.recurrent.block.ffn.routed_experts
    assert model.recurrent.block.ffn.w13.dim() == 3          # other attributes unaffected
    with pytest.raises(AttributeError, match="no_such"):
        model.recurrent.block.ffn.no_such
