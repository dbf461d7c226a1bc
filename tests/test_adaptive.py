"""mythos.adaptive / .speculative / .early_exit: streaming equals generate, speculative greedy
equals plain greedy, speculative sampling follows the plain distribution, each early-exit fill
against a slow reference of its definition, bad arguments refused before any compute."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import mythos_kernels as K
from mythos import adaptive, early_exit
from mythos.cache import LayerCache, MythosCache
from mythos_kernels.recurrent import loop_input_reference, lti_act_step_reference

pytestmark = pytest.mark.usefixtures("on_cpu")


_model = tiny_model


# ---------------------------------------------------------------- streaming, defaults
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stream_defaults_are_generate(temperature):
    m = _model()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    ref = m.generate(ids, 9, n_loops=3, temperature=temperature, top_k=20)
    torch.manual_seed(7)
    toks = list(adaptive.stream(m, ids, 9, n_loops=3, temperature=temperature, top_k=20))
    assert all(t.shape == (2,) for t in toks)
    assert torch.equal(torch.stack(toks, 1), ref[:, 5:])
    # top_p = 1 and min_p = 0 filter nothing: the same draws
    torch.manual_seed(7)
    out = m.generate(ids, 9, n_loops=3, temperature=temperature, top_k=20, top_p=1.0, min_p=0.0)
    assert torch.equal(out, ref) and not out.is_inference()


def test_top_p_min_p_restrict_tokens():
    m = _model()
    ids = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    a = m.generate(ids, 6, n_loops=2, temperature=1.0, top_k=0, top_p=1e-6)
    assert torch.equal(a, m.generate(ids, 6, n_loops=2, temperature=0))   # only the top token
    b = m.generate(ids, 6, n_loops=2, temperature=1.0, top_k=0, min_p=1.0)
    assert torch.equal(b, a)


# ---------------------------------------------------------------- speculative decoding
@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("B,P,n_loops,d,k", [(1, 5, 3, 1, 3), (3, 7, 6, 2, 4), (2, 1, 5, 5, 2)])
def test_speculative_greedy_is_plain_greedy(attn_type, B, P, n_loops, d, k):
    m = _model(attn_type=attn_type)
    ids = torch.randint(0, 97, (B, P), generator=torch.Generator().manual_seed(B * 10 + P))
    ref = m.generate(ids, 9, n_loops=n_loops, temperature=0)
    stats = {}
    out = adaptive.generate(m, ids, 9, n_loops=n_loops, temperature=0, draft_loops=d,
                            draft_tokens=k, stats=stats)
    assert torch.equal(out, ref)
    if d == n_loops:    # a full-depth draft is always accepted
        assert stats["accepted"] == stats["drafted"] > 0
    assert torch.equal(m.generate(ids, 9, n_loops=n_loops, temperature=0, draft_loops=d,
                                  draft_tokens=k), ref)


def test_speculative_sampling_follows_plain_distribution():
    """3 tokens from a 5-token vocabulary, 4000 rows: the joint frequencies against the exact
    plain-sampling probabilities (chi-square, 125 cells, p ~ 1e-5 cut)."""
    V, n_loops = 5, 4
    m = _model(seed=3, scale=0.6, vocab_size=V)
    prompt = torch.tensor([[1, 3, 0]])
    N = 4000
    torch.manual_seed(11)
    out = adaptive.generate(m, prompt.expand(N, 3), 3, n_loops=n_loops, temperature=0.9,
                            top_k=0, draft_loops=1, draft_tokens=2)[:, 3:]
    torch.manual_seed(11)   # the same seed, the same tokens
    again = adaptive.generate(m, prompt.expand(N, 3), 3, n_loops=n_loops, temperature=0.9,
                              top_k=0, draft_loops=1, draft_tokens=2)[:, 3:]
    assert torch.equal(out, again)
    seqs = torch.cartesian_prod(*[torch.arange(V)] * 3)                     # [125, 3]
    with torch.no_grad():
        full = torch.cat([prompt.expand(len(seqs), 3), seqs[:, :2]], 1)
        logp = torch.log_softmax(m(full, n_loops=n_loops)[:, 2:] / 0.9, -1)    # [125, 3, V]
    p = logp.gather(-1, seqs[:, :, None]).squeeze(-1).sum(-1).exp()          # [125]
    assert abs(float(p.sum()) - 1) < 1e-4
    idx = (out[:, 0] * V + out[:, 1]) * V + out[:, 2]
    counts = torch.bincount(idx, minlength=V ** 3).double()
    expected = p.double() * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # df 124: mean 124, sd ~15.7; 124 + 4.3 sd ~ 192
    assert chi2 < 192, chi2
    # the draft distribution differs enough that accepting every draft would fail this test
    with torch.no_grad():
        d_logp = torch.log_softmax(m(full, n_loops=1)[:, 2:] / 0.9, -1)
    pd = d_logp.gather(-1, seqs[:, :, None]).squeeze(-1).sum(-1).exp().double()
    assert float(((pd * N - expected) ** 2 / expected).sum()) > 400


# ---------------------------------------------------------------- early exit
def _slice_cache(cache: dict, b: int) -> MythosCache:
    out = MythosCache(cache.capacity)
    for key, c in cache.items():
        lc = LayerCache(c.capacity, c.max_capacity, c.fixed)
        lc.length = c.length
        lc.buffers = {n: buf[b:b + 1].clone() for n, buf in c.buffers.items()}
        out[key] = lc
    return out


def _coda_log_p(model, y, freqs, cache):
    """Next-token log-probs of the loop output ``y``: the coda over a copy of the cache, the
    final norm, the head."""
    copy = _slice_cache(cache, 0)
    x = y
    for i, layer in enumerate(model.coda):
        x = layer(x, freqs, None, copy, f"coda_{i}")
    return torch.log_softmax(model.logits(x[:, -1]), -1)


def _ref_step(model, tok, cache, pos, n_loops, crit, thr, fill):
    """One row: the definition, scalar control flow, reference formulas, module attention."""
    rec, cfg = model.recurrent, model.cfg
    x = model.embed(tok)
    freqs = (model.freqs_cis_mla if cfg.attn_type == "mla" else model.freqs_cis)[pos:pos + 1]
    for i, layer in enumerate(model.prelude):
        x = layer(x, freqs, None, cache, f"prelude_{i}")
    e = h = x
    h_out, cum = torch.zeros_like(h), torch.zeros(1, 1)
    norm, inj, halt = rec.norm, rec.injection, rec.act.halt
    exited, y, prev, h_frozen = None, None, None, None
    for t in range(n_loops):
        key = f"recurrent_loop_{t}"
        if exited is not None and fill == "latest":
            src = cache[f"recurrent_loop_{exited}"]
            cache[key].append(**{n: b[:, pos:pos + 1].clone() for n, b in src.buffers.items()})
            continue
        if exited is not None and fill == "project":
            xin = loop_input_reference(h_frozen, e, t, norm.weight, norm.eps, rec.loop_dim)
            rec.block.attn(rec.block.attn_norm(xin), freqs, None, cache, key)   # writes K/V
            continue
        xin = loop_input_reference(h, e, t, norm.weight, norm.eps, rec.loop_dim)
        out = rec.block(xin, freqs, None, cache, key)
        out = out + rec.lora(out, t)
        h_new, h_out_n, cum_n = lti_act_step_reference(h, e, out, h_out, cum, inj.log_A,
                                                       inj.log_dt, inj.B, halt.weight,
                                                       halt.bias, cfg.act_threshold)
        if exited is None:
            h_out, cum = h_out_n, cum_n
            c = float(cum)
            r = max(1 - c, 0.0) if c < cfg.act_threshold else 0.0
            y_t = h_out + r * h_new
            logp = _coda_log_p(model, y_t, freqs, cache)
            if crit == "act":
                stop = c >= thr
            elif crit == "latent":
                stop = t > 0 and float((h_new - h).norm() / h_new.norm()) < thr
            else:
                stop = t > 0 and float((logp.exp() * (logp - prev)).sum()) < thr
            prev = logp
            if stop:
                exited, y, h_frozen = t, y_t, h_new
        h = h_new
    if y is None:
        y = h_out
    x = y
    for i, layer in enumerate(model.coda):
        x = layer(x, freqs, None, cache, f"coda_{i}")
    return x[:, -1], n_loops if exited is None else exited + 1


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("crit,thr", [("latent", 0.3), ("kl", 0.001)])
@pytest.mark.parametrize("fill", early_exit.FILLS)
def test_early_exit_fill_against_reference(attn_type, crit, thr, fill):
    m = _model(attn_type=attn_type)
    B, P, n_loops = 5, 6, 6
    ids = torch.randint(0, 97, (B, P + 1), generator=torch.Generator().manual_seed(5))
    cache = MythosCache(P + 1)
    with torch.no_grad():
        m.hidden_states(ids[:, :P], n_loops, cache, 0)
        refs = [_slice_cache(cache, b) for b in range(B)]
        h, depth = early_exit.hidden_step(m, ids[:, P:], cache, P, n_loops, crit, thr, fill)
        for b in range(B):
            hr, dr = _ref_step(m, ids[b:b + 1, P:], refs[b], P, n_loops, crit, thr, fill)
            assert int(depth[b]) == dr, (b, depth.tolist())
            torch.testing.assert_close(h[b:b + 1], hr, rtol=1e-4, atol=1e-5)
            for key, c in cache.items():
                assert c.length == P + 1 == refs[b][key].length, key
                for n, buf in c.buffers.items():
                    torch.testing.assert_close(buf[b:b + 1, P], refs[b][key].buffers[n][:, P],
                                               rtol=1e-4, atol=1e-5, msg=f"{key}.{n} row {b}")
    # rows exit at several depths, so masks and fills are exercised
    assert len(set(depth.tolist())) > 1 and int(depth.min()) < n_loops, depth.tolist()


def test_early_exit_act_latest():
    """act: the exit output is the full-depth ACT output (it no longer changes past halting)."""
    m = _model()
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(8))
    cache = MythosCache(6)
    with torch.no_grad():
        m.hidden_states(ids[:, :5], 5, cache, 0)
        refs = [_slice_cache(cache, b) for b in range(3)]
        h, depth = early_exit.hidden_step(m, ids[:, 5:], cache, 5, 5, "act", 0.99, "latest")
        for b in range(3):
            hr, dr = _ref_step(m, ids[b:b + 1, 5:], refs[b], 5, 5, "act", 0.99, "latest")
            assert int(depth[b]) == dr
            torch.testing.assert_close(h[b:b + 1], hr, rtol=1e-4, atol=1e-5)
    assert int(depth.min()) < 5, depth.tolist()


def test_early_exit_recompute_cache_is_full_depth():
    """recompute: every cache entry is the full-depth one; a row that never exits gives the
    full-depth hidden state."""
    m = _model()
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(9))
    ca, cb = MythosCache(6), MythosCache(6)
    with torch.no_grad():
        m.hidden_states(ids[:, :5], 5, ca, 0)
        m.hidden_states(ids[:, :5], 5, cb, 0)
        ref = m.hidden_states(ids[:, 5:], 5, ca, 5)[:, -1]
        h, depth = early_exit.hidden_step(m, ids[:, 5:], cb, 5, 5, "latent", 1e-9, "recompute")
    assert depth.tolist() == [5, 5, 5]
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)
    for key in ca:
        for n in ca[key].buffers:
            torch.testing.assert_close(cb[key].buffers[n], ca[key].buffers[n], rtol=1e-5, atol=1e-6)


def test_early_exit_step_under_triton():
    """The early-exit decode step with the Triton kernels (the interpreter on the CPU)."""
    if not K.triton_available():
        pytest.skip("no Triton")
    m = _model()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    outs = []
    for backend in ("triton", "reference"):
        cache = MythosCache(5)
        with torch.no_grad(), K.use_backend(backend):
            m.hidden_states(ids[:, :4], 4, cache, 0)
            outs.append(early_exit.hidden_step(m, ids[:, 4:], cache, 4, 4, "latent", 0.35,
                                               "project"))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,match", [
    (dict(top_p=-0.1), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"), (dict(min_p=-1e-3), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(min_p=2), "min_p"), (dict(draft_loops=0), "draft_loops"),
    (dict(draft_loops=9), "draft_loops"), (dict(draft_loops=1, draft_tokens=0), "draft_tokens"),
    (dict(exit_criterion="entropy"), "exit_criterion"),
    (dict(exit_criterion="kl"), "exit_threshold"),
    (dict(exit_criterion="latent", exit_threshold=float("nan")), "exit_threshold"),
    (dict(exit_criterion="act", exit_threshold=1.5), "exit_threshold"),
    (dict(exit_criterion="act", exit_fill="zeros"), "exit_fill"),
    (dict(exit_threshold=0.1), "exit_criterion"),
    (dict(top_p=0.9, cuda_graph=True), "cuda_graph"),
    (dict(draft_loops=1, exit_criterion="act"), "choose one"),
])
def test_bad_arguments_refused_before_compute(kw, match, monkeypatch):
    m = _model()
    ids = torch.randint(0, 97, (1, 3))

    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(m, "hidden_states", boom)
    with pytest.raises(ValueError, match=match):
        m.generate(ids, 4, n_loops=4, **kw)
    if "cuda_graph" not in kw:
        with pytest.raises(ValueError, match=match):
            adaptive.stream(m, ids, 4, n_loops=4, **kw)   # at the call, not the first next()
    with pytest.raises(TypeError, match="top_p"):
        adaptive.stream(m, ids, 4, top_p="0.9")
