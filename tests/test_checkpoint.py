"""open-mythos checkpoints load unchanged; export back round-trips; weight tying is kept."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_pair, tiny_kwargs

import mythos


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_load_open_mythos_checkpoint_strict_and_round_trip(om, attn, tmp_path):
    kw = tiny_kwargs(attn)
    a, _ = make_pair(om, **kw)
    path = tmp_path / "om.pt"
    torch.save(a.state_dict(), path)
    b = mythos.OpenMythos(mythos.MythosConfig(**kw))
    b.load_state_dict(torch.load(path), strict=True)
    assert b.head.weight is b.embed.weight
    back = mythos.to_open_mythos_state_dict(b)
    ref = a.state_dict()
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    a2 = om.OpenMythos(om.MythosConfig(**kw))
    a2.load_state_dict(back, strict=True)
    assert a2.head.weight is a2.embed.weight


def test_mythos_layout_round_trip_and_converter(om):
    kw = tiny_kwargs("mla")
    a, b = make_pair(om, **kw)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    c = mythos.OpenMythos(mythos.MythosConfig(**kw))
    c.load_state_dict(torch.load(buf), strict=True)
    conv = mythos.from_open_mythos_state_dict(a.state_dict())
    assert set(conv) == set(b.state_dict())
    for k, v in b.state_dict().items():
        assert torch.equal(conv[k], v), k
    assert b.recurrent.block.ffn.w13.shape == (7, 60, 24)
    assert b.recurrent.block.ffn.w2.shape == (7, 12, 60)


def test_missing_expert_reports_error(om):
    kw = tiny_kwargs("mla")
    a, _ = make_pair(om, **kw)
    sd = a.state_dict()
    del sd["recurrent.block.ffn.routed_experts.3.up.weight"]
    b = mythos.OpenMythos(mythos.MythosConfig(**kw))
    with pytest.raises(RuntimeError, match="routed expert"):
        b.load_state_dict(sd)


def test_spectral_radius_below_one():
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa")))
    with torch.no_grad():
        m.recurrent.injection.log_A.uniform_(-4, 4)
        m.recurrent.injection.log_dt.fill_(-1.0)
    A = m.recurrent.injection.get_A()
    assert A.shape == (60,) and (A > 0).all() and (A < 1).all()


def test_checkpoint_with_real_rope_buffers_loads_correct_phasors(om):
    """open-mythos cast with ``.to(torch.bfloat16)`` saves its RoPE phasors as real numbers (the
    cast dropped their imaginary part); loading such a checkpoint keeps mythos's correct complex
    phasors instead of copying the real values in (which would zero every sine)."""
    import warnings

    kw = tiny_kwargs("mla")
    torch.manual_seed(0)
    a = om.OpenMythos(om.MythosConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch: "Casting complex values to real discards ..."
        sd = a.to(torch.bfloat16).state_dict()
    assert not sd["freqs_cis"].is_complex()
    b = mythos.OpenMythos(mythos.MythosConfig(**kw)).to(torch.bfloat16)
    b.load_state_dict(sd)
    ref = mythos.OpenMythos(mythos.MythosConfig(**kw))
    for name in ("freqs_cis", "freqs_cis_mla"):
        assert torch.equal(getattr(b, name), getattr(ref, name)), name


@pytest.mark.parametrize("delta", [1, -1])
def test_expert_count_mismatch_names_both_counts(om, delta):
    """An open-mythos checkpoint with another number of routed experts than the config: the
    error says how many the checkpoint holds and how many the config wants."""
    kw = tiny_kwargs("mla")
    a, _ = make_pair(om, seed=3, **kw)
    E = kw["n_experts"]
    m = mythos.OpenMythos(mythos.MythosConfig(**dict(kw, n_experts=E + delta,
                                                     n_experts_per_tok=2)))
    with pytest.raises(RuntimeError, match=f"holds {E} routed experts .* n_experts={E + delta}"):
        m.load_state_dict(a.state_dict())
