"""Drop-in views where open-mythos users look inside: a cache entry reads as open-mythos's dict
(key names, shapes, values; views of the valid prefix, never copies), and
``MoEFFN.routed_experts`` is a read-only sequence of expert modules viewing the stacked weights."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from conftest import assert_close, make_pair, tiny_kwargs

import mythos

pytestmark = pytest.mark.usefixtures("on_cpu")


def _same_storage(view: torch.Tensor, buf: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("kind", ["dict", "preallocated"])
def test_cache_entry_reads_as_open_mythos_entry(om, attn, kind):
    """Same keys, shapes and values as open-mythos's entries after a prefill and a decode step
    (MLA: ``c_kv`` is mythos's normalized latent = kv_norm of open-mythos's raw one)."""
    kw = tiny_kwargs(attn)
    a, b = make_pair(om, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 5))
    ca, cb = {}, ({} if kind == "dict" else mythos.MythosCache(16))
    with torch.no_grad():
        for chunk, pos in ((ids[:, :4], 0), (ids[:, 4:], 4)):
            a(chunk, n_loops=2, kv_cache=ca, start_pos=pos)
            b(chunk, n_loops=2, kv_cache=cb, start_pos=pos)
    assert set(ca) == set(cb)
    for key, ea in ca.items():
        eb = cb[key]
        assert isinstance(eb, Mapping) and set(eb) == set(ea) and len(eb) == len(ea)
        assert list(eb.keys()) == list(ea.keys())
        for name, ref in ea.items():
            got = eb[name]
            assert got.shape == ref.shape, (key, name)
            if name == "c_kv":
                attn_mod = (b.prelude[0] if key == "prelude_0" else b.recurrent.block
                            if key.startswith("recurrent") else b.coda[0]).attn
                ref = attn_mod.kv_norm(ref)
            assert_close(f"{key}[{name}]", ref, got, 1e-5)
        assert [n for n, _ in eb.items()] == list(ea)
        assert all(v.shape == ea[n].shape for n, v in zip(eb, eb.values()))
        assert ("c_kv" in eb) == (attn == "mla") and ("k" in eb) == (attn == "gqa")
        assert eb.get("nope") is None


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_cache_entry_values_are_views_of_the_valid_prefix(attn):
    """Each value is a view of the layer's buffer over [0, length) (same storage, offset 0, a
    per-head k_rope a broadcast with stride 0 over the heads); the entry cannot be written."""
    kw = tiny_kwargs(attn)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    cache = mythos.MythosCache(32)
    with torch.no_grad():
        m(torch.randint(0, 97, (2, 7)), n_loops=2, kv_cache=cache)
    entry = cache["recurrent_loop_1"]
    for name, v in entry.items():
        buf = entry.buffers[name]
        assert buf.shape[1] == 32 and v.shape[1] == 7
        assert _same_storage(v, buf) and v.storage_offset() == buf.storage_offset()
        assert v._base is buf
        assert torch.equal(v[:, :, 0] if name == "k_rope" else v, buf[:, :7])
    if attn == "mla":
        kr = entry["k_rope"]
        assert kr.shape == (2, 7, kw["n_heads"], kw["qk_rope_head_dim"]) and kr.stride(2) == 0
        entry.buffers["k_rope"][0, 0, 0] = 123.0         # a view: sees the buffer's writes
        assert bool((kr[0, 0, :, 0] == 123.0).all())
    with pytest.raises(TypeError):
        entry["k"] = torch.zeros(1)
    with pytest.raises(KeyError):
        entry["nope"]


def test_routed_experts_are_views_of_the_stacked_weights(om):
    """Indexing, negative indexing, slicing, iteration, len; each expert's gate / up / down weights
    are open-mythos's per-expert weights, as views of w13 / w2 (no parameters registered twice);
    calling one gives open-mythos's expert output and its gradient reaches w13 / w2."""
    kw = tiny_kwargs("mla")
    a, b = make_pair(om, **kw)
    moe_a, moe_b = a.recurrent.block.ffn, b.recurrent.block.ffn
    re = moe_b.routed_experts
    E = kw["n_experts"]
    assert len(re) == E == len(list(re)) and len(re[1:4]) == 3
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in a.parameters())
    assert not any("routed_experts" in k for k in b.state_dict())
    assert not any("routed_experts" in n for n, _ in b.named_parameters())
    x = torch.randn(5, kw["dim"])
    for e, (ea, eb) in enumerate(zip(moe_a.routed_experts, re)):
        for part in ("gate", "up", "down"):
            wa, wb = getattr(ea, part).weight, getattr(eb, part).weight
            assert torch.equal(wa, wb), (e, part)
            src = moe_b.w2 if part == "down" else moe_b.w13
            assert _same_storage(wb, src) and wb._base is src
        with torch.no_grad():
            assert_close(f"expert {e}", ea(x), eb(x), 1e-6)
    assert torch.equal(re[-1].down.weight, moe_a.routed_experts[E - 1].down.weight)
    assert re[0].gate.in_features == kw["dim"] and re[0].gate.out_features == kw["expert_dim"]
    with pytest.raises(IndexError):
        re[E]
    with pytest.raises(TypeError):
        re[0] = re[1]
    with pytest.raises(TypeError):
        re["0"]
    re[2](x).sum().backward()
    assert moe_b.w13.grad is not None and moe_b.w13.grad[2].abs().sum() > 0
    assert moe_b.w13.grad[torch.arange(E) != 2].abs().sum() == 0
    assert moe_b.w2.grad[2].abs().sum() > 0


def test_routed_experts_follow_load_state_dict():
    """The views read the stacked weights on access: a load afterwards shows through."""
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa"))).eval()
    moe = m.recurrent.block.ffn
    ex = moe.routed_experts[3]
    with torch.no_grad():
        moe.w13.mul_(2)
    assert torch.equal(ex.up.weight, moe.w13[3, :, moe.expert_dim:].t())
