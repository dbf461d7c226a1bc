"""Bad input: clear errors naming the problem (TypeError for a wrong type, ValueError for a bad
value; ``mythos._validate``), raised before any compute or allocation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_kwargs

import mythos
from mythos import MythosConfig, OpenMythos
from mythos._validate import ArgumentTypeError, check_float, check_int


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


def test_unknown_moe_attribute_names_itself(model):
    """routed_experts is a read-only view (tests/test_dropin.py); a typo still raises."""
    assert len(model.recurrent.block.ffn.routed_experts) == model.cfg.n_experts
    with pytest.raises(AttributeError, match="no_such"):
        model.recurrent.block.ffn.no_such


# --------------------------------------------------------------------------- the one rule

_INT_FIELDS = ["vocab_size", "dim", "n_heads", "max_seq_len", "max_loop_iters", "n_experts",
               "n_experts_per_tok", "expert_dim", "lora_rank", "max_output_tokens"]
_MLA_FIELDS = ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"]
_NONNEG_FIELDS = ["prelude_layers", "coda_layers", "n_shared_experts"]


def _config_cases():
    """(attn_type, field, wrong-type value, out-of-range value) for every field."""
    cases = [("mla", f, 2.0, 0) for f in _INT_FIELDS + _MLA_FIELDS]
    cases += [("gqa", "n_kv_heads", "2", 0)]
    cases += [("mla", f, True, -1) for f in _NONNEG_FIELDS]
    cases += [("mla", "act_threshold", "0.5", 0.0), ("mla", "rope_theta", None, -1.0),
              ("mla", "rope_theta", True, math.inf), ("mla", "dropout", "0", 1.0),
              ("mla", "attn_type", 3, "mqa")]
    return cases


@pytest.mark.parametrize("attn,field,wrong_type,out_of_range", _config_cases())
def test_every_config_field_checked(attn, field, wrong_type, out_of_range):
    """Every field: a wrong type raises a TypeError, an out-of-range value a ValueError, both
    naming the field (attn_type has a set of values: its wrong type is a ValueError too)."""
    kw = tiny_kwargs(attn)
    with pytest.raises(TypeError if field != "attn_type" else ValueError, match=field):
        MythosConfig(**{**kw, field: wrong_type})
    with pytest.raises(ValueError, match=field):
        MythosConfig(**{**kw, field: out_of_range})


def test_config_takes_numpy_and_tensor_scalars_as_python_numbers():
    kw = tiny_kwargs("mla")
    cfg = MythosConfig(**{**kw, "dim": np.int64(60), "max_seq_len": torch.tensor(64),
                          "act_threshold": np.float32(0.5), "rope_theta": 10000})
    assert type(cfg.dim) is int and type(cfg.max_seq_len) is int and cfg.dim == 60
    assert type(cfg.act_threshold) is float and type(cfg.rope_theta) is float


def test_string_threshold_is_a_type_error_naming_the_field():
    with pytest.raises(TypeError, match="act_threshold") as e:
        MythosConfig(**tiny_kwargs("mla", act_threshold="0.5"))
    assert isinstance(e.value, ValueError)      # ArgumentTypeError: both, for older callers


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_infinite_threshold_runs_every_loop_as_open_mythos(om, attn):
    """act_threshold=inf: no position ever halts; open-mythos runs it, so does mythos."""
    from conftest import assert_close, make_pair

    a, b = make_pair(om, **tiny_kwargs(attn, act_threshold=math.inf))
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert_close("logits", a(ids, n_loops=3), b(ids, n_loops=3), 1e-4)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.int8, torch.float32])
def test_ids_of_other_dtypes_are_a_type_error(model, dtype):
    with pytest.raises(TypeError, match="input_ids.*int64 or int32"):
        model(torch.zeros(1, 3, dtype=dtype))
    with pytest.raises(TypeError, match="input_ids.*int64 or int32"):
        model.generate(torch.zeros(1, 3, dtype=dtype), 2)


def _call_cases():
    """(call, argument, wrong-type value, out-of-range value) for forward's and generate's
    arguments."""
    return [("forward", "n_loops", 2.0, -1), ("forward", "start_pos", 1.5, -1),
            ("generate", "max_new_tokens", 2.5, -1), ("generate", "n_loops", "2", -3),
            ("generate", "temperature", "1", -0.5), ("generate", "temperature", None, math.nan),
            ("generate", "top_k", 2.5, None), ("generate", "cuda_graph", 1, None),
            ("generate", "static", "yes", None), ("generate", "compiled", 0, None)]


@pytest.mark.parametrize("call,arg,wrong_type,out_of_range", _call_cases())
def test_every_call_argument_checked(model, call, arg, wrong_type, out_of_range):
    ids = torch.randint(0, 97, (1, 4))
    fn = model if call == "forward" else model.generate
    with pytest.raises(TypeError, match=arg):
        fn(ids, **{arg: wrong_type})
    if out_of_range is not None:
        with pytest.raises(ValueError, match=arg):
            fn(ids, **{arg: out_of_range})


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_zero_loops_means_the_configs_depth_as_open_mythos(om, attn):
    """open-mythos reads ``n_loops or cfg.max_loop_iters``: 0 runs the config's depth."""
    from conftest import assert_close, make_pair

    a, b = make_pair(om, **tiny_kwargs(attn))
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        ref = b(ids)
        assert_close("logits", a(ids, n_loops=0), b(ids, n_loops=0), 1e-4)
        torch.testing.assert_close(b(ids, n_loops=0), ref, rtol=0, atol=0)
        torch.testing.assert_close(b(ids, n_loops=np.int64(0)), ref, rtol=0, atol=0)
    assert torch.equal(b.generate(ids, 3, n_loops=0, top_k=1),
                       b.generate(ids, 3, n_loops=b.cfg.max_loop_iters, top_k=1))
    assert torch.equal(b.generate(ids, 3, n_loops=0, top_k=1, top_p=0.9, temperature=0),
                       b.generate(ids, 3, n_loops=None, top_k=1, top_p=0.9, temperature=0))


def test_generate_takes_numpy_integers_like_n_loops(model):
    ids = torch.randint(0, 97, (1, 4))
    out = model.generate(ids, np.int64(2), n_loops=np.int32(2), top_k=np.int64(1))
    assert torch.equal(out, model.generate(ids, 2, n_loops=2, top_k=1))
    # top_k <= 0 or None: no filter (open-mythos's ``if top_k > 0``)
    torch.manual_seed(0)
    a = model.generate(ids, 3, top_k=0)
    torch.manual_seed(0)
    assert torch.equal(a, model.generate(ids, 3, top_k=None))


def test_cache_capacity_checked_and_not_allocated():
    with pytest.raises(TypeError, match="capacity"):
        mythos.MythosCache(4.0)
    with pytest.raises(TypeError, match="capacity"):
        mythos.MythosCache("8")
    with pytest.raises(ValueError, match="capacity"):
        mythos.MythosCache(-1)
    big = mythos.MythosCache(np.int64(10 ** 15))       # nothing allocated until written
    assert big.capacity == 10 ** 15 and type(big.capacity) is int and len(big) == 0


@pytest.mark.parametrize("over,field", [(dict(max_seq_len=10 ** 12), "max_seq_len"),
                                        (dict(prelude_layers=10 ** 9), "prelude_layers"),
                                        (dict(vocab_size=10 ** 12), "vocab_size"),
                                        (dict(n_experts=10 ** 9, expert_dim=10 ** 3), "n_experts")])
def test_huge_sizes_refused_before_allocating(over, field):
    import time

    cfg = MythosConfig(**tiny_kwargs("mla", **over))       # the config itself is cheap
    t = time.perf_counter()
    with pytest.raises(ValueError, match=field):
        OpenMythos(cfg)
    assert time.perf_counter() - t < 1.0


def test_allocation_estimate_matches_the_model():
    from mythos.config import allocation_terms, check_allocation

    for attn in ("gqa", "mla"):
        cfg = MythosConfig(**tiny_kwargs(attn))
        m = OpenMythos(cfg)
        real = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
        est = sum(allocation_terms(cfg).values())
        assert 0.95 * real <= est <= 1.05 * real
        check_allocation(cfg, int(1.1 * real))
        with pytest.raises(ValueError, match="GiB"):
            check_allocation(cfg, int(0.5 * real))


def test_validate_helpers():
    assert check_int("x", np.int16(3), lo=0) == 3
    assert check_int("x", torch.tensor(3)) == 3
    assert check_int("x", None, none_ok=True) is None
    for bad in (True, np.bool_(True), torch.tensor(True), 3.0, "3", torch.tensor(3.0), None):
        with pytest.raises(ArgumentTypeError, match="x must be an int"):
            check_int("x", bad)
    with pytest.raises(ValueError, match=r"x must be an int in \[1, 4\], got 5"):
        check_int("x", 5, lo=1, hi=4)
    assert check_float("y", 2) == 2.0 and check_float("y", np.float16(0.5)) == 0.5
    assert check_float("y", math.inf, lo=0, inf_ok=True) == math.inf
    for bad in (True, "1", None, torch.tensor(1.0)):
        with pytest.raises(ArgumentTypeError, match="y must be a"):
            check_float("y", bad)
    for bad in (math.nan, math.inf, -math.inf, -1.0):
        with pytest.raises(ValueError, match="y must be a finite number >= 0"):
            check_float("y", bad, lo=0)
    with pytest.raises(ValueError, match=r"y must be a finite number in \[0, 1\)"):
        check_float("y", 1.0, lo=0, hi=1, hi_open=True)
