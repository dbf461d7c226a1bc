"""Shared test helpers: open-mythos loading, tiny configs, relative-error assertions."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from _openmythos import load_open_mythos  # noqa: E402

try:  # HYPOTHESIS_PROFILE=noshrink: report the first failing example without shrinking it
    from hypothesis import Phase
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse,
                                                       Phase.generate], print_blob=True)
    if os.environ.get("HYPOTHESIS_PROFILE"):
        _hyp_settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
except ImportError:  # pragma: no cover - hypothesis is a dev extra
    pass

# On a machine with a CUDA GPU the whole suite runs there (kernels compiled, interpreter off):
# new tensors default to the GPU. Without one, tensors stay on the CPU and kernel tests run through
# the Triton interpreter (TRITON_INTERPRET=1). MYTHOS_TEST_DEVICE overrides the choice.
DEVICE = torch.device(os.environ.get("MYTHOS_TEST_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
if DEVICE.type == "cuda":
    torch.set_default_device(DEVICE)


# Several test processes (pytest -n N, pytest-xdist) share the cores: one torch thread each, as
# OpenMP thread pools of processes sharing cores wait on one another at every parallel region.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(1)


# Where Triton kernels can run in this session: the GPU, else the CPU through the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else (
    "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else None)
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None, reason="needs a GPU or TRITON_INTERPRET=1")


def gen(seed: int) -> torch.Generator:
    """A seeded generator on the default device (random ops with ``generator=`` need one of
    their own device: CUDA when the suite runs on a GPU)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


@pytest.fixture
def on_cpu():
    """New tensors default to the CPU for this test (tests of the CPU-only inference forms; on a
    GPU machine the suite's default device is CUDA)."""
    prev = torch.get_default_device()
    torch.set_default_device("cpu")
    try:
        yield torch.device("cpu")
    finally:
        torch.set_default_device(prev)


@pytest.fixture
def device() -> torch.device:
    """The device the suite runs on."""
    return DEVICE


@pytest.fixture(autouse=True)
def _restore_cpu_variants():
    """Every CPU variant back to its default after the test (tests switch them by name with
    ``mythos_kernels.set_cpu_variant``; the defaults follow the environment variables)."""
    import mythos_kernels as K

    yield
    K.reset_cpu_variants()


@pytest.fixture(params=["size-floors", "every-cpu-form"])
def cpu_forms(request, monkeypatch):
    """Run a model test twice: with the CPU inference forms' real weight-size floors (tiny test
    models then take the plain products), and with the floors at 1 so that every CPU form (split
    products, packing, expert pairs, split segments, oneDNN) serves the tiny model too."""
    if request.param == "every-cpu-form":
        import importlib
        lin = importlib.import_module("mythos_kernels.cpu.linear")
        moe = importlib.import_module("mythos_kernels.cpu.moe")
        monkeypatch.setattr(lin, "SPLIT_MIN_WEIGHT", 1)
        monkeypatch.setattr(lin, "ONEDNN_MIN_WEIGHT", 1)
        monkeypatch.setattr(moe, "SPLIT_MIN_EXPERT", 1)
        split_forms_serve(monkeypatch)
    return request.param


def split_forms_serve(monkeypatch) -> None:
    """The two-core split forms serve whatever torch's thread count (they need two threads to
    be chosen; their numbers do not depend on it): a test run with one thread per worker
    (pytest -n) covers them too."""
    import importlib

    monkeypatch.setattr(importlib.import_module("mythos_kernels.cpu.linear"), "two_threads",
                        lambda: True)


@pytest.fixture(scope="session")
def om():
    """The open_mythos 0.5.0 module (tests that need it skip when it is not installed)."""
    mod = load_open_mythos()
    if mod is None:
        pytest.skip("open-mythos 0.5.0 is not installed (pip install --no-deps open-mythos==0.5.0)")
    return mod


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives inf)."""
    ref, out = ref.double(), out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# relative-error tolerance per dtype, for comparisons of one computation summed in another order
DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float | torch.dtype) -> None:
    """``out`` within ``tol`` relative error (:func:`rel_err`) of ``ref``; a dtype as ``tol``
    takes that dtype's tolerance (``DTYPE_TOL``)."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if isinstance(tol, torch.dtype):
        tol = DTYPE_TOL[tol]
    err = rel_err(ref, out)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def spy(monkeypatch, mod, name: str) -> list[str]:
    """Record calls of ``mod.<name>`` (still running it): the list grows by ``name`` per call."""
    calls: list[str] = []
    real = getattr(mod, name)

    def wrapped(*a, **k):
        calls.append(name)
        return real(*a, **k)

    monkeypatch.setattr(mod, name, wrapped)
    return calls


def tiny_kwargs(attn_type: str = "mla", **over) -> dict:
    """A small config with odd sizes (non-powers of two everywhere)."""
    kw = dict(vocab_size=97, dim=60, n_heads=6, n_kv_heads=2, max_seq_len=64, max_loop_iters=4,
              prelude_layers=1, coda_layers=1, attn_type=attn_type, kv_lora_rank=24,
              q_lora_rank=20, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=14, n_experts=7,
              n_shared_experts=1, n_experts_per_tok=3, expert_dim=12, act_threshold=0.99,
              lora_rank=3, rope_theta=10000.0)
    kw.update(over)
    return kw


def perturbed(model, scale: float = 0.1):
    """``model`` in eval mode with every parameter moved by N(0, scale) and the router bias drawn
    (non-trivial LTI / LoRA / router bias / norm weights)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        model.recurrent.block.ffn.router_bias.normal_(0, 0.05)
    return model.eval()


def tiny_model(seed: int = 0, scale: float = 0.1, **over):
    """A mythos model of ``tiny_kwargs(**over)`` with perturbed weights, seeded."""
    import mythos

    torch.manual_seed(seed)
    return perturbed(mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs(**over))), scale)


@pytest.fixture
def one_cpu_thread(on_cpu):
    """CPU tensors, one thread (on a shared 2-core machine a thread pool mostly waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pair(om, seed: int = 0, perturb: float = 0.1, **kw):
    """(open-mythos model, mythos model) with identical random weights, eval mode."""
    import mythos

    torch.manual_seed(seed)
    a = perturbed(om.OpenMythos(om.MythosConfig(**kw)), perturb)
    b = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.fixture
def no_cpu_size_floors(monkeypatch):
    """Tests of the CPU forms on small odd shapes: the forms' weight-size floors lowered so that
    those shapes take the forms under test (``test_*_size_floor*`` restore them), and the split
    forms on whatever the machine's thread count."""
    import importlib

    L = importlib.import_module("mythos_kernels.cpu.linear")
    M = importlib.import_module("mythos_kernels.cpu.moe")
    monkeypatch.setattr(L, "SPLIT_MIN_WEIGHT", 1)
    monkeypatch.setattr(L, "ONEDNN_MIN_WEIGHT", 1)
    monkeypatch.setattr(M, "SPLIT_MIN_EXPERT", 1)
    monkeypatch.setattr(L, "two_threads", lambda: True)


def rand(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """A fresh normal tensor of ``shape`` times ``scale``, in ``dtype``."""
    return (torch.randn(*shape) * scale).to(dtype)
