"""Op-level benchmark harness: several implementations of one op, side by side, in one process.

An op is described by an :class:`OpBench` (inputs, shapes, counted FLOPs) and its
:class:`Provider`\\ s (``eager``: the open-mythos op sequence, ``reference``: our vectorized
fallback, ``compile``: ``torch.compile`` of eager, ``triton``: our kernel, CUDA only). For every
shape x dtype x mode (``forward``, ``backward``, ``full`` = forward + backward) each provider is
timed and one JSON row is appended to the results file:

* CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call) with the 20/50/80
  quantiles; inputs are also rotated over enough copies to exceed twice the L2 size. This per-call
  time includes whatever host (Python + launch) time the GPU waits for. Forward rows also carry
  ``device_ms``: the same calls (one per input copy) captured in one CUDA graph and replayed, so the
  GPU time with no host gaps (what a captured decode step or a busy training queue sees), with
  ``device_pct_of_ceiling`` and ``device_speedup_vs_eager`` from it. Providers that cannot be
  captured (a host sync, ``graph=False``) leave them None.
* CPU: wall clock (``time.perf_counter``) after warm-up; median and 20/80 quantiles.

Each row carries GB/s and TFLOP/s from the counted bytes and FLOPs and the % of the device ceiling
(:mod:`bench.ceilings`): ``floor = max(bytes / copy_bw, flops / matmul_rate)``,
``pct_of_ceiling = 100 * floor / median``.

Byte counting (unless the op gives its own ``bytes``): each tensor is read or written once --
forward = inputs + outputs; backward = inputs (saved for backward) + output gradients + input
gradients; full = forward + backward. FLOPs come from the op (``flops``); backward defaults to twice
the forward FLOPs (the matmul rule).

Adding an op: see ``bench/README.md`` (a new ``bench/ops_<name>.py`` that calls :func:`register`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ceilings as _ceil
from .devinfo import run_info

MODES = ("forward", "backward", "full")
LEVELS = ("tiny", "quick", "full")
DTYPE_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CUDA_ONLY_REASON = "Triton timings need a CUDA GPU"


# --------------------------------------------------------------------------- data model


@dataclass
class Provider:
    """One implementation of an op.

    fn:        ``fn(**inputs)`` -> tensor or tuple of tensors.
    prepare:   optional untimed ``prepare(inputs) -> inputs`` (e.g. split stacked weights into the
               per-expert tensors open-mythos keeps); tensors it derives become fresh leaves.
    available: optional ``available(inputs, device) -> reason or None``: a reason skips it.
    cuda_only: skipped on CPU (reason: Triton timings need a CUDA GPU).
    graph:     False when a CUDA-graph capture must not be tried (host syncs, torch.compile):
               the row then has no ``device_ms``.
    """

    name: str
    fn: Callable[..., Any]
    prepare: Callable[[dict], dict] | None = None
    available: Callable[[dict, torch.device], str | None] | None = None
    cuda_only: bool = False
    graph: bool = True


@dataclass
class OpBench:
    """One op: how to make its inputs, which shapes to run, how much work it is.

    shapes:      ``{"tiny": [...], "cpu": [...], "cuda": [...], "full": [...]}``; each shape a dict
                 of ints. ``tiny`` feeds pytest, ``cpu`` the CPU runs, ``cuda`` the quick GPU run,
                 ``full`` the ``--full`` GPU run (the kernels' performance targets). Missing
                 keys fall back: full -> cuda -> cpu -> tiny.
    make_inputs: ``make_inputs(shape, dtype, device) -> dict`` of tensors and plain values.
    flops:       ``flops(shape) -> float``, forward FLOPs.
    grad_inputs: input names that get gradients in ``backward``/``full`` modes.
    """

    name: str
    make_inputs: Callable[[dict, torch.dtype, torch.device], dict]
    flops: Callable[[dict], float]
    shapes: dict[str, list[dict]]
    grad_inputs: tuple[str, ...] = ()
    modes: tuple[str, ...] = MODES
    dtypes_cpu: tuple[torch.dtype, ...] = (torch.float32,)
    dtypes_cuda: tuple[torch.dtype, ...] = (torch.bfloat16,)
    flops_backward: Callable[[dict], float] | None = None
    bytes: Callable[[dict, torch.dtype, str], float] | None = None
    description: str = ""
    group: str = ""                # file it came from: ops_recurrent.py -> "recurrent"
    providers: dict[str, Provider] = field(default_factory=dict)

    def add(self, provider: Provider) -> Provider:
        self.providers[provider.name] = provider
        return provider

    def provider(self, name: str, **kw) -> Callable:
        """Decorator: ``@op.provider("eager")`` registers the decorated function."""
        def deco(fn):
            self.add(Provider(name, fn, **kw))
            return fn
        return deco

    def select_shapes(self, level: str, device: torch.device) -> list[dict]:
        order = {"tiny": ["tiny"],
                 "quick": ["cuda", "cpu", "tiny"] if device.type == "cuda" else ["cpu", "tiny"],
                 "full": (["full", "cuda", "cpu", "tiny"] if device.type == "cuda"
                          else ["cpu", "tiny"])}[level]
        for key in order:
            if self.shapes.get(key):
                return list(self.shapes[key])
        return []

    def dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        return self.dtypes_cuda if device.type == "cuda" else self.dtypes_cpu

    def mode_flops(self, shape: dict, mode: str) -> float:
        fwd = float(self.flops(shape))
        bwd = float(self.flops_backward(shape)) if self.flops_backward else 2.0 * fwd
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


_OPS: dict[str, OpBench] = {}


def register(op: OpBench) -> OpBench:
    """Add an op to the benchmark (called at import by each ``bench/ops_*.py``)."""
    if not op.group:
        mod = sys._getframe(1).f_globals.get("__name__", "")
        op.group = mod.rsplit(".", 1)[-1].removeprefix("ops_")
    _OPS[op.name] = op
    return op


def select_ops(names: Iterable[str] | None) -> list[OpBench]:
    """Ops by name or group (``recurrent`` = every op of ``ops_recurrent.py``); all if None."""
    ops = all_ops()
    if not names:
        return list(ops.values())
    out: list[OpBench] = []
    for n in names:
        hit = [op for op in ops.values() if n in (op.name, op.group)]
        if not hit:
            known = sorted(set(ops) | {op.group for op in ops.values()})
            raise KeyError(f"unknown op {n!r}; known: {', '.join(known)}")
        out += [op for op in hit if op not in out]
    return out


def all_ops() -> dict[str, OpBench]:
    """Every registered op; imports all ``bench/ops_*.py`` modules first."""
    import importlib
    import pkgutil

    pkg_dir = Path(__file__).resolve().parent
    for m in sorted(pkgutil.iter_modules([str(pkg_dir)]), key=lambda m: m.name):
        if m.name.startswith("ops_"):
            importlib.import_module(f"bench.{m.name}")
    return dict(_OPS)


# --------------------------------------------------------------------------- standard providers


def dispatch_provider(op_name: str, entry: Callable[..., Any], name: str = "triton",
                      arg_names: Iterable[str] | None = None,
                      prepare: Callable[[dict], dict] | None = None) -> Provider:
    """A provider that calls a ``mythos_kernels`` dispatching entry point with the Triton backend
    forced. It is available only on CUDA and only once the op really has a kernel: a probe call is
    made and the dispatch record must show ``(op_name, "triton")``. So a kernel landing in
    ``mythos_kernels`` shows up here with no change to the bench.

    ``arg_names`` restricts and orders the inputs passed positionally (default: all, by keyword);
    ``prepare`` as for :class:`Provider` (the probe call sees the prepared inputs).
    """
    names = tuple(arg_names) if arg_names is not None else None

    def call(**inp):
        from mythos_kernels import use_backend

        with use_backend("triton"):
            if names is not None:
                return entry(*(inp[k] for k in names))
            return entry(**inp)

    def available(inp: dict, device: torch.device) -> str | None:
        from mythos_kernels import BackendUnavailable, dispatch_counts, reset_dispatch_counts

        reset_dispatch_counts()
        try:
            with torch.no_grad():
                call(**inp)
        except BackendUnavailable as exc:
            return f"no Triton kernel can run: {exc}"
        if dispatch_counts().get((op_name, "triton"), 0) == 0:
            return f"no Triton kernel for {op_name!r} yet (dispatch served the reference)"
        return None

    return Provider(name, call, prepare=prepare, available=available, cuda_only=True)


_COMPILED: dict[int, Callable] = {}


def _raise_dynamo_limits() -> None:
    try:
        import torch._dynamo as dynamo

        for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                    "accumulated_recompile_limit"):
            if hasattr(dynamo.config, key):
                setattr(dynamo.config, key, max(getattr(dynamo.config, key), 512))
    except Exception:  # pragma: no cover
        pass


def compiled_provider(eager: Callable[..., Any], name: str = "compile",
                      prepare: Callable[[dict], dict] | None = None) -> Provider:
    """``torch.compile(eager)`` with default settings (static first, dynamic shapes after the first
    recompile, as a user gets it), compiled lazily on first call. On a CPU it runs only when asked
    for (``--compile`` or ``--full``): compiling takes tens of seconds there."""

    def fn(**inp):
        c = _COMPILED.get(id(eager))
        if c is None:
            _raise_dynamo_limits()
            c = _COMPILED[id(eager)] = torch.compile(eager)
        return c(**inp)

    def available(inp: dict, device: torch.device) -> str | None:
        if device.type == "cpu" and not RunOptions.current.compile_on_cpu:
            return "torch.compile skipped on CPU in quick mode (use --compile)"
        return None

    return Provider(name, fn, prepare=prepare, available=available, graph=False)


# --------------------------------------------------------------------------- timing


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2]


def time_cpu(fn: Callable[[], Any], warmup_s: float = 0.05, budget_s: float = 0.3,
             min_reps: int = 3, max_reps: int = 200) -> tuple[float, float, float, int]:
    """Wall-clock ``(median, p20, p80, reps)`` in ms after at least one warm-up call."""
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < warmup_s:
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (spent < budget_s and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        times.append(dt * 1e3)
        spent += dt
    return (*_quantiles(times), len(times))


CPU_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")


def cpu_results(name: str) -> str:
    """The path of ``name`` in ``bench/results/cpu/`` (the CPU tools' default ``--out``)."""
    return os.path.join(CPU_RESULTS, name)


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` (its folder created if needed)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int,
                     alternate: bool = False) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, the variants run in turn ``reps`` times in one process
    (CPU side-by-side comparisons; no warm-up here). ``alternate`` reverses the order every other
    round, so neither variant always runs first."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        for n in (names[::-1] if alternate and i % 2 == 0 else names):
            t0 = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t0)
    return out


def time_cuda(fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 100
              ) -> tuple[float, float, float, int]:
    """CUDA-event ``(median, p20, p80, reps)`` in ms via ``triton.testing.do_bench``."""
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80, -1
    # fallback: plain events, L2 flushed with a 256 MB write before each call
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e), 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(3, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return (*_quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)]), n)


def time_cuda_graph(calls: list[Callable[[], Any]], rep_ms: int = 100) -> float | None:
    """GPU time per call (ms) of ``calls`` captured back to back in one CUDA graph and replayed
    (median over replays / len(calls)); None when capture fails (a host sync, an allocation the
    graph cannot own)."""
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):       # warm-up off the capture (allocator, autotune, JIT)
            for _ in range(2):
                for c in calls:
                    c()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        torch.cuda.synchronize()
        med = do_bench(graph.replay, warmup=10, rep=rep_ms, quantiles=[0.5])
        if isinstance(med, (list, tuple)):
            med = med[0]
        del graph
        return float(med) / len(calls)
    except Exception:
        try:
            torch.cuda.synchronize()
        except Exception:  # pragma: no cover
            pass
        return None


# --------------------------------------------------------------------------- helpers


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a value, dict, list or tuple (depth-first)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _clone_inputs(inp: dict, grad_names: Iterable[str]) -> dict:
    grad_names = set(grad_names)
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor):
            c = v.detach().clone()
            if k in grad_names and c.is_floating_point():
                c.requires_grad_(True)
            out[k] = c
        else:
            out[k] = v
    return out


def _detach_leaves(obj: Any, track: bool) -> Any:
    """Turn tensors derived in ``prepare`` into fresh leaves so backward stops at them."""
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad and not obj.is_leaf:
            return obj.detach().requires_grad_(track)
        return obj
    if isinstance(obj, dict):
        return {k: _detach_leaves(v, track) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detach_leaves(v, track) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detach_leaves(v, track) for v in obj)
    return obj


def _float_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if t.is_floating_point()]


def shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fmt_time(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.4f}"


def default_bytes(op: OpBench, inputs: dict, outputs: Any, mode: str) -> float:
    """Each tensor read or written once (module docstring)."""
    fwd = nbytes(inputs) + nbytes(outputs)
    bwd = (nbytes(inputs) + nbytes(_float_outputs(outputs))
           + sum(nbytes(inputs[k]) for k in op.grad_inputs if k in inputs))
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 << 20)


class RunOptions:
    """Process-wide run options read by providers (set by :func:`run_ops`)."""

    compile_on_cpu: bool = False
    current: RunOptions


RunOptions.current = RunOptions()


class Progress:
    """``[bench 12/40 3m05s eta 7m] op shape dtype mode provider`` lines on stderr."""

    def __init__(self, total: int, enabled: bool = True, prefix: str = "bench"):
        self.total, self.done, self.enabled, self.prefix = total, 0, enabled, prefix
        self.t0 = time.perf_counter()

    @staticmethod
    def _fmt(s: float) -> str:
        s = int(s)
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        eta = el / max(self.done - 1, 1) * (self.total - self.done + 1) if self.done > 1 else 0
        print(f"[{self.prefix} {self.done}/{self.total} {self._fmt(el)}"
              f"{' eta ' + self._fmt(eta) if self.done > 1 else ''}] {what}",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one measurement


def _max_err(out: Any, ref: Any) -> float | None:
    a, b = _float_outputs(out), _float_outputs(ref)
    if not a or len(a) != len(b):
        return None
    errs = []
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return None
        errs.append((x.detach().float() - y.detach().float()).abs().max().item() if x.numel()
                    else 0.0)
    return max(errs)


def measure(op: OpBench, prov: Provider, shape: dict, dtype: torch.dtype, mode: str,
            device: torch.device, base_inputs: dict, ref_out: Any, ceil: dict,
            level: str = "quick") -> dict:
    """Time one provider on one shape/dtype/mode; return its row (status ok/skipped/error)."""
    row: dict[str, Any] = {"kind": "op", "op": op.name, "provider": prov.name, "mode": mode,
                           "shape": dict(shape), "dtype": dtype_name(dtype), "level": level}
    if prov.cuda_only and device.type != "cuda":
        return {**row, "status": "skipped", "reason": CUDA_ONLY_REASON}
    grad_names = op.grad_inputs if mode != "forward" else ()
    if mode != "forward" and not grad_names:
        return {**row, "status": "skipped", "reason": "op has no gradient inputs"}
    try:
        if prov.available is not None:
            probe = prov.prepare(dict(base_inputs)) if prov.prepare else base_inputs
            why = prov.available(probe, device)
            if why:
                return {**row, "status": "skipped", "reason": why}
        # rotate over copies of the inputs so that together they exceed twice the L2 size
        in_bytes = max(nbytes(base_inputs), 1)
        n_rot = 1
        if device.type == "cuda":
            n_rot = int(min(16, max(1, math.ceil(2 * l2_bytes(device) / in_bytes))))
        if n_rot == 1 and not grad_names:
            copies = [base_inputs]            # no copy needed: saves memory at the largest shapes
        else:
            copies = [_clone_inputs(base_inputs, grad_names) for _ in range(n_rot)]
        track = mode != "forward"
        prepared = []
        for c in copies:
            p = prov.prepare(dict(c)) if prov.prepare else c
            prepared.append(_detach_leaves(p, track))
        leaves = [[t for t in _tensors(p) if t.requires_grad] for p in prepared]
        fn = prov.fn
        err = None
        with torch.no_grad():
            out0 = fn(**prepared[0])
        if prov.name != "reference" and ref_out is not None:
            err = _max_err(out0, ref_out)
        del out0
        counter = [0]

        if mode == "forward":
            def one(i):
                with torch.no_grad():
                    return fn(**prepared[i])
        else:
            outs = [_float_outputs(fn(**p)) for p in prepared]
            outs = [[o for o in oo if o.requires_grad] for oo in outs]
            if not outs[0] or not leaves[0]:
                return {**row, "status": "skipped", "reason": "no differentiable output"}
            gouts = [[torch.randn_like(o) for o in oo] for oo in outs]
            if mode == "backward":
                def one(i):
                    return torch.autograd.grad(outs[i], leaves[i], gouts[i], retain_graph=True,
                                               allow_unused=True)
            else:
                def one(i):
                    o = [t for t in _float_outputs(fn(**prepared[i])) if t.requires_grad]
                    return torch.autograd.grad(o, leaves[i], gouts[i], allow_unused=True)

        def run():
            i = counter[0] % n_rot
            counter[0] += 1
            return one(i)

        device_ms = peak = None
        if device.type == "cuda":
            med, p20, p80, reps = time_cuda(run, rep_ms=100 if level != "tiny" else 20)
            peak = _cuda_peak_bytes(run)
            # forward only: capturing autograd (backward on the forward's stream; a failed
            # capture of "full" left the CUDA RNG in capture state on an H100 run) is not tried
            if mode == "forward" and prov.graph:
                device_ms = time_cuda_graph([lambda i=i: one(i) for i in range(n_rot)],
                                            rep_ms=100 if level != "tiny" else 20)
        else:
            budget = {"tiny": 0.05, "quick": 0.3, "full": 1.0}[level]
            med, p20, p80, reps = time_cpu(run, budget_s=budget)
    except Exception as exc:  # a provider failing must not stop the run
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "error", "reason": msg}
    finally:
        copies = prepared = leaves = None  # noqa: F841 - free before the next provider
    flops = op.mode_flops(shape, mode)
    nb = (float(op.bytes(shape, dtype, mode)) if op.bytes is not None
          else float(default_bytes(op, base_inputs, ref_out, mode)))
    row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, reps=reps, n_rotate=n_rot,
               max_abs_err_vs_reference=err)
    row.update(metrics(nb, flops, med, ceil, dtype))
    row["device_ms"] = device_ms
    row["peak_mem_bytes"] = peak
    row["device_pct_of_ceiling"] = (100.0 * row["floor_ms"] / device_ms
                                    if device_ms and row["floor_ms"] else None)
    return row


def _cuda_peak_bytes(run: Callable[[], Any]) -> int | None:
    """CUDA memory one more call allocates at its peak above what was allocated before it."""
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    except Exception:  # pragma: no cover - a measurement must not lose the row
        return None


def metrics(nbytes_: float, flops: float, median_ms: float, ceil: dict, dtype) -> dict:
    """GB/s, TFLOP/s, floor and % of ceiling for one timing."""
    s = median_ms / 1e3
    floor_s, bound = _ceil.floor_seconds(nbytes_, flops, ceil, dtype)
    return {
        "bytes": nbytes_, "flops": flops,
        "gbps": nbytes_ / s / 1e9 if s > 0 else None,
        "tflops": flops / s / 1e12 if s > 0 else None,
        "floor_ms": floor_s * 1e3 if floor_s else None,
        "pct_of_ceiling": 100.0 * floor_s / s if floor_s and s > 0 else None,
        "bound": bound,
        "ceiling_gbps": ceil["copy_gbps"],
        "ceiling_tflops": _ceil.matmul_rate(ceil, dtype),
    }


# --------------------------------------------------------------------------- running ops


def plan(ops: Iterable[OpBench], level: str, device: torch.device,
         providers: Iterable[str] | None = None, modes: Iterable[str] | None = None
         ) -> list[tuple[OpBench, dict, torch.dtype, str, list[Provider]]]:
    """Every (op, shape, dtype, mode, providers) measurement group of a run, in order."""
    want_p = set(providers) if providers else None
    want_m = set(modes) if modes else None
    groups = []
    for op in ops:
        provs = [p for n, p in op.providers.items() if want_p is None or n in want_p]
        for shape in op.select_shapes(level, device):
            for dt in op.dtypes(device):
                for mode in op.modes:
                    if want_m is None or mode in want_m:
                        groups.append((op, shape, dt, mode, provs))
    return groups


def check_selection(ops: Iterable[OpBench], level: str, device: torch.device,
                    providers: Iterable[str] | None = None, modes: Iterable[str] | None = None
                    ) -> None:
    """Raise ValueError naming the value when ``providers`` or ``modes`` hold a name no selected
    op offers, or when the selection measures nothing (the level's shapes, modes and providers
    of these ops have no group in common)."""
    ops = list(ops)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    known_p = sorted({n for op in ops for n in op.providers})
    for n in providers or ():
        if n not in known_p:
            raise ValueError(f"unknown provider {n!r}; the selected ops offer: {', '.join(known_p)}")
    for m in modes or ():
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; known: {', '.join(MODES)}")
    if not any(g[4] for g in plan(ops, level, device, providers, modes)):
        raise ValueError(f"ops {', '.join(op.name for op in ops) or '(none)'} with providers "
                         f"{','.join(providers or ()) or 'any'} and modes {','.join(modes or ()) or 'any'}"
                         f" at level {level!r} select no measurement")


def run_ops(ops: Iterable[OpBench], level: str = "quick", device: torch.device | str = "cpu",
            out_path: Path | str | None = None, providers: Iterable[str] | None = None,
            modes: Iterable[str] | None = None, compile_on_cpu: bool = False,
            ceil: dict | None = None, progress: bool = True, echo: bool = True,
            time_budget_s: float | None = None) -> list[dict]:
    """Run the op benchmarks; append each row to ``out_path`` (JSON lines) as soon as it exists.

    Returns every row (skipped ones included, with ``status`` and ``reason``; only ``ok`` and
    ``error`` rows are written to the file). Prints one table per op when ``echo``.
    """
    device = torch.device(device)
    ops = list(ops)
    check_selection(ops, level, device, providers, modes)
    if time_budget_s is not None and not (0 <= time_budget_s < math.inf):
        raise ValueError(f"time_budget_s must be a finite number of seconds >= 0 or None, got "
                         f"{time_budget_s!r}")
    RunOptions.current.compile_on_cpu = compile_on_cpu or level == "full"
    ceil = ceil or _ceil.get_ceilings(device)
    info = run_info(device)
    groups = plan(ops, level, device, providers, modes)
    prog = Progress(sum(len(g[4]) for g in groups), enabled=progress)
    out_file = None
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_file = open(out_path, "a")
    rows: list[dict] = []
    t_start = time.perf_counter()
    cur_op = None
    op_rows: list[dict] = []
    try:
        for op, shape, dt, mode, provs in groups:
            if cur_op is not op:
                if cur_op is not None and echo:
                    print_table(cur_op.name, op_rows, ceil, info)
                cur_op, op_rows = op, []
            over = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
            torch.manual_seed(0)
            base = op.make_inputs(dict(shape), dt, device)
            ref = op.providers.get("reference") or op.providers.get("eager")
            ref_out = None
            if ref is not None and not over:
                try:
                    with torch.no_grad():
                        p = ref.prepare(dict(base)) if ref.prepare else base
                        ref_out = ref.fn(**p)
                except Exception:
                    ref_out = None
            group_rows = []
            for prov in provs:
                prog.step(f"{op.name} {shape_str(shape)} {DTYPE_SHORT.get(dt, dt)} {mode} "
                          f"{prov.name}")
                if over:
                    r = {"kind": "op", "op": op.name, "provider": prov.name, "mode": mode,
                         "shape": dict(shape), "dtype": dtype_name(dt), "level": level,
                         "status": "skipped", "reason": "time budget exhausted"}
                else:
                    r = measure(op, prov, shape, dt, mode, device, base, ref_out, ceil, level)
                r.update(info)
                group_rows.append(r)
            eager = next((r for r in group_rows if r["provider"] == "eager"
                          and r["status"] == "ok"), None)
            for r in group_rows:
                if r["status"] == "ok":
                    r["speedup_vs_eager"] = (eager["median_ms"] / r["median_ms"]
                                             if eager is not None else None)
                    r["device_speedup_vs_eager"] = (
                        eager["device_ms"] / r["device_ms"]
                        if eager is not None and eager.get("device_ms") and r.get("device_ms")
                        else None)
                if out_file is not None and r["status"] in ("ok", "error"):
                    out_file.write(json.dumps(r, default=str) + "\n")
                    out_file.flush()
            rows.extend(group_rows)
            op_rows.extend(group_rows)
            del base, ref_out
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if cur_op is not None and echo:
            print_table(cur_op.name, op_rows, ceil, info)
    finally:
        if out_file is not None:
            out_file.close()
    return rows


# --------------------------------------------------------------------------- printing


def print_table(title: str, rows: list[dict], ceil: dict | None = None, info: dict | None = None,
                file=None) -> None:
    """A readable table of one op's rows (skipped providers summarized below it)."""
    file = file or sys.stdout
    ok = [r for r in rows if r.get("status") == "ok"]
    head = f"\n== {title}"
    if ceil:
        rates = ", ".join(f"{k} {v:.3g}" for k, v in sorted(ceil["matmul_tflops"].items()))
        head += (f"   [ceiling: copy {ceil['copy_gbps']:.3g} GB/s; matmul TFLOP/s {rates}]")
    print(head, file=file)
    cols = ["shape", "dtype", "mode", "provider", "median ms", "[p20, p80]", "vs eager", "GB/s",
            "TFLOP/s", "% ceil", "bound", "graph ms", "% ceil (graph)", "vs eager (graph)"]
    table = []
    for r in ok:
        sp = r.get("speedup_vs_eager")
        table.append([
            shape_str(r["shape"]), DTYPE_SHORT.get(getattr(torch, r["dtype"], None), r["dtype"]),
            r["mode"], r["provider"], fmt_time(r["median_ms"]),
            f"[{fmt_time(r['p20_ms'])}, {fmt_time(r['p80_ms'])}]",
            f"{sp:.2f}x" if sp else "-",
            f"{r['gbps']:.3g}" if r.get("gbps") else "-",
            f"{r['tflops']:.3g}" if r.get("tflops") else "-",
            f"{r['pct_of_ceiling']:.1f}" if r.get("pct_of_ceiling") else "-",
            r.get("bound") or "-",
            fmt_time(r["device_ms"]) if r.get("device_ms") else "-",
            f"{r['device_pct_of_ceiling']:.1f}" if r.get("device_pct_of_ceiling") else "-",
            f"{r['device_speedup_vs_eager']:.2f}x" if r.get("device_speedup_vs_eager") else "-",
        ])
    for r in rows:
        if r.get("status") == "error":
            table.append([shape_str(r["shape"]), r["dtype"], r["mode"], r["provider"],
                          "ERROR", r.get("reason", "")[:60], "", "", "", "", "", "", "", ""])
    if table:
        widths = [max(len(str(x)) for x in col) for col in zip(cols, *table)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        print(line, file=file)
        print("-" * len(line), file=file)
        for t in table:
            print("  ".join(str(x).ljust(w) for x, w in zip(t, widths)), file=file)
    skipped: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.get("status") == "skipped":
            skipped[(r["provider"], r.get("reason", ""))] = skipped.get(
                (r["provider"], r.get("reason", "")), 0) + 1
    for (p, why), n in skipped.items():
        print(f"  {p}: skipped ({why}) x{n}", file=file)
