"""The one dispatch point: which implementation serves an op -- ``reference`` (the plain math
open-mythos computes), ``cpu`` (a registered CPU form, :mod:`mythos_kernels.cpu`) or ``triton``.

Backend setting, from the environment variable ``MYTHOS_BACKEND`` or from Python:

* ``auto``      -- Triton kernels for CUDA tensors when Triton is importable and the op has a
                   kernel; for CPU tensors the first enabled CPU form that serves the call; the
                   reference otherwise (no Triton, no kernel or form yet).
* ``triton``    -- force the kernels; raise :class:`BackendUnavailable` if one cannot run.
                   With ``TRITON_INTERPRET=1`` kernels run on CPU tensors.
* ``cpu``       -- force the CPU forms; raise :class:`BackendUnavailable` for tensors on
                   another device. Where no form serves a call (none registered for the op, or
                   autograd for the inference-only forms) the reference serves.
* ``reference`` -- only the plain math: no kernel and no CPU form anywhere (the predicate
                   :func:`cpu_inference`, which every CPU form checks, is False).

An op that has no Triton kernel yet uses its reference (or a CPU form) under every setting.

CPU forms register themselves (:func:`register_cpu`) with the op they serve, a predicate that
says when they serve a call, and a name that switches them on and off (:func:`cpu_variant`,
:func:`set_cpu_variant`, :func:`reset_cpu_variants`, listed by :func:`cpu_variants`; a variant
may take its default from an environment variable, ``mythos_kernels._env``); switches inside a form (a sub-form,
kept buffers) register with no function and are read with :func:`cpu_enabled`. Tests and A/B
measurements switch variants by these names.

Three layers decide, the first that is set wins: a :func:`use_backend` block, which belongs to
the thread (or asyncio task) that entered it; :func:`set_backend`'s process-wide default; the
environment variable, read on each call (``mythos_kernels._env`` lists every variable and how
it is parsed).

Every eager decision is recorded in a counter keyed ``(op, impl)`` so tests can assert that a
kernel path really ran (under ``torch.compile`` the choice is made at trace time and not
counted)::

    from mythos_kernels import use_backend, dispatch_counts, reset_dispatch_counts
    reset_dispatch_counts()
    with use_backend("triton"):
        model(ids)
    assert dispatch_counts()[("lti_act_step", "triton")] > 0
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.autograd import forward_ad as _forward_ad

from ._env import BACKEND_CHOICES, env_choice, env_flag

BACKENDS = BACKEND_CHOICES

_lock = threading.Lock()      # guards _counts
_counts: Counter = Counter()
_block: ContextVar[str | None] = ContextVar("mythos_backend_block", default=None)
_default: str | None = None   # set_backend's choice, process-wide
_compile_view: str | None = None   # the block choice last entered or left, any thread (see get_backend)


class BackendUnavailable(RuntimeError):
    """Raised when a backend is forced (``triton``, ``cpu``) but cannot run on the given inputs."""


def _validate(name: object, arg: str) -> str:
    """A backend name from Python, lower-cased (any case accepted)."""
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a str, one of {BACKENDS} (as for MYTHOS_BACKEND), "
                        f"got {type(name).__name__}")
    low = name.strip().lower()
    if low not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS} (as for MYTHOS_BACKEND), got {name!r}")
    return low


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend` block of this thread or task, else
    :func:`set_backend`'s choice, else ``$MYTHOS_BACKEND`` (read now), else ``auto``.

    Under ``torch.compile`` it is read at trace time and the compiled code keeps it; dynamo cannot
    read a ``ContextVar``, so there the block choice is the one last entered or left in any
    thread, a module global the compiled code guards on (a change recompiles). With one thread
    switching backends that is that thread's block; compiled code run from several threads under
    different blocks may get another thread's choice.
    """
    if _compiling():
        b = _compile_view
    else:
        b = _block.get()
    if b is not None:
        return b
    b = _default
    if b is not None:
        return b
    return env_choice("MYTHOS_BACKEND", BACKENDS, "auto")


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend, seen by every thread (``None``: back to
    ``$MYTHOS_BACKEND``). A :func:`use_backend` block still wins inside itself; the default
    stays after the block."""
    global _default
    _default = None if name is None else _validate(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with the given backend.

    The choice belongs to the current thread (asyncio task, ``contextvars`` context): other
    threads keep theirs. A thread started inside the block starts with a fresh context, so it
    sees :func:`set_backend`'s default or ``$MYTHOS_BACKEND``, not this block; an asyncio task
    created inside the block copies the context and sees the block. Blocks nest.
    """
    global _compile_view
    name = _validate(name, "use_backend(name)")
    token = _block.set(name)
    _compile_view = name
    try:
        yield
    finally:
        _block.reset(token)
        _compile_view = _block.get()


def interpreter_active() -> bool:
    """True when Triton kernels run through the CPU interpreter: ``TRITON_INTERPRET`` read by
    Triton's own rule (``1``, ``true``, ``on``, ``yes``, ``y`` in any case)."""
    return (os.environ.get("TRITON_INTERPRET") or "").strip().lower() in ("1", "true", "on", "yes", "y")


_triton_ok: bool | None = None
_triton_err: str = ""


def triton_available() -> bool:
    """Whether ``triton`` imports (cached)."""
    global _triton_ok, _triton_err
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_ok = True
        except Exception as exc:  # pragma: no cover - depends on the install
            _triton_ok, _triton_err = False, f"{type(exc).__name__}: {exc}"
    return _triton_ok


def _why_not_triton(tensors: Sequence[torch.Tensor | None]) -> str | None:
    """Reason the Triton path cannot serve these tensors, or None if it can."""
    if not triton_available():
        return f"triton is not importable ({_triton_err})"
    devs = {t.device.type for t in tensors if t is not None}
    if len(devs) > 1:
        return f"inputs are on several device types {sorted(devs)}"
    dev = devs.pop() if devs else "cpu"
    if dev == "cuda":
        return None
    if dev == "cpu" and interpreter_active():
        return None
    if dev == "cpu":
        return "inputs are CPU tensors and TRITON_INTERPRET=1 is not set"
    return f"device type {dev!r} is not supported by the Triton kernels"


def choose(op: str, *tensors: torch.Tensor | None, has_kernel: bool = True,
           supported: str | None = None, cpu_args: tuple | None = None) -> str:
    """Decide and record which implementation serves ``op`` for these inputs.

    Args:
        op:         op name, used in the dispatch record.
        tensors:    the op's tensor inputs (``None`` entries ignored).
        has_kernel: False for ops without a Triton kernel yet.
        supported:  a reason the kernel cannot take these particular inputs (shape, dtype,
                    size limit), or None. Forced ``triton`` raises with it; ``auto`` falls back.
        cpu_args:   the op's arguments, for the predicates of its registered CPU forms (None:
                    no CPU form is considered).

    Returns:
        ``"triton"``, ``"cpu"`` (run :func:`cpu_form`'s form) or ``"reference"``.

    Raises:
        BackendUnavailable: the backend is ``triton`` and the kernel cannot run, or ``cpu`` and
        the tensors are not all on the CPU.
    """
    return pick(op, *tensors, has_kernel=has_kernel, supported=supported, cpu_args=cpu_args)[0]


def pick(op: str, *tensors: torch.Tensor | None, has_kernel: bool = True,
         supported: str | None = None, cpu_args: tuple | None = None
         ) -> tuple[str, Callable | None]:
    """:func:`choose` and, for ``"cpu"``, the registered form that serves (else None)."""
    backend = get_backend()
    impl, form = "reference", None
    if has_kernel and backend == "triton":
        why = supported or _why_not_triton(tensors)
        if why is not None:
            raise BackendUnavailable(f"MYTHOS_BACKEND=triton but op {op!r} cannot run its Triton "
                                     f"kernel: {why}")
        impl = "triton"
    elif backend == "cpu":
        devs = sorted({t.device.type for t in tensors if t is not None} - {"cpu"})
        if devs:
            raise BackendUnavailable(f"MYTHOS_BACKEND=cpu but op {op!r} got tensors on {devs}: "
                                     "the CPU forms take CPU tensors only")
        form = cpu_form(op, cpu_args) if cpu_args is not None else None
    elif backend == "auto":
        on_cuda = any(t is not None and t.is_cuda for t in tensors)
        if on_cuda:
            if has_kernel and supported is None and _why_not_triton(tensors) is None:
                impl = "triton"
        elif cpu_args is not None:
            form = cpu_form(op, cpu_args)
    if form is not None:
        impl = "cpu"
    if not _compiling():  # under torch.compile the choice is made once, at trace time
        with _lock:
            _counts[(op, impl)] += 1
    return impl, form


# --------------------------------------------------------------------------- CPU forms ----

@dataclass
class CpuVariant:
    """One registered CPU form (or, with ``fn`` None, a switch inside one)."""

    name: str
    op: str
    fn: Callable | None
    serves: Callable[..., bool] | None
    default_on: bool
    doc: str
    env: str | None = None          # a MYTHOS_* switch that sets the default (read on each use)
    setting: bool | None = None     # set_cpu_variant's choice; None: the default

    @property
    def enabled(self) -> bool:
        if self.setting is not None:
            return self.setting
        return env_flag(self.env, self.default_on) if self.env else self.default_on


_VARIANTS: dict[str, CpuVariant] = {}      # name -> variant, in registration order
_FORMS: dict[str, list[CpuVariant]] = {}   # op -> its forms (fn not None), in registration order


def register_cpu(op: str, name: str, fn: Callable | None = None, *,
                 serves: Callable[..., bool] | None = None, default_on: bool = True,
                 doc: str = "", env: str | None = None) -> Callable | None:
    """Declare a CPU form of ``op``: ``fn(*args)`` serves a call whose arguments satisfy
    ``serves(*args)`` (both given the op's arguments; forms of one op are tried in registration
    order). With ``fn`` None, ``name`` is a switch read inside a form (:func:`cpu_enabled`).
    With ``env`` (a ``MYTHOS_*`` switch, ``_env``), that variable, read on each use, sets the
    default (``default_on`` where it is unset) until :func:`set_cpu_variant` chooses.
    Returns ``fn`` (usable as a decorator's body). Registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_cpu: name must be a non-empty str, got {name!r}")
    if fn is not None and serves is None:
        raise ValueError(f"register_cpu: form {name!r} needs a serves predicate")
    old = _VARIANTS.pop(name, None)
    if old is not None and old.fn is not None:
        _FORMS[old.op].remove(old)
    v = _VARIANTS[name] = CpuVariant(name, op, fn, serves, bool(default_on), doc, env)
    if fn is not None:
        _FORMS.setdefault(op, []).append(v)
    return fn


def cpu_form(op: str, args: tuple) -> Callable | None:
    """The first enabled registered form of ``op`` that serves ``args``, or None."""
    for v in _FORMS.get(op, ()):
        if v.serves(*args) and v.enabled:   # serves first: its cheap shape checks fail fast
            return v.fn
    return None


def cpu_enabled(name: str) -> bool:
    """Whether the registered CPU variant ``name`` is on."""
    v = _VARIANTS.get(name)
    if v is None:
        raise KeyError(f"no CPU variant {name!r}; registered: {sorted(_VARIANTS)}")
    return v.enabled


def cpu_variants() -> list[tuple[str, str, bool, str]]:
    """Every registered CPU variant as ``(name, op, enabled, doc)``, in registration order."""
    return [(v.name, v.op, v.enabled, v.doc) for v in _VARIANTS.values()]


def set_cpu_variant(name: str, on: bool | None) -> None:
    """Switch the CPU variant ``name`` on or off (process-wide); ``None``: back to its default
    (its environment variable, if it has one)."""
    if name not in _VARIANTS:
        raise ValueError(f"set_cpu_variant: no CPU variant {name!r}; registered: "
                         f"{sorted(_VARIANTS)}")
    _VARIANTS[name].setting = None if on is None else bool(on)


def reset_cpu_variants() -> None:
    """Every CPU variant back to its default (its environment variable, if it has one)."""
    for v in _VARIANTS.values():
        v.setting = None


@contextlib.contextmanager
def cpu_variant(name: str, on: bool) -> Iterator[None]:
    """Context manager: run the enclosed code with CPU variant ``name`` on or off."""
    if name not in _VARIANTS:
        raise ValueError(f"cpu_variant: no CPU variant {name!r}; registered: {sorted(_VARIANTS)}")
    before = _VARIANTS[name].setting
    _VARIANTS[name].setting = bool(on)
    try:
        yield
    finally:
        _VARIANTS[name].setting = before


def record(op: str, impl: str = "reference", n: int = 1) -> None:
    """Add ``n`` calls of ``op`` served by ``impl`` to the dispatch record, for a caller that
    decided once where :func:`choose` decides per call (the CPU decode plan, ``mythos.decode``,
    records each reference op it runs, as the module path's calls would)."""
    with _lock:
        _counts[(op, impl)] += n


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _transformed() -> bool:
    """Inside a ``torch.func`` transform (jvp, vmap...) or a forward-mode AD dual level: where
    inference mode would fail or drop tangents, and fused kernels without a forward-AD formula
    (SDPA's flash kernels) fail (True when this torch cannot tell)."""
    try:
        return (torch._C._functorch.peek_interpreter_stack() is not None
                or _forward_ad._current_level >= 0)
    except AttributeError:  # pragma: no cover - private hooks moved in another torch
        return True


def cpu_inference(*tensors: torch.Tensor) -> bool:
    """Every tensor on the CPU, no autograd through any of them, CPU autocast off, not tracing,
    the backend not ``reference``: the plain-torch CPU inference forms
    (:mod:`mythos_kernels.cpu`: linear, MoE, MLA decode)
    may serve instead of the general path. Under autocast the general path's ops take
    autocast's casts, as open-mythos's do (the forms' oneDNN calls would skip them, and their
    ``out=`` products fail on a cast input). Not
    inside ``torch.func`` transforms or forward-mode AD (:func:`_transformed`)."""
    for t in tensors:
        if t.device.type != "cpu":
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return False
    if torch.is_autocast_enabled("cpu") or get_backend() == "reference":
        return False
    # forward-mode AD: the forms' out= products have no formula for it
    return not _compiling() and not _transformed()


def dispatch_counts() -> dict[tuple[str, str], int]:
    """A copy of the dispatch record: ``{(op, impl): number of calls}``."""
    with _lock:
        return dict(_counts)


def reset_dispatch_counts() -> None:
    """Clear the dispatch record."""
    with _lock:
        _counts.clear()
