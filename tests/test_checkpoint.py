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


def test_both_expert_layouts_in_one_state_dict_is_an_error(om):
    """Per-expert and stacked keys for the same experts: which would win is ambiguous, so the
    load is an error (strict or not) naming the module, as torch reports a load's errors."""
    kw = tiny_kwargs("mla")
    m = mythos.OpenMythos(mythos.MythosConfig(**kw))
    sd = {**m.state_dict(), **mythos.to_open_mythos_state_dict(m)}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="recurrent.block.ffn.*both layouts"):
            m.load_state_dict(sd, strict=strict)


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


@pytest.mark.usefixtures("on_cpu")
def test_convert_checkpoint_tool(om, tmp_path, capsys):
    """tools/convert_checkpoint.py: open-mythos file -> mythos layout -> back, each loading
    strictly into its model with the same logits; a wrapping dict keeps its other entries; bad
    files and an existing OUT are refused with a message."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
    from convert_checkpoint import main

    kw = tiny_kwargs("mla")
    a, b = make_pair(om, **kw)
    src, mid, back = (str(tmp_path / n) for n in ("om.pt", "mythos.pt", "back.pt"))
    torch.save({"model": a.state_dict(), "step": 7}, src)
    assert main([src, mid]) == 0 and "open-mythos layout" in capsys.readouterr().out
    conv = torch.load(mid, weights_only=True)
    assert conv["step"] == 7
    assert not any("routed_experts" in k for k in conv["model"])
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    m.load_state_dict(conv["model"], strict=True)
    ids = torch.randint(0, kw["vocab_size"], (2, 5))
    with torch.no_grad():
        assert torch.equal(m(ids), b(ids))
    assert main([mid, back]) == 0
    o = om.OpenMythos(om.MythosConfig(**kw)).eval()
    o.load_state_dict(torch.load(back, weights_only=True)["model"], strict=True)
    with torch.no_grad():
        assert torch.equal(o(ids), a(ids))
    # refusals: existing OUT, same file, a state_dict of neither model, not a checkpoint
    assert main([mid, back, "--to", "open-mythos", "--force"]) == 0
    with pytest.raises(SystemExit):
        main([mid, back])
    with pytest.raises(SystemExit):
        main([mid, mid])
    other = str(tmp_path / "other.pt")
    torch.save({"w": torch.zeros(2)}, other)
    assert main([other, str(tmp_path / "x.pt")]) == 2
    assert "no routed-expert weights" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main([str(junk), str(tmp_path / "y.pt")]) == 2
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


@pytest.mark.usefixtures("on_cpu")
def test_convert_checkpoint_tool_writes_safetensors(om, tmp_path, capsys):
    """A .safetensors OUT from a real checkpoint (the tied embedding and head share storage,
    which safetensors refuses unless untied): both layouts, a wrapped IN (its other entries named
    as not written), and the files load strictly with the same logits."""
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
    from convert_checkpoint import main

    kw = tiny_kwargs("gqa")
    a, b = make_pair(om, **kw)
    ids = torch.randint(0, kw["vocab_size"], (2, 5))
    src, wrapped = str(tmp_path / "om.pt"), str(tmp_path / "wrapped.pt")
    torch.save(a.state_dict(), src)
    torch.save({"model": a.state_dict(), "step": 3}, wrapped)
    to_m, to_om = str(tmp_path / "m.safetensors"), str(tmp_path / "om.safetensors")
    assert main([src, to_m]) == 0
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    m.load_state_dict(load_file(to_m), strict=True)
    assert main([to_m, to_om]) == 0
    o = om.OpenMythos(om.MythosConfig(**kw)).eval()
    o.load_state_dict(load_file(to_om), strict=True)
    with torch.no_grad():
        assert torch.equal(m(ids), b(ids)) and torch.equal(o(ids), a(ids))
    capsys.readouterr()
    assert main([wrapped, str(tmp_path / "w.safetensors")]) == 0
    assert "not the other entries of IN (step)" in capsys.readouterr().out
    assert load_file(str(tmp_path / "w.safetensors")).keys() == load_file(to_m).keys()


def _convert(*args: str, cwd):
    """Run tools/convert_checkpoint.py as a script in ``cwd``; the CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).parents[1] / "tools" / "convert_checkpoint.py"
    return subprocess.run([sys.executable, str(tool), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_convert_checkpoint_cli_refusals(tmp_path, monkeypatch, capsys):
    """The command line: an empty IN, an expert weight missing, and OUT naming IN under another
    name (./IN, a symlink, a hard link; even with --force) each exit non-zero with a message
    naming the problem, no exception, and leave every file as it was; then the script itself
    (a child process) converts."""
    import os

    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
    from convert_checkpoint import main

    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla")))
    sd = mythos.to_open_mythos_state_dict(m)
    torch.save(sd, tmp_path / "om.pt")
    missing = next(k for k in sd if "routed_experts.2.down" in k)
    del sd[missing]
    torch.save(sd, tmp_path / "broken.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    os.symlink("om.pt", tmp_path / "link.pt")
    os.link(tmp_path / "om.pt", tmp_path / "hard.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)
    for args, msg in [(["empty.pt", "o.pt"], "empty"),
                      (["broken.pt", "o.pt"], missing),
                      (["om.pt", "./om.pt", "--force"], "input"),
                      (["om.pt", "link.pt", "--force"], "input"),
                      (["om.pt", "hard.pt", "--force"], "input"),
                      (["om.pt", f"../{tmp_path.name}/om.pt", "--force"], "input"),
                      (["om.pt", "no_dir/o.pt"], "folder")]:
        try:
            rc = main(args)
        except SystemExit as exc:        # argparse's usage errors
            rc = exc.code
        assert rc not in (0, None), args
        assert msg in capsys.readouterr().err, args
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    r = _convert("om.pt", "ok.pt", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "ok.pt").exists(), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "ok.pt"])   # no temp left
