"""mythos.sampling.multinomial_one against torch.multinomial: the same tokens and the same
generator state afterwards, torch's errors on bad probabilities, torch's op where the fast form
does not apply."""

from __future__ import annotations

import pytest
import torch

from mythos import sampling
from mythos.model import sample

# CPU draws (on a GPU machine the suite's default device is CUDA)
pytestmark = pytest.mark.usefixtures("on_cpu")


def _probs(g: torch.Generator, B: int, V: int, top_k: int, scale: float) -> torch.Tensor:
    logits = torch.randn(B, V, generator=g) * scale
    if top_k:
        v, _ = logits.topk(min(top_k, V))
        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
    return torch.softmax(logits, -1)


@pytest.fixture
def fast(monkeypatch):
    """The fast form enabled, its probe passed, and torch.multinomial made to fail the test if
    the fast form hands a draw to it."""
    monkeypatch.setenv("MYTHOS_CPU_FAST_MULTINOMIAL", "1")
    assert sampling.exact(), "this torch build's multinomial is not the documented draw"
    real = torch.multinomial

    def spy(*a, **k):
        raise AssertionError("torch.multinomial called where the fast form should serve")

    monkeypatch.setattr(torch, "multinomial", spy)
    return real


@pytest.mark.parametrize("B,V", [(1, 32000), (3, 1000), (2, 7), (1, 1), (5, 2), (2, 50257)])
@pytest.mark.parametrize("top_k", [0, 1, 50])
def test_same_tokens_and_generator_state(fast, B, V, top_k):
    for seed in range(6):
        p = _probs(torch.Generator().manual_seed(seed), B, V, top_k, scale=0.5 + seed)
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            want = fast(p, 1, generator=ga)
            got = sampling.multinomial_one(p, generator=gb)
            assert got.dtype == torch.int64 and got.shape == (B, 1)
            assert torch.equal(got, want)
        assert torch.equal(ga.get_state(), gb.get_state())


def test_default_generator_stream(fast):
    """sample() draws from the default generator as torch.multinomial would: same tokens, and
    the default generator's next numbers agree afterwards."""
    p = _probs(torch.Generator().manual_seed(0), 2, 32000, 50, 2.0)
    torch.manual_seed(7)
    want = [fast(p, 1) for _ in range(4)]
    after_want = torch.rand(4)
    torch.manual_seed(7)
    got = [sampling.multinomial_one(p) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert torch.equal(torch.rand(4), after_want)


def test_sample_temperature_top_k(fast):
    """mythos.model.sample with temperature and top-k: open-mythos's rule with torch's draw."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5000, generator=g) * 4
    for temperature, top_k in ((1.0, 50), (0.7, 0), (1.3, 1), (2.0, 4999)):
        ref = logits / temperature
        if top_k > 0:
            v, _ = ref.topk(min(top_k, ref.shape[-1]))
            ref = ref.masked_fill(ref < v[:, -1:], float("-inf"))
        torch.manual_seed(11)
        want = fast(torch.softmax(ref, -1), 1).squeeze(-1)
        torch.manual_seed(11)
        assert torch.equal(sample(logits, temperature, top_k), want)


@pytest.mark.parametrize("bad", ["nan", "inf", "negative", "zero_row"])
def test_bad_probabilities_raise_torchs_error_before_drawing(fast, bad):
    p = _probs(torch.Generator().manual_seed(1), 2, 64, 0, 1.0)
    if bad == "nan":
        p[1, 3] = float("nan")
    elif bad == "inf":
        p[0, 0] = float("inf")
    elif bad == "negative":
        p[0, 5] = -0.1
    else:
        p[1] = 0
    with pytest.raises(RuntimeError) as want:
        fast(p, 1)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError) as got:
        sampling.multinomial_one(p)
    assert str(got.value) == str(want.value)
    assert torch.equal(torch.get_rng_state(), state)          # nothing drawn


def _count_torch_calls(monkeypatch):
    calls = []
    real = torch.multinomial

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch, "multinomial", spy)
    return calls, real


@pytest.mark.parametrize("case", ["float64", "strided", "one_dim", "switched_off", "probe_failed"])
def test_torchs_op_serves_elsewhere(monkeypatch, case):
    p = _probs(torch.Generator().manual_seed(2), 3, 300, 20, 1.0)
    if case == "float64":
        p = p.double()
    elif case == "strided":
        p = p.t().contiguous().t()
    elif case == "one_dim":
        p = p[0]
    elif case == "switched_off":
        monkeypatch.setenv("MYTHOS_CPU_FAST_MULTINOMIAL", "0")
    else:
        monkeypatch.setattr(sampling, "_EXACT", [False])
    calls, real = _count_torch_calls(monkeypatch)
    torch.manual_seed(5)
    got = sampling.multinomial_one(p)
    torch.manual_seed(5)
    assert torch.equal(got, real(p, 1))
    assert calls == [1]


def test_probe_catches_a_different_draw(monkeypatch):
    """exact() compares with torch.multinomial itself: a draw that differs (here the
    exponential sample without its sign) makes it answer False."""
    monkeypatch.setattr(sampling, "_EXACT", [])
    monkeypatch.setattr(sampling, "_draw", lambda p, g: torch.div(
        p, torch.empty(p.shape, dtype=torch.float64).uniform_(generator=g).log1p_().float()
    ).argmax(-1, keepdim=True))
    assert sampling.exact() is False


@pytest.mark.parametrize("shape", [(1_000_003,), (7, 50257), (1,)])
def test_exponential_draw_bitwise(shape):
    """The draw behind the tokens: every value equals exponential_'s (a perturbation of q that
    rarely changes a token would pass the token tests; this one would not), same state after."""
    for seed in (0, 1):
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = torch.empty(shape).exponential_(generator=ga)
        got = sampling._exponential(shape, gb)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want)
        assert torch.equal(ga.get_state(), gb.get_state())


def test_default_device_elsewhere(monkeypatch):
    """The probe and the draw make their tensors on the CPU whatever the default device (here
    "meta", standing for the GPU suite's CUDA default): a CPU draw stays exact."""
    monkeypatch.setattr(sampling, "_EXACT", [])
    p = _probs(torch.Generator().manual_seed(4), 2, 3000, 50, 1.0)
    torch.manual_seed(8)
    want = torch.multinomial(p, 1)
    prev = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        assert sampling.exact()
        torch.manual_seed(8)
        got = sampling.multinomial_one(p)
    finally:
        torch.set_default_device(prev)
    assert got.device.type == "cpu" and torch.equal(got, want)


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
@pytest.mark.parametrize("temperature,top_k", [(0, 0), (1.0, 0), (0.8, 5)])
def test_non_finite_logits_never_become_tokens(bad, temperature, top_k):
    """One rule for greedy and sampled decoding: a row whose maximum is not finite (a NaN or a
    +inf in it, or only -inf) raises NonFiniteLogitsError naming the row, before any draw."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    if bad == "nan":
        logits[1, 7] = float("nan")
    elif bad == "posinf":
        logits[1, 0] = float("inf")
    else:
        logits[1] = float("-inf")
    state = torch.get_rng_state()
    with pytest.raises(sampling.NonFiniteLogitsError, match=r"row\(s\) \[1\]"):
        sample(logits, temperature, top_k)
    assert torch.equal(torch.get_rng_state(), state)
    assert issubclass(sampling.NonFiniteLogitsError, RuntimeError)


def test_some_neginf_logits_still_decode():
    """-inf on some entries (a masked vocabulary) is finite enough: greedy takes the argmax."""
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    logits[:, ::2] = float("-inf")
    assert torch.equal(sample(logits, 0, 0), logits.argmax(-1))
    assert sample(logits, 1.0, 0).remainder(2).eq(1).all()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_generate_with_a_nan_weight_raises(static, temperature):
    """A NaN in a weight: generate raises for greedy decoding as for sampling (greedy returned
    token 0 everywhere before)."""
    from conftest import tiny_kwargs

    import mythos

    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    with torch.no_grad():
        m.coda[0].ffn.down.weight[3, 5] = float("nan")
    with pytest.raises(sampling.NonFiniteLogitsError):
        m.generate(torch.randint(0, 97, (2, 4)), max_new_tokens=3, n_loops=2,
                   temperature=temperature, static=static)


# ---------------------------------------------------------------- top-p, min-p
def _top_p_slow(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Row by row: keep tokens in descending probability order until their sum reaches top_p."""
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        p = torch.softmax(logits[r], -1)
        total = 0.0
        for i in p.argsort(descending=True).tolist():
            out[r, i] = logits[r, i]
            total += float(p[i])
            if total >= top_p:
                break
    return out


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.77, 0.999])
def test_top_p_filter_against_slow(top_p):
    g = torch.Generator().manual_seed(int(top_p * 1000))
    logits = torch.randn(5, 13, generator=g) * 2
    torch.testing.assert_close(sampling.top_p_filter(logits, top_p), _top_p_slow(logits, top_p))
    assert torch.equal(sampling.top_p_filter(logits, 1.0), logits)
    assert torch.equal(sampling.top_p_filter(logits, None), logits)


@pytest.mark.parametrize("min_p", [0.01, 0.2, 0.9])
def test_min_p_filter_against_definition(min_p):
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(3)) * 2
    p = torch.softmax(logits, -1)
    keep = p >= min_p * p.amax(-1, keepdim=True)
    out = sampling.min_p_filter(logits, min_p)
    assert torch.equal(torch.isfinite(out), keep)
    assert torch.equal(out[keep], logits[keep])
    assert torch.equal(sampling.min_p_filter(logits, 0.0), logits)


def test_sample_filtered_defaults_are_sample():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    for temperature, top_k in ((0.0, 0), (0.7, 0), (1.3, 5)):
        torch.manual_seed(9)
        a = sample(logits, temperature, top_k)
        torch.manual_seed(9)
        b = sampling.sample_filtered(logits, temperature, top_k, None, None)
        torch.manual_seed(9)
        c = sampling.sample_filtered(logits, temperature, top_k, 1.0, 0.0)
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("name,value", [("top_p", -0.1), ("top_p", 0.0), ("top_p", 1.01),
                                        ("top_p", float("nan")), ("min_p", -0.5),
                                        ("min_p", 1.5), ("min_p", float("nan")),
                                        ("min_p", float("inf"))])
def test_top_p_min_p_bad_values(name, value):
    logits = torch.randn(2, 7)
    with pytest.raises(ValueError, match=name):
        sampling.sample_filtered(logits, 1.0, 0, **{name: value})
    with pytest.raises(TypeError, match=name):
        sampling.sample_filtered(logits, 1.0, 0, **{name: "0.5"})
