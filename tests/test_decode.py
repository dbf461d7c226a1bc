"""The planned CPU decode step (mythos.decode): bitwise the module path's values, every op
recorded, used by generate only where its settled decisions hold."""

from __future__ import annotations

import pytest
import torch
from conftest import split_forms_serve, tiny_kwargs

import mythos
import mythos_kernels as K
from mythos.cache import MythosCache
from mythos.decode import DecodePlan, decode_plan, why_not

pytestmark = pytest.mark.usefixtures("on_cpu")


def _model(seed=0, **over):
    torch.manual_seed(seed)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(**over))).eval()
    with torch.no_grad():       # non-trivial LTI / LoRA / router bias / norm weights
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.recurrent.block.ffn.router_bias.normal_(0, 0.05)
    return m


def _compare_steps(m, B, prompt, steps, n_loops, seed=0):
    """Prefill two caches alike, then decode ``steps`` tokens through the modules and through a
    plan: hidden states, caches and routing bitwise equal at every step."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.cfg.vocab_size, (B, prompt + steps), generator=g)
    caches = [MythosCache(prompt + steps) for _ in range(2)]
    with torch.inference_mode(), K.weights_unchanged():
        for c in caches:
            m.hidden_states(ids[:, :prompt], n_loops, c, 0)
        plan = DecodePlan(m, B, n_loops)
        for p in range(prompt, prompt + steps):
            tok = ids[:, p:p + 1]
            ref = m.hidden_states(tok, n_loops, caches[0], p)[:, -1]
            ref_idx = m.recurrent.block.ffn._last_idx.clone()
            m.recurrent.block.ffn._last_idx = None
            out = plan.hidden(tok, caches[1], p)
            assert torch.equal(out, ref), f"step at position {p}: hidden differs"
            assert torch.equal(m.recurrent.block.ffn._last_idx, ref_idx)
        for key, lc in caches[0].items():
            other = caches[1][key]
            assert other.length == lc.length
            for name, buf in lc.buffers.items():
                assert torch.equal(other.buffers[name], buf), f"cache {key}.{name} differs"


@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("B", [1, 3, 9])
def test_plan_matches_the_modules_bitwise(attn, B, cpu_forms):
    # n_loops above max_loop_iters (LoRA scale index clamped), odd sizes, two shared experts
    m = _model(attn_type=attn, n_shared_experts=2, prelude_layers=2, coda_layers=1)
    _compare_steps(m, B, prompt=5, steps=3, n_loops=m.cfg.max_loop_iters + 2)


@pytest.mark.parametrize("over", [
    dict(n_shared_experts=0, prelude_layers=0, coda_layers=0),        # bare recurrent block
    dict(n_experts=5, n_experts_per_tok=5, n_heads=1, n_kv_heads=1),  # every expert, one head
    # a latent so small that the first steps decompress K/V (absorbed is not cheaper yet)
    dict(kv_lora_rank=2, qk_nope_head_dim=1, v_head_dim=1, qk_rope_head_dim=2, n_heads=3),
])
def test_plan_matches_across_configs(over, cpu_forms):
    m = _model(seed=1, **over)
    _compare_steps(m, 2, prompt=1, steps=4, n_loops=2)


def test_plan_at_mid_sizes_takes_the_cpu_forms(monkeypatch):
    """Sizes past the CPU forms' real floors (split products, packed shared experts, expert
    pairs; B = 1 takes the plan's own view-only latent attention): still bitwise."""
    split_forms_serve(monkeypatch)
    kw = dict(vocab_size=300, dim=256, n_heads=4, attn_type="mla", kv_lora_rank=64,
              q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
              n_experts=16, n_experts_per_tok=3, expert_dim=96, n_shared_experts=2,
              max_loop_iters=3, max_seq_len=64, act_threshold=100.0)
    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    with torch.inference_mode():
        probe = torch.empty(1, 1, 256)
        assert K.cpu.linear._split_rows_ok(probe, m.recurrent.block.attn.q_down.weight)
    for B in (1, 2):
        _compare_steps(m, B, prompt=6, steps=3, n_loops=3)


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_generate_with_and_without_plan(attn, monkeypatch):
    m = _model(attn_type=attn)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 4))
    calls = []
    hidden = DecodePlan.hidden
    monkeypatch.setattr(DecodePlan, "hidden", lambda self, *a: calls.append(1) or hidden(self, *a))
    outs, counts = [], []
    for env in ("1", "0"):
        monkeypatch.setenv("MYTHOS_CPU_DECODE_PLAN", env)
        # n_loops=None: the config's max_loop_iters, as in the module path
        for kw in (dict(top_k=5, n_loops=3), dict(temperature=0, n_loops=None)):
            torch.manual_seed(3)
            K.reset_dispatch_counts()
            outs.append(m.generate(ids, 6, **kw))
            counts.append(K.dispatch_counts())
    assert len(calls) == 2 * 5                               # 5 planned steps per plan-on call
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    assert counts[0] == counts[2] and counts[1] == counts[3]  # every op recorded as before
    assert counts[1][("lti_act_step", "reference")] == 6 * m.cfg.max_loop_iters


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_forward_decode_with_and_without_plan(attn, monkeypatch, cpu_forms):
    """forward with one token per row onto a filled cache (a dict growing by doubling, or a
    MythosCache) takes the plan: logits, caches and dispatch record as without it. A call whose
    loops the cache does not hold yet (more n_loops than the prefill's) runs the modules."""
    m = _model(attn_type=attn)
    calls = []
    hidden = DecodePlan.hidden
    monkeypatch.setattr(DecodePlan, "hidden", lambda self, *a: calls.append(1) or hidden(self, *a))
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12))
    runs = {}
    for env in ("1", "0"):
        monkeypatch.setenv("MYTHOS_CPU_DECODE_PLAN", env)
        for kind in ("dict", "fixed"):
            cache = {} if kind == "dict" else MythosCache(12)
            K.reset_dispatch_counts()
            with torch.no_grad():
                outs = [m(ids[:, :5], n_loops=2, kv_cache=cache)]
                outs += [m(ids[:, p:p + 1], n_loops=2, kv_cache=cache, start_pos=p)
                         for p in range(5, 11)]
                outs.append(m(ids[:, 11:], n_loops=3, kv_cache=cache, start_pos=11))
            runs[env, kind] = outs, K.dispatch_counts(), cache
    assert len(calls) == 2 * 6                    # the 6 single-token calls, both caches
    for kind in ("dict", "fixed"):
        (a, ca, cache_a), (b, cb, cache_b) = runs["1", kind], runs["0", kind]
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and ca == cb
        for key, lc in cache_b.items():
            assert all(torch.equal(cache_a[key].buffers[n], buf) for n, buf in lc.buffers.items())


def test_plan_refused_where_its_decisions_would_not_hold(monkeypatch):
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 3))
    with torch.no_grad():
        assert why_not(m, ids) is None
        assert isinstance(decode_plan(m, 1, 2, ids), DecodePlan)
        monkeypatch.setenv("MYTHOS_CPU_DECODE_PLAN", "0")
        assert "MYTHOS_CPU_DECODE_PLAN" in why_not(m, ids)
        monkeypatch.delenv("MYTHOS_CPU_DECODE_PLAN")
        h = m.recurrent.block.attn.register_forward_hook(lambda *a: None)
        assert "hooks" in why_not(m, ids)
        h.remove()
        with K.use_backend("triton"):
            assert "triton" in why_not(m, ids)
        with K.use_backend("reference"):                  # only the plain math
            assert "reference" in why_not(m, ids)
        with K.use_backend("cpu"):
            assert why_not(m, ids) is None
        m.train()
        assert why_not(m, ids) is None                      # dropout 0: train mode is the same
        d = _model(dropout=0.1).train()
        assert "dropout" in why_not(d, ids)
        assert "fp32" in why_not(_model().double(), ids)
    assert "autograd" in why_not(m, ids)                    # grad enabled, trainable weights
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in why_not(m, ids)


def test_swapped_or_overridden_modules_skip_the_plan(monkeypatch):
    """A submodule of another class (an adapter wrapping a Linear, say) or a forward set on an
    instance is not what a plan computes: generate then runs the modules, whose output shows
    the change."""
    from mythos.model import Linear

    class Scaled(Linear):                        # e.g. an adapter library's wrapper
        def forward(self, x):
            return -3 * super().forward(x)

    ids = torch.randint(0, 97, (1, 3))
    calls = []
    hidden = DecodePlan.hidden
    monkeypatch.setattr(DecodePlan, "hidden", lambda self, *a: calls.append(1) or hidden(self, *a))

    def gen(m):            # sampled over the whole vocabulary: any change of the logits shows
        torch.manual_seed(0)
        return m.generate(ids, 8, n_loops=2, top_k=0)

    gen(_model())
    assert calls
    calls.clear()
    for edit in ("swap", "instance_forward"):
        m = _model()
        q = m.recurrent.block.attn.wo
        if edit == "swap":
            new = Scaled(q.in_features, q.out_features, bias=False)
            new.weight = q.weight
            m.recurrent.block.attn.wo = new
        else:
            q.forward = lambda x, q=q: -3 * Linear.forward(q, x)
        with torch.no_grad():
            assert "recurrent.block.attn.wo" in why_not(m, ids)
        monkeypatch.setenv("MYTHOS_CPU_DECODE_PLAN", "0")
        ref = gen(m)
        monkeypatch.delenv("MYTHOS_CPU_DECODE_PLAN")
        assert torch.equal(gen(m), ref) and not calls
        with pytest.raises(AssertionError, match="hidden differs"):
            _compare_steps(m, 1, 3, 1, 2)       # a plan forced here would miss the edit
        calls.clear()
    class Sub(mythos.OpenMythos):
        def hidden_states(self, *a, **k):
            return super().hidden_states(*a, **k)

    with torch.no_grad():
        assert "hidden_states" in why_not(Sub(mythos.MythosConfig(**tiny_kwargs())).eval(), ids)
        m = _model()
        m.head = torch.nn.Linear(60, 97, bias=False)      # the head is not in the plan
        assert why_not(m, ids) is None


def test_a_forward_replaced_on_its_class_skips_the_plan(monkeypatch):
    """A module class's forward replaced after import (a patching library, say) is what the
    model runs, so no plan runs in its place."""
    from mythos.modules import LTIInjection

    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 3))
    with torch.no_grad():
        assert why_not(m, ids) is None
        monkeypatch.setattr(LTIInjection, "forward", lambda self, h, e, out: out)
        assert "recurrent.injection" in why_not(m, ids)


def test_generate_with_a_hook_skips_the_plan(monkeypatch):
    m = _model()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 3))
    monkeypatch.setattr(DecodePlan, "hidden", lambda *a: pytest.fail("plan used despite a hook"))
    seen = []
    m.recurrent.block.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    m.generate(ids, 3, n_loops=2)
    assert len(seen) == 2 * 3            # prefill + 2 decode steps, 2 loops each


def test_append_next_is_append():
    """The same writes, views and errors as append, whether the buffers can take the new
    positions (the one-pass path) or not (growth, dtype widening, a new name, over capacity)."""
    from mythos.cache import CacheCapacityError, LayerCache

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4)
    for fixed, cap in ((True, 8), (False, 64)):
        caches = [LayerCache(cap if fixed else 0, cap, fixed) for _ in range(2)]
        for c in caches:
            c.append(k=x)
        for y in (torch.randn(2, 1, 4), torch.randn(2, 2, 4).double(), torch.randn(2, 1, 4)):
            a, b = caches[0].append(k=y), caches[1].append_next(k=y)
            assert caches[0].length == caches[1].length and torch.equal(a["k"], b["k"])
        with pytest.raises(CacheCapacityError):
            caches[1].append_next(k=torch.randn(2, cap, 4))
        assert caches[1].length == caches[0].length
        with pytest.raises(ValueError, match="batch size"):
            caches[1].append_next(k=torch.randn(3, 1, 4))
    c = LayerCache(8, 8, True)
    c.append(k=x)
    v = c.append_next(k=x[:, :1], v=x[:, :1])       # a name the cache did not hold: append's way
    assert set(v) == {"k", "v"} and c.length == 4


@pytest.mark.parametrize("rows", [1, 3, 9, 70])
@pytest.mark.parametrize("shape", [(64, 48), (300, 256), (1024, 512)])
def test_dense_plan_is_dense(rows, shape):
    w = torch.randn(*shape)
    b = torch.randn(shape[0])
    x = torch.randn(rows, 1, shape[1])
    with torch.inference_mode():
        for bias in (None, b):
            assert torch.equal(K.cpu.linear.dense_plan(w, bias, rows)(x), K.dense(x, w, bias))
        x2 = x[:, 0]
        assert torch.equal(K.cpu.linear.dense_plan(w, None, rows, lead=1)(x2), K.dense(x2, w))


def test_swiglu_plan_is_the_packed_sum():
    torch.manual_seed(0)
    S, H, D = 2, 96, 256
    gates = [torch.randn(H, D) for _ in range(S)]
    ups = [torch.randn(H, D) for _ in range(S)]
    downs = [torch.randn(D, H) for _ in range(S)]
    x = torch.randn(3, D)
    with torch.no_grad():
        run = K.cpu.linear.swiglu_plan(gates, ups, downs, rows=3)
        assert run is not None
        assert torch.equal(run(x), K.shared_swiglu_packed(x, gates, ups, downs))
        small = [t[:4, :8].contiguous() for t in gates]      # below the packing floor
        assert K.cpu.linear.swiglu_plan(small, small, [t.t().contiguous() for t in small], 3) is None


def test_lti_step_with_a_given_A():
    from mythos_kernels.recurrent import get_A, lti_act_step_reference

    torch.manual_seed(0)
    B, T, D = 2, 3, 10
    h, e, out = (torch.randn(B, T, D) for _ in range(3))
    args = (h, e, out, torch.randn(B, T, D), torch.rand(B, T) * 0.5, torch.randn(D),
            torch.randn(1), torch.randn(D), torch.randn(1, D), torch.randn(1), 0.9)
    A = get_A(args[5], args[6])
    for x, y in zip(lti_act_step_reference(*args), lti_act_step_reference(*args, A=A)):
        assert torch.equal(x, y)
