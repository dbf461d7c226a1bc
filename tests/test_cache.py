"""Preallocated cache: chunked prefill, decode == full forward, capacity, bytes per token."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_kwargs

import mythos


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("cache_kind", ["dict", "preallocated"])
def test_chunked_prefill_and_decode_equal_full_forward(attn, cache_kind):
    torch.manual_seed(1)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(attn, act_threshold=1e4))).eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = m(ids, n_loops=3)
        cache = {} if cache_kind == "dict" else mythos.MythosCache(13)
        parts = [m(ids[:, :5], n_loops=3, kv_cache=cache),
                 m(ids[:, 5:9], n_loops=3, kv_cache=cache, start_pos=5)]  # chunk onto a cache
        for i in range(9, 13):
            parts.append(m(ids[:, i:i + 1], n_loops=3, kv_cache=cache, start_pos=i))
    assert_close("chunked", full, torch.cat(parts, dim=1), 1e-5)
    per_layer = {k: c.length for k, c in cache.items()}
    assert set(per_layer.values()) == {13}
    assert len(per_layer) == 1 + 1 + 3


def test_mla_cache_stores_one_rope_key_per_token():
    cfg = mythos.MythosConfig(**tiny_kwargs("mla"))
    m = mythos.OpenMythos(cfg).eval()
    cache = {}
    with torch.no_grad():
        m(torch.randint(0, 97, (2, 7)), n_loops=2, kv_cache=cache)
    c = cache["recurrent_loop_0"]
    assert c.buffers["c_kv"].shape[2] == cfg.kv_lora_rank
    assert c.buffers["k_rope"].shape[2] == cfg.qk_rope_head_dim
    assert c.nbytes() == 2 * 7 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_cache_bytes_per_token_vs_open_mythos():
    cfg = mythos.mythos_1b()
    ours = mythos.cache_bytes_per_token(cfg, 2)
    theirs = mythos.cache_bytes_per_token(cfg, 2, open_mythos=True)
    layers = cfg.prelude_layers + cfg.coda_layers + cfg.max_loop_iters
    assert ours == layers * (256 + 32) * 2
    assert theirs == layers * (256 + 16 * 32) * 2


def test_generate_greedy_matches_full_forward_argmax():
    torch.manual_seed(2)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    prompt = torch.randint(0, 97, (2, 4))
    out = m.generate(prompt, max_new_tokens=5, n_loops=3, temperature=0)
    with torch.no_grad():
        ids = prompt
        for _ in range(5):
            nxt = m(ids, n_loops=3, kv_cache={})[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_static_decode_step_matches_dynamic(attn):
    """The CUDA-graph-safe static decode step (run eagerly here) gives the same tokens."""
    torch.manual_seed(4)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(attn))).eval()
    prompt = torch.randint(0, 97, (2, 5))
    a = m.generate(prompt, max_new_tokens=7, n_loops=3, temperature=0, static=False)
    b = m.generate(prompt, max_new_tokens=7, n_loops=3, temperature=0, static=True)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="CUDA"):
        m.generate(prompt.cpu(), max_new_tokens=2, cuda_graph=True)


def test_preallocated_positions_past_length_are_zero():
    """The static decode step attends over the whole buffer with a mask; a never-written
    position must hold zeros (0 * NaN from uninitialized memory would poison p @ V)."""
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa"))).eval()
    cache = mythos.MythosCache(40)
    with torch.no_grad():
        m(torch.randint(0, 97, (2, 6)), n_loops=2, kv_cache=cache)
    for c in cache.values():
        for buf in c.buffers.values():
            assert buf.shape[1] == 40 and not buf[:, 6:].any()


@pytest.mark.parametrize("fixed", [False, True])
def test_cache_widens_to_a_wider_dtype(fixed):
    """bf16 positions (an autocast prefill) then fp32 ones: the buffer becomes fp32 (as
    open-mythos's torch.cat promotes), the earlier positions keep their values, the new ones
    their full precision; a narrower write after that is widened, not the buffer narrowed."""
    from mythos.cache import LayerCache

    c = LayerCache(32, 32, fixed=True) if fixed else LayerCache(0, 32, fixed=False)
    a = torch.randn(2, 3, 5).bfloat16()
    b = torch.randn(2, 4, 5)
    c.append(k=a)
    out = c.append(k=b)["k"]
    assert out.dtype == torch.float32 and out.shape == (2, 7, 5)
    assert torch.equal(out[:, :3], a.float()) and torch.equal(out[:, 3:], b)
    d = torch.randn(2, 1, 5).bfloat16()
    out = c.append(k=d)["k"]
    assert out.dtype == torch.float32 and torch.equal(out[:, 7:], d.float())
    assert torch.equal(out[:, 3:7], b)
    if fixed:
        assert c.buffers["k"].shape[1] == 32


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_generate_runs_in_inference_mode_and_returns_normal_tensors(attn, monkeypatch):
    """Without hooks generate runs under torch.inference_mode (fewer per-op costs); what it returns
    is a normal tensor all the same (writable, usable in a training forward afterwards), and
    tensors it leaves behind (routing record) stay readable."""
    import mythos.generate as mm

    modes = []
    orig = mm.sample

    def spy(logits, temperature, top_k):
        modes.append(torch.is_inference_mode_enabled())
        return orig(logits, temperature, top_k)

    monkeypatch.setattr(mm, "sample", spy)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(attn, act_threshold=1e4))).eval()
    ids = torch.randint(0, 97, (2, 6))
    out = m.generate(ids, 4, n_loops=2, top_k=1)
    assert modes and all(modes)
    assert not out.is_inference() and not torch.is_inference_mode_enabled()
    out[0, 0] = 3                                                  # writable outside it
    assert int(m.recurrent.block.ffn.last_counts.sum()) == 2 * m.cfg.n_experts_per_tok
    m.train()
    m(out, n_loops=2).logsumexp(-1).mean().backward()
    assert m.head.weight.grad is not None and torch.isfinite(m.head.weight.grad).all()


@pytest.mark.parametrize("hook", ["module", "global"])
def test_generate_with_forward_hooks_runs_under_no_grad(hook, monkeypatch):
    """With a forward hook anywhere (a module's or a global one) generate runs under plain
    no_grad, as open-mythos's does: the captured activations are normal tensors a probe can be
    trained on. Same tokens as without the hook."""
    import mythos.generate as mm

    modes = []
    orig = mm.sample

    def spy(logits, temperature, top_k):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return orig(logits, temperature, top_k)

    monkeypatch.setattr(mm, "sample", spy)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla", act_threshold=1e4))).eval()
    ids = torch.randint(0, 97, (2, 6))
    torch.manual_seed(5)
    plain = m.generate(ids, 4, n_loops=2)
    acts = []

    def keep(mod, inputs, output):
        if mod is m.recurrent:
            acts.append(output)

    handle = (m.recurrent.register_forward_hook(keep) if hook == "module"
              else torch.nn.modules.module.register_module_forward_hook(keep))
    try:
        modes.clear()
        torch.manual_seed(5)
        hooked = m.generate(ids, 4, n_loops=2)
    finally:
        handle.remove()
    assert torch.equal(plain, hooked)
    assert modes and all(m_ == (False, False) for m_ in modes)
    assert acts and not any(a.is_inference() or a.requires_grad for a in acts)
    probe = torch.nn.Linear(acts[0].shape[-1], 1)
    probe(acts[0]).sum().backward()
    assert probe.weight.grad is not None


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_forward_under_no_grad_runs_the_body_in_inference_mode(attn, monkeypatch):
    """forward under no_grad runs the layers in torch.inference_mode (fewer per-op costs) and the
    final norm and head outside it: logits and cache buffers are normal tensors (writable,
    continued with grad enabled); with grad enabled or a forward hook, no inference mode."""
    import mythos.model as mm

    seen = []
    orig = mm.RecurrentBlock.forward

    def spy(self, *a, **k):
        seen.append(torch.is_inference_mode_enabled())
        return orig(self, *a, **k)

    monkeypatch.setattr(mm.RecurrentBlock, "forward", spy)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(attn, act_threshold=1e4))).eval()
    ids = torch.randint(0, 97, (2, 7))
    ref = m(ids[:, :6], n_loops=2).detach()                        # grad enabled: normal mode
    assert seen == [False]
    cache = {}
    with torch.no_grad():
        logits = m(ids[:, :6], n_loops=2, kv_cache=cache)
    assert seen[-1] is True
    assert_close("no_grad vs grad-enabled logits", ref, logits, 1e-6)
    assert not logits.is_inference()
    logits[0, 0, 0] = 1.0                                          # writable outside it
    bufs = [b for c in cache.values() for b in c.buffers.values()]
    assert bufs and not any(b.is_inference() for b in bufs)
    step = m(ids[:, 6:], n_loops=2, kv_cache=cache, start_pos=6)   # continued with grad on
    step.logsumexp(-1).mean().backward()
    assert seen[-1] is False and m.head.weight.grad is not None
    handle = m.coda[0].register_forward_hook(lambda *args: None)
    try:
        with torch.no_grad():
            m(ids, n_loops=2)
    finally:
        handle.remove()
    assert seen[-1] is False


def test_forward_under_no_grad_keeps_forward_mode_ad():
    """Inside torch.func.jvp or a forward-AD dual level, forward under no_grad does not switch to
    inference mode (jvp failed there: "Cannot set version_counter for inference tensor"): the
    same tangents as with grad enabled."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, jvp

    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("gqa", act_threshold=1e4))).eval()
    ids = torch.randint(0, 97, (2, 5))
    params = {k: v.detach() for k, v in m.named_parameters()}
    tang = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):  # two loop iterations: the recurrence, at half the default's forward-AD ops
        return functional_call(m, p, (ids,), {"n_loops": 2})

    _, ref = jvp(f, (params,), (tang,))
    with torch.no_grad():
        _, t_jvp = jvp(f, (params,), (tang,))
    assert_close("jvp under no_grad", ref, t_jvp, 1e-5)
    # a bare dual level (SDPA's CPU kernel has no forward-AD formula, so the check itself)
    import mythos.model as mm

    assert not mm._transformed()
    with fwAD.dual_level():
        assert mm._transformed()
    assert not mm._transformed()


# --- a cache is consistent or refused -------------------------------------------------------

class _Stop(Exception):
    """The error the tests' hooks raise mid-forward."""


def _state(cache):
    """Keys, lengths and valid prefixes of a cache (and for a preallocated one, whether the
    positions past each length are zero, as the static decode step needs)."""
    out = {}
    for k, c in cache.items():
        tails = all(not b[:, c.length:].any() for b in c.buffers.values()) \
            if isinstance(cache, mythos.MythosCache) else True
        out[k] = (c.length, {n: b[:, :c.length].clone() for n, b in c.buffers.items()}, tails)
    return out


def _assert_same_state(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert before[k][0] == after[k][0], f"{k}: length {after[k][0]}, was {before[k][0]}"
        assert after[k][2], f"{k}: positions past the length not zero"
        for n, b in before[k][1].items():
            assert torch.equal(b, after[k][1][n]), f"cache {k}.{n} changed"


def _model(attn, **over):
    torch.manual_seed(3)
    kw = tiny_kwargs(attn, act_threshold=1e4, prelude_layers=2, coda_layers=2)
    kw.update(over)
    return mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()


def _raise_on_call(module, n, exc=_Stop):
    """A forward hook on ``module`` raising ``exc`` at its n-th call (1-based): the module's
    attention has written its layer's cache by then."""
    calls = []

    def hook(mod, inputs, output):
        calls.append(1)
        if len(calls) == n:
            raise exc("stopped by a test hook")

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("cache_kind", ["dict", "preallocated"])
@pytest.mark.parametrize("where", ["prelude", "loop", "coda", "empty_cache", "interrupt"])
def test_forward_that_raises_leaves_the_cache_as_it_was(attn, cache_kind, where):
    """A hook raising in the prelude, in the loop (its 2nd iteration), in the coda (after its
    first layer), on the first call (empty cache), or a KeyboardInterrupt: every layer is back
    to its length (layers the call created removed), and the next calls give the logits of a
    run that was never interrupted."""
    m = _model(attn)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref_cache = {}
        ref = [m(ids[:, :5], n_loops=3, kv_cache=ref_cache),
               m(ids[:, 5:7], n_loops=3, kv_cache=ref_cache),
               m(ids[:, 7:8], n_loops=3, kv_cache=ref_cache)]
        cache = {} if cache_kind == "dict" else mythos.MythosCache(16)
        if where != "empty_cache":
            m(ids[:, :5], n_loops=3, kv_cache=cache)
        before = _state(cache)
        module, n, exc = {"prelude": (m.prelude[0], 1, _Stop), "loop": (m.recurrent.block, 2, _Stop),
                          "coda": (m.coda[0], 1, _Stop), "empty_cache": (m.recurrent.block, 3, _Stop),
                          "interrupt": (m.recurrent.block, 2, KeyboardInterrupt)}[where]
        chunk = ids[:, :5] if where == "empty_cache" else ids[:, 5:7]
        handle = _raise_on_call(module, n, exc)
        try:
            with pytest.raises(exc):
                m(chunk, n_loops=3, kv_cache=cache)
        finally:
            handle.remove()
        _assert_same_state(before, _state(cache))
        if where == "empty_cache":
            assert len(cache) == 0
            m(ids[:, :5], n_loops=3, kv_cache=cache)
        got = [m(ids[:, 5:7], n_loops=3, kv_cache=cache), m(ids[:, 7:8], n_loops=3, kv_cache=cache)]
    assert_close("after the rollback", torch.cat(ref[1:], 1), torch.cat(got, 1), 1e-6)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_decode_plan_step_that_raises_leaves_the_cache_as_it_was(attn, monkeypatch):
    """forward's one-token CPU decode step (mythos.decode: no modules, no hooks) raising after a
    few layers' appends: the same rollback."""
    from mythos.cache import LayerCache

    m = _model(attn)
    ids = torch.randint(0, 97, (1, 6), device="cpu")
    m.cpu()
    with torch.no_grad():
        cache = {}
        m(ids[:, :5], n_loops=3, kv_cache=cache)
        want = m(ids[:, 5:], n_loops=3, kv_cache={k: _copy_layer(c) for k, c in cache.items()})
        before = _state(cache)
        real, calls = LayerCache.append_next, []

        def flaky(self, **new):
            calls.append(1)
            if len(calls) == 4:
                raise _Stop("stopped mid-step")
            return real(self, **new)

        monkeypatch.setattr(LayerCache, "append_next", flaky)
        with pytest.raises(_Stop):
            m(ids[:, 5:], n_loops=3, kv_cache=cache)
        assert len(calls) == 4, "the decode plan did not run"
        _assert_same_state(before, _state(cache))
        monkeypatch.setattr(LayerCache, "append_next", real)
        assert_close("decode after the rollback", want, m(ids[:, 5:], n_loops=3, kv_cache=cache), 1e-6)


def _copy_layer(c):
    from mythos.cache import LayerCache

    d = LayerCache(c.capacity, c.max_capacity, c.fixed)
    d.length, d.buffers = c.length, {n: b.clone() for n, b in c.buffers.items()}
    return d


def test_cache_whose_rollback_failed_is_refused(monkeypatch):
    """If the rollback itself fails (interrupted), the layers stay marked and the next call is
    refused with a message saying so; the first error is the one raised."""
    from mythos.cache import CacheWrite

    m = _model("mla")
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        cache = {}
        m(ids[:, :5], n_loops=2, kv_cache=cache)

        def broken(self, cache):
            raise KeyboardInterrupt

        monkeypatch.setattr(CacheWrite, "_roll_back", broken)
        handle = _raise_on_call(m.recurrent.block, 1)
        try:
            with pytest.raises(_Stop):
                m(ids[:, 5:], n_loops=2, kv_cache=cache)
        finally:
            handle.remove()
        with pytest.raises(mythos.CacheError, match="unusable"):
            m(ids[:, 5:], n_loops=2, kv_cache=cache)
        with pytest.raises(mythos.CacheError, match="unusable"):
            m(ids[:, 5:6], n_loops=2, kv_cache=cache, start_pos=5)


def test_start_pos_must_equal_the_cache_length():
    """4 tokens cached, then start_pos=0 (or anything but 4) is refused before any compute;
    omitted, it is the cache's length; an empty cache takes start_pos 0 (open-mythos's first
    call) and refuses another."""
    m = _model("gqa")
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        cache, ref = {}, {}
        m(ids[:, :4], n_loops=2, kv_cache=cache, start_pos=0)
        m(ids[:, :4], n_loops=2, kv_cache=ref)
        before = _state(cache)
        for bad in (0, 3, 5):
            with pytest.raises(mythos.CacheError, match=rf"start_pos \({bad}\) must equal .*\(4\)"):
                m(ids[:, 4:5], n_loops=2, kv_cache=cache, start_pos=bad)
        _assert_same_state(before, _state(cache))
        a = m(ids[:, 4:5], n_loops=2, kv_cache=cache, start_pos=4)
        b = m(ids[:, 4:5], n_loops=2, kv_cache=ref)
        assert torch.equal(a, b)
        with pytest.raises(mythos.CacheError, match="start_pos"):
            m(ids[:, :2], n_loops=2, kv_cache={}, start_pos=3)
        # without a cache start_pos stays a free RoPE offset
        assert torch.equal(m(ids[:, 2:4], n_loops=2), m(ids[:, 2:4], n_loops=2, start_pos=0))
        m(ids[:, 2:4], n_loops=2, start_pos=7)


@pytest.mark.parametrize("other,match", [
    (dict(attn_type="gqa"), r"MLA \(c_kv \[24\], k_rope \[6\]\).*GQA \(k \[2, 10\], v \[2, 10\]\)"),
    (dict(attn_type="mla", kv_lora_rank=20), r"c_kv \[24\].*c_kv \[20\]"),
    (dict(attn_type="mla", prelude_layers=1), "prelude_1"),
    (dict(attn_type="mla", coda_layers=3), "inconsistent"),
])
def test_cache_of_another_model_is_refused(other, match):
    """A cache filled by an MLA model, given to a GQA model (or one with another latent rank,
    or other layer counts): refused before any compute, naming what differs."""
    other = dict(other)
    a, b = _model("mla"), _model(other.pop("attn_type"), **other)
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        cache = {}
        a(ids, n_loops=2, kv_cache=cache)
        before = _state(cache)
        with pytest.raises(mythos.CacheError, match=match):
            b(ids[:, :1], n_loops=2, kv_cache=cache)
    _assert_same_state(before, _state(cache))


def test_inconsistent_or_foreign_cache_is_refused():
    """Layers at lengths no sequence of calls leaves, a missing layer, and open-mythos's own
    cache entries: refused with a CacheError."""
    m = _model("mla")
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        cache = {}
        m(ids, n_loops=3, kv_cache=cache)
        for mutate, match in ((lambda c: setattr(c["coda_1"], "length", 4), "coda_1"),
                              (lambda c: setattr(c["recurrent_loop_2"], "length", 6), "inconsistent"),
                              (lambda c: c.pop("prelude_0"), "inconsistent"),
                              (lambda c: c.pop("recurrent_loop_1"), "recurrent_loop_2"),
                              (lambda c: c.update(prelude_0={"k": torch.zeros(2, 5, 2, 10)}),
                               "not a mythos LayerCache")):
            broken = {k: _copy_layer(c) for k, c in cache.items()}
            mutate(broken)
            with pytest.raises(mythos.CacheError, match=match):
                m(ids[:, :1], n_loops=3, kv_cache=broken, start_pos=5)
        # a deeper call after shallower ones is consistent (loop 3 starts empty, as open-mythos)
        m(ids[:, :1], n_loops=4, kv_cache=cache)
        assert cache["recurrent_loop_3"].length == 1 and cache["recurrent_loop_0"].length == 6
        m(ids[:, :1], n_loops=2, kv_cache=cache)
