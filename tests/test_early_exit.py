"""mythos.early_exit's two step forms: the capturable one (every depth, masked updates, no host
read) against the eager one (stops once every row has exited), with the append cache and with
the static position-tensor cache; the kl criterion's coda leaves the cache as it was."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import tiny_model

import mythos
from mythos import adaptive, early_exit
from mythos.cache import MythosCache, read_only

pytestmark = pytest.mark.usefixtures("on_cpu")

MYTHOS_DIR = os.path.dirname(mythos.__file__)
SYNCS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy")


_model = tiny_model


def _guard(mp: pytest.MonkeyPatch) -> None:
    """Any host read of a tensor (bool, item, tolist, int, float, index, .cpu(), .numpy()) made
    from the mythos package raises (the kernels' own reference MoE dispatch reads expert counts,
    which the CUDA-graph path rules out separately)."""
    def guard(name):
        orig = getattr(torch.Tensor, name)

        def f(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.dirname(caller) == MYTHOS_DIR:
                raise RuntimeError(f"host sync: Tensor.{name} from {os.path.basename(caller)}")
            return orig(self, *a, **k)
        return f

    for name in SYNCS:
        mp.setattr(torch.Tensor, name, guard(name))


@pytest.fixture
def no_host_sync(monkeypatch):
    _guard(monkeypatch)


def _prefilled(m, ids, P, n_loops):
    cache = MythosCache(P + 1)
    with torch.no_grad():
        m.hidden_states(ids[:, :P], n_loops, cache, 0)
    return cache


CASES = [("act", 0.6), ("kl", 1e-3), ("kl", 10.0), ("latent", 0.3), ("latent", 0.9)]


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("crit,thr", CASES)
@pytest.mark.parametrize("fill", early_exit.FILLS)
@pytest.mark.parametrize("static", [False, True])
def test_capturable_step_is_the_eager_step(attn_type, crit, thr, fill, static, request):
    m = _model(attn_type=attn_type)
    B, P, n_loops = 5, 6, 6
    ids = torch.randint(0, 97, (B, P + 1), generator=torch.Generator().manual_seed(5))
    ca, cb = _prefilled(m, ids, P, n_loops), _prefilled(m, ids, P, n_loops)
    with torch.no_grad():
        h, depth = early_exit.hidden_step(m, ids[:, P:], ca, P, n_loops, crit, thr, fill,
                                          capturable=False)
        request.getfixturevalue("no_host_sync")
        pos = torch.tensor([P]) if static else None
        h2, depth2 = early_exit.hidden_step(m, ids[:, P:], cb, P, n_loops, crit, thr, fill,
                                            capturable=True, positions=pos)
        if static:
            for c in cb.values():
                c.length = P + 1
    assert torch.equal(depth2, depth)
    assert torch.equal(h2, h)
    assert torch.equal(m.logits(h2).argmax(-1), m.logits(h).argmax(-1))
    for key, c in ca.items():
        assert cb[key].length == c.length == P + 1, key
        for n, buf in c.buffers.items():
            assert torch.equal(cb[key].buffers[n][:, :P + 1], buf[:, :P + 1]), f"{key}.{n}"
    if (crit, thr) in (("kl", 10.0), ("latent", 0.9)):   # every row out early: eager breaks
        assert int(depth.max()) < n_loops, depth
    elif crit != "act":
        assert len(set(depth.tolist())) > 1, depth


def test_eager_step_reads_the_host(no_host_sync):
    """The guard catches the eager form's per-depth read, so the test above can fail."""
    m = _model()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    cache = MythosCache(5)
    with torch.no_grad():
        m.hidden_states(ids[:, :4], 4, cache, 0)
        with pytest.raises(RuntimeError, match="host sync"):
            early_exit.hidden_step(m, ids[:, 4:], cache, 4, 4, "latent", 0.3, "latest",
                                   capturable=False)


def test_static_step_refuses_eager():
    m = _model()
    with pytest.raises(ValueError, match="capturable"):
        early_exit.hidden_step(m, torch.zeros(1, 1, dtype=torch.long), MythosCache(4), 0, 2,
                               "act", 0.9, "latest", capturable=False, positions=torch.tensor([0]))


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
@pytest.mark.parametrize("static", [False, True])
def test_read_only_view_leaves_the_cache(attn_type, static):
    """A forward through read_only views: the appended result, nothing written."""
    m = _model(attn_type=attn_type)
    P = 5
    ids = torch.randint(0, 97, (3, P + 1), generator=torch.Generator().manual_seed(2))
    cache = _prefilled(m, ids, P, 3)
    before = {k: {n: b.clone() for n, b in c.buffers.items()} for k, c in cache.items()}
    with torch.no_grad():
        want = m.hidden_states(ids[:, P:], 3, _copy(cache), P)
        view = read_only(cache, list(cache))
        pos = torch.tensor([P]) if static else None
        got = m.hidden_states(ids[:, P:], 3, view, P, pos)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for k, c in cache.items():
        assert c.length == P
        for n, b in c.buffers.items():
            assert torch.equal(b, before[k][n]), f"{k}.{n} written"


def _copy(cache):
    out = MythosCache(cache.capacity)
    for k, c in cache.items():
        lc = type(c)(c.capacity, c.max_capacity, c.fixed, c.heads)
        lc.length, lc.buffers = c.length, {n: b.clone() for n, b in c.buffers.items()}
        out[k] = lc
    return out


# ---------------------------------------------------------------- generate's static / graph path
@pytest.mark.parametrize("attn_type,crit,thr,fill", [("mla", "latent", 0.3, "latest"),
                                                     ("gqa", "kl", 1e-3, "project"),
                                                     ("mla", "act", 0.6, "recompute"),
                                                     ("gqa", "latent", 0.3, "recompute")])
def test_generate_static_exit_is_eager(attn_type, crit, thr, fill):
    m = _model(attn_type=attn_type)
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(n_loops=5, temperature=0, exit_criterion=crit, exit_threshold=thr, exit_fill=fill)
    sa, sb = {}, {}
    ref = adaptive.generate(m, ids, 5, stats=sa, **kw)
    out = adaptive.generate(m, ids, 5, stats=sb, static=True, **kw)
    assert torch.equal(out, ref)
    assert sa == sb and sa["tokens"] == 3 * 4, (sa, sb)
    assert torch.equal(m.generate(ids, 5, static=True, **kw), ref)


def test_generate_graph_path_captures_the_static_step(monkeypatch):
    """The CUDA-graph wiring on the CPU: ``capture_step`` replaced by a stand-in that warms the
    step up and replays it with every host read from mythos refused; the tokens are the eager
    ones. (The real capture needs a GPU.)"""
    m = _model()
    ids = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(6))
    kw = dict(n_loops=4, temperature=0, exit_criterion="latent", exit_threshold=0.3,
              exit_fill="latest")
    ref = adaptive.generate(m, ids, 6, **kw)
    calls = []

    def fake_capture(step, requested):
        calls.append(requested)
        step()
        step()

        def replay():
            with pytest.MonkeyPatch.context() as mp:
                _guard(mp)
                return step()
        return replay

    monkeypatch.setattr(adaptive, "capture_step", fake_capture)
    a = adaptive.check_args(m, ids, 6, 4, 0.0, 50, None, None, None, 4, "latent", 0.3, "latest")
    a.update(static=True, graph=True, graph_requested=True)
    out = torch.cat([ids] + list(adaptive._chunks(m, ids, a, None)), 1)
    assert calls == [True]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw,match", [
    (dict(exit_criterion="act", cuda_graph=True), "CUDA"),
    (dict(exit_criterion="act", compiled=True), "compiled"),
    (dict(exit_criterion="act", cuda_graph=True, static=False), "cuda_graph"),
    (dict(top_p=0.9, static=True), "static"),
    (dict(exit_criterion="act", draft_loops=1, static=True), "static"),
])
def test_generate_modes_refused(kw, match, monkeypatch):
    m = _model()

    def boom(*a, **k):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(m, "hidden_states", boom)
    with pytest.raises(ValueError, match=match):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 4, n_loops=2, **kw)
