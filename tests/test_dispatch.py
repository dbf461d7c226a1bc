"""The dispatch point: backend switch, forced-triton errors, dispatch record."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch

import mythos_kernels as K
from mythos_kernels import _dispatch


def test_reference_backend_records_reference():
    K.reset_dispatch_counts()
    x = torch.randn(3, 5, device="cpu")
    with K.use_backend("reference"):
        assert _dispatch.choose("some_op", x) == "reference"
    assert K.dispatch_counts() == {("some_op", "reference"): 1}
    K.reset_dispatch_counts()
    assert K.dispatch_counts() == {}


def test_auto_uses_reference_for_cpu_tensors():
    with K.use_backend("auto"):
        assert _dispatch.choose("op", torch.randn(2, device="cpu")) == "reference"


def test_op_without_kernel_uses_reference_even_when_forced():
    with K.use_backend("triton"):
        assert _dispatch.choose("op", torch.randn(2, device="cpu"), has_kernel=False) == "reference"


def test_forced_triton_raises_when_kernel_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with K.use_backend("triton"):
        with pytest.raises(K.BackendUnavailable, match="TRITON_INTERPRET"):
            _dispatch.choose("op", torch.randn(2, device="cpu"))
        with pytest.raises(K.BackendUnavailable, match="too large"):
            _dispatch.choose("op", torch.randn(2, device="cpu"), supported="D too large")


def test_forced_triton_runs_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not K.triton_available():
        pytest.skip("triton not installed")
    with K.use_backend("triton"):
        assert _dispatch.choose("op", torch.randn(2, device="cpu")) == "triton"


def test_nested_context_and_set_backend():
    K.set_backend("reference")
    try:
        assert K.get_backend() == "reference"
        with K.use_backend("triton"):
            assert K.get_backend() == "triton"
        assert K.get_backend() == "reference"
    finally:
        K.set_backend(None)


def test_environment_variable_selects_backend():
    code = "import mythos_kernels as K; print(K.get_backend())"
    env = dict(os.environ, MYTHOS_BACKEND="reference", PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "reference", out.stderr
    env["MYTHOS_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "MYTHOS_BACKEND must be one of" in out.stderr


def test_model_records_every_op():
    from conftest import tiny_kwargs

    import mythos

    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
    K.reset_dispatch_counts()
    with K.use_backend("reference"), torch.no_grad():   # the plain math only, on every op
        m(torch.randint(0, 97, (1, 5)), n_loops=2)
        cache = {}
        m(torch.randint(0, 97, (1, 5)), n_loops=2, kv_cache=cache)
        m(torch.randint(0, 97, (1, 1)), n_loops=2, kv_cache=cache, start_pos=5)
    ops = {op for op, impl in K.dispatch_counts()}
    assert {"loop_input", "lti_act_step", "moe_route", "moe_experts", "attention",
            "mla_decompress", "rms_norm", "rope", "mla_decode_attention"} <= ops
    assert all(impl == "reference" for _, impl in K.dispatch_counts())


def test_moe_expert_counts_of_last_forward():
    from conftest import tiny_kwargs

    import mythos

    m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla", n_experts_per_tok=3))).eval()
    ffn = m.recurrent.block.ffn
    assert ffn.last_counts is None
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        m(ids, n_loops=1)
        x = m.recurrent.block.ffn_norm(torch.randn(2, 5, 60, device=ids.device))
        ffn(x)
    counts = ffn.last_counts
    assert counts.shape == (7,) and int(counts.sum()) == 2 * 5 * 3
    ref = torch.bincount(ffn._last_idx.reshape(-1).cpu(), minlength=7)
    assert torch.equal(counts.cpu(), ref)


# ---- the backend switch across threads and asyncio tasks ----------------------------------------

def _run_threads(targets) -> None:
    """Run each target in its own thread; re-raise the first failure here."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported in the main thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_use_backend_blocks_belong_to_their_thread(monkeypatch):
    """Threads enter, nest and leave blocks in lockstep (a barrier between every step): each
    sees only its own choices, and, outside them, the process default."""
    monkeypatch.delenv("MYTHOS_BACKEND", raising=False)
    plans = [("reference", "triton"), ("triton", "auto"), ("auto", "reference"), ("reference", "reference")]
    barrier = threading.Barrier(len(plans), timeout=30)

    def worker(outer: str, inner: str):
        def run():
            assert K.get_backend() == "auto"
            barrier.wait()
            with K.use_backend(outer):
                barrier.wait()
                assert K.get_backend() == outer
                with K.use_backend(inner):
                    barrier.wait()
                    assert K.get_backend() == inner
                barrier.wait()
                assert K.get_backend() == outer
            barrier.wait()
            assert K.get_backend() == "auto"
        return run

    for _ in range(3):
        _run_threads([worker(*p) for p in plans])


def test_thread_started_inside_a_block_sees_the_process_default(monkeypatch):
    monkeypatch.delenv("MYTHOS_BACKEND", raising=False)
    seen: list[str] = []
    with K.use_backend("reference"):
        _run_threads([lambda: seen.append(K.get_backend())])
        K.set_backend("triton")
        try:
            _run_threads([lambda: seen.append(K.get_backend())])
            assert K.get_backend() == "reference"
        finally:
            K.set_backend(None)
    assert seen == ["auto", "triton"]


def test_set_backend_is_seen_by_every_thread_outside_their_blocks(monkeypatch):
    monkeypatch.delenv("MYTHOS_BACKEND", raising=False)
    entered, changed = threading.Event(), threading.Event()
    seen: list[str] = []

    def in_block():
        with K.use_backend("triton"):
            entered.set()
            assert changed.wait(30)
            seen.append(K.get_backend())
        seen.append(K.get_backend())

    def setter():
        assert entered.wait(30)
        K.set_backend("reference")
        changed.set()

    try:
        _run_threads([in_block, setter])
    finally:
        K.set_backend(None)
    assert seen == ["triton", "reference"]


def test_set_backend_inside_a_block():
    """set_backend inside a block sets the default, the block still wins, nothing is lost and
    nothing raises on exit (set_backend(None) included)."""
    base = K.get_backend()
    try:
        with K.use_backend("reference"):
            K.set_backend("triton")
            assert K.get_backend() == "reference"
            with K.use_backend("auto"):
                assert K.get_backend() == "auto"
            assert K.get_backend() == "reference"
        assert K.get_backend() == "triton"
        with K.use_backend("reference"):
            K.set_backend(None)
            assert K.get_backend() == "reference"
        assert K.get_backend() == base
    finally:
        K.set_backend(None)


def test_asyncio_tasks_have_their_own_blocks(monkeypatch):
    monkeypatch.delenv("MYTHOS_BACKEND", raising=False)

    async def task(name: str, mine: asyncio.Event, theirs: asyncio.Event, seen: list):
        with K.use_backend(name):
            mine.set()
            await theirs.wait()          # the other task is inside its block now
            await asyncio.sleep(0)
            seen.append(K.get_backend())
        seen.append(K.get_backend())

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        seen_a: list[str] = []
        seen_b: list[str] = []
        await asyncio.gather(task("reference", a, b, seen_a), task("triton", b, a, seen_b))
        with K.use_backend("reference"):
            child = await asyncio.create_task(_get())
        return seen_a, seen_b, child

    async def _get():
        return K.get_backend()

    seen_a, seen_b, child = asyncio.run(main())
    assert seen_a == ["reference", "auto"] and seen_b == ["triton", "auto"]
    assert child == "reference"   # a task copies its creator's context


def test_cpu_forward_while_another_thread_holds_triton(monkeypatch):
    """A thread inside use_backend("triton") (kernels unable to run: CPU tensors, no
    interpreter) does not reach another thread's CPU forward, whose logits equal the
    single-threaded run's; threads under reference and auto give the same logits too."""
    from conftest import tiny_kwargs

    import mythos

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MYTHOS_BACKEND", raising=False)
    with torch.device("cpu"):
        torch.manual_seed(0)
        m = mythos.OpenMythos(mythos.MythosConfig(**tiny_kwargs("mla"))).eval()
        ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = m(ids, n_loops=3)
    holding, done = threading.Event(), threading.Event()
    held: list[BaseException] = []

    def hold_triton():
        try:
            with K.use_backend("triton"):
                with pytest.raises(K.BackendUnavailable), torch.no_grad():
                    m(ids, n_loops=3)
                holding.set()
                assert done.wait(60)
                assert K.get_backend() == "triton"
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            held.append(exc)
            holding.set()

    results: dict[str, torch.Tensor] = {}

    def forward(name: str | None):
        def run():
            ctx = K.use_backend(name) if name else contextlib.nullcontext()
            with ctx, torch.no_grad():
                for _ in range(2):
                    results[name or "default"] = m(ids, n_loops=3)
        return run

    holder = threading.Thread(target=hold_triton)
    holder.start()
    try:
        assert holding.wait(60)
        _run_threads([forward(n) for n in (None, "reference", "auto")])
        with torch.no_grad():
            results["main"] = m(ids, n_loops=3)
    finally:
        done.set()
        holder.join(60)
    if held:
        raise held[0]
    assert set(results) == {"default", "reference", "auto", "main"}
    for name, out in results.items():
        assert torch.equal(out, want), name


def test_compiled_code_recompiles_when_the_block_changes(monkeypatch):
    """torch.compile traces get_backend (fullgraph) and recompiles when the block changes."""
    monkeypatch.delenv("MYTHOS_BACKEND", raising=False)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return x + 1 if K.get_backend() == "reference" else x * 3

    x = torch.ones(2, device="cpu")
    assert f(x).tolist() == [3.0, 3.0]
    with K.use_backend("reference"):
        assert f(x).tolist() == [2.0, 2.0]
    assert f(x).tolist() == [3.0, 3.0]

def _registered_form(name="test_form"):
    """A throwaway CPU form of op ``test_op`` that serves 2-D inputs."""
    _dispatch.register_cpu("test_op", name, lambda x: x * 2, serves=lambda x: x.dim() == 2,
                           doc="test")


def test_cpu_form_chosen_by_auto_and_cpu_and_switched_by_name():
    _registered_form()
    try:
        x2, x1 = torch.randn(2, 3, device="cpu"), torch.randn(3, device="cpu")
        for backend in ("auto", "cpu"):
            with K.use_backend(backend):
                impl, form = _dispatch.pick("test_op", x2, cpu_args=(x2,))
                assert impl == "cpu" and torch.equal(form(x2), x2 * 2)
                assert _dispatch.choose("test_op", x1, cpu_args=(x1,)) == "reference"   # serves not
        with K.use_backend("reference"):
            assert _dispatch.choose("test_op", x2, cpu_args=(x2,)) == "reference"
        assert ("test_form", "test_op", True, "test") in K.cpu_variants()
        with K.cpu_variant("test_form", False):
            assert _dispatch.choose("test_op", x2, cpu_args=(x2,)) == "reference"
        assert _dispatch.choose("test_op", x2, cpu_args=(x2,)) == "cpu"
        K.reset_dispatch_counts()
        _dispatch.choose("test_op", x2, cpu_args=(x2,))
        assert K.dispatch_counts() == {("test_op", "cpu"): 1}
        with pytest.raises(ValueError, match="no CPU variant 'nope'"):
            K.set_cpu_variant("nope", False)
    finally:
        _dispatch._VARIANTS.pop("test_form", None)
        _dispatch._FORMS["test_op"].clear()


def test_forced_cpu_raises_for_other_devices():
    x = torch.empty(2, 3, device="meta")
    with K.use_backend("cpu"), pytest.raises(K.BackendUnavailable, match="MYTHOS_BACKEND=cpu"):
        _dispatch.choose("op", x, cpu_args=(x,))
    with K.use_backend("auto"):
        assert _dispatch.choose("op", x, cpu_args=(x,)) == "reference"


def test_reference_backend_turns_every_cpu_form_off():
    a = torch.randn(2, 3, device="cpu")
    with torch.no_grad():
        assert _dispatch.cpu_inference(a)
        with K.use_backend("reference"):
            assert not _dispatch.cpu_inference(a)
