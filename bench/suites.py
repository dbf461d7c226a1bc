"""Suites run only when named (``python -m bench --model --suites compare,linear_split,moe_forms``).

* ``compare``      -- mythos vs open-mythos 0.5.0 on the CPU, interleaved repetitions in one
                      process: a forward [2, 256] beside a square fp32 matmul (each forward's FLOP
                      rate as a % of the faster of MKL's and oneDNN's matmul rate), and
                      ``generate`` of 32 tokens after a 64-token prompt; the ``full`` level adds
                      ``generate(..., compiled=True)``. Rows in ``compare.jsonl``.
* ``linear_split`` -- ``F.linear`` against the split matrix-vector product (the weight's two row
                      halves in one ``bmm``, one per core) for few rows, weights read from memory:
                      the measurement behind ``mythos_kernels.cpu.linear.SPLIT_ROWS``. Rows in
                      ``linear_split.jsonl``.
* ``moe_forms``    -- the CPU MoE's many-pair forms (``moe_experts_padded``, ``moe_experts_sorted``)
                      and ``moe_experts_cpu``'s pick over routings from balanced to skewed: the
                      measurement behind ``PAD_SEGMENT_ROWS`` / ``PAD_MIN_ROWS`` in
                      ``mythos_kernels.cpu.moe``; and (``mode`` "train") the same for the
                      training forms, forward + backward: the padded slab, the sorted segments
                      and ``moe_experts_sorted_autograd``'s pick (the same rule). Rows in
                      ``moe_forms.jsonl``.
* ``adaptive``     -- per-token early exit (criterion x threshold x fill: tokens/s against top-1
                      agreement and KL with full depth) and self-speculative decoding (tokens/s,
                      acceptance) on the mid config (``bench.adaptive``). Rows in
                      ``adaptive.jsonl``, the frontier plot in ``adaptive.png``.

Each writes JSON lines to ``<out>/<suite>.jsonl`` (default ``bench/results/cpu/``); the ``tiny``
level runs small shapes for the tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._openmythos import load_open_mythos
from .adaptive import run_adaptive
from .devinfo import run_info
from .harness import append_jsonl, time_interleaved
from .model import CPU_CONFIGS, MID

SQUARE = 2048   # the square fp32 matmul timed beside the forwards: the machine's matmul rate


def forward_flops(om_model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one forward: open-mythos's as ``FlopCounterMode`` counts them, and the work
    mythos's needs: the same less half of the attention products (the bmms inside ``attn``
    modules), since causal attention needs only the scores on and below the diagonal, which
    open-mythos computes in full and masks. A lower bound on what mythos runs (the CPU SDPA
    kernel takes keys in blocks of 512, so at T = 256 it still computes the masked half)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as fc:
        om_model(ids)
    total = fc.get_total_flops()
    attn = sum(counts.get(torch.ops.aten.bmm, 0) for mod, counts in fc.get_flop_counts().items()
               if mod.endswith(".attn"))
    return float(total), float(total - attn / 2)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_compare(level: str = "quick") -> list[dict]:
    """The ``compare`` suite's rows (printed as it goes)."""
    import mythos
    from mythos_kernels.cpu.linear import onednn_available, onednn_linear

    om, why = load_open_mythos()
    if om is None:
        raise RuntimeError(f"compare needs open-mythos 0.5.0 ({why}): "
                           "pip install --no-deps open-mythos==0.5.0")
    tiny = level == "tiny"
    config = "tiny-gqa" if tiny else "mid"
    kw = dict(CPU_CONFIGS[config] if tiny else MID)
    B, T, prompt_len, new = (2, 32, 8, 4) if tiny else (2, 256, 64, 32)
    reps = 1 if tiny else 9
    square = 256 if tiny else SQUARE
    torch.manual_seed(0)
    a = om.OpenMythos(om.MythosConfig(**kw)).eval()
    b = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, kw["vocab_size"], (B, T))
    rows = []
    flops_a, flops_b = forward_flops(a, ids)
    sq = torch.randn(square, square)
    fns: dict[str, Callable[[], Any]] = {"a": lambda: a(ids), "b": lambda: b(ids),
                                         "mm": lambda: torch.mm(sq, sq)}
    if onednn_available():
        fns["dnn"] = lambda: onednn_linear(sq, sq)
    with torch.no_grad():
        for f in fns.values():
            f()
        t = time_interleaved(fns, reps)
    ta, tb = t["a"], t["b"]
    # each forward's rate against the faster library's square matmul timed in the same round
    mkl_rate = [2 * square ** 3 / s for s in t["mm"]]
    dnn_rate = [2 * square ** 3 / s for s in t["dnn"]] if "dnn" in t else mkl_rate
    rate = [max(m, d) for m, d in zip(mkl_rate, dnn_rate)]
    pct_a = [100 * flops_a / s / r for s, r in zip(ta, rate)]
    pct_b = [100 * flops_b / s / r for s, r in zip(tb, rate)]
    need = [100 * flops_b / (s / 1.5) / r for s, r in zip(ta, rate)]
    rows.append({"suite": "forward", "shape": {"B": B, "T": T}, "open_mythos_s": ta,
                 "mythos_s": tb, "speedup_median": _median(ta) / _median(tb),
                 "open_mythos_gflop": flops_a / 1e9, "mythos_gflop": flops_b / 1e9,
                 "matmul_gflops": [r / 1e9 for r in rate],
                 "mkl_matmul_gflops": [r / 1e9 for r in mkl_rate],
                 "onednn_matmul_gflops": [r / 1e9 for r in dnn_rate] if "dnn" in t else None,
                 "open_mythos_pct_of_matmul": _median(pct_a),
                 "mythos_pct_of_matmul": _median(pct_b),
                 "pct_of_matmul_for_1_5x": _median(need)})
    prompt = ids[:1, :prompt_len]
    shape = {"B": 1, "prompt": prompt_len, "new": new}

    def gen(m, **kw_):
        torch.manual_seed(0)
        return m.generate(prompt, new, n_loops=8, **kw_)

    gen_reps = max(1 if tiny else 3, reps // 3)
    t = time_interleaved({"a": lambda: gen(a), "b": lambda: gen(b)}, gen_reps)
    ga, gb = t["a"], t["b"]
    rows.append({"suite": "generate", "shape": shape, "open_mythos_s": ga, "mythos_s": gb,
                 "open_mythos_tok_s": new / _median(ga), "mythos_tok_s": new / _median(gb),
                 "speedup_median": _median(ga) / _median(gb)})
    if level == "full":
        t0 = time.perf_counter()
        gen(b, compiled=True)                       # compiles: timed alone, not interleaved
        first = time.perf_counter() - t0
        t = time_interleaved({"a": lambda: gen(a), "b": lambda: gen(b, compiled=True),
                              "e": lambda: gen(b)}, gen_reps)
        ga, gb, ge = t["a"], t["b"], t["e"]
        rows.append({"suite": "generate_compiled", "shape": shape, "open_mythos_s": ga,
                     "mythos_s": gb, "mythos_eager_s": ge,
                     "open_mythos_tok_s": new / _median(ga), "mythos_tok_s": new / _median(gb),
                     "mythos_eager_tok_s": new / _median(ge),
                     "speedup_median": _median(ga) / _median(gb), "first_call_s": first,
                     "compile_cache": "default"})
    for r in rows:
        r.update(config=config, level=level)
        print(f"  {r['suite']:17s} {r['shape']}: open-mythos {_median(r['open_mythos_s']):.3f}s  "
              f"mythos {_median(r['mythos_s']):.3f}s  speedup {r['speedup_median']:.2f}x"
              + (f"  (first call, compiling: {r['first_call_s']:.1f}s)" if "first_call_s" in r
                 else "")
              + (f"\n  {'':17s} % of the faster {square}^2 matmul's rate "
                 f"({_median(r['matmul_gflops']):.0f} GFLOP/s; MKL "
                 f"{_median(r['mkl_matmul_gflops']):.0f}): open-mythos "
                 f"{r['open_mythos_pct_of_matmul']:.0f}%, mythos "
                 f"{r['mythos_pct_of_matmul']:.0f}%; 1.5x needs {r['pct_of_matmul_for_1_5x']:.0f}%"
                 if "matmul_gflops" in r else ""))
    return rows


def _best_per_call_us(fn: Callable[[], Any], n: int) -> float:
    """Best of three rounds of ``fn`` (which makes ``n`` calls), microseconds per call."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def run_linear_split(level: str = "quick") -> list[dict]:
    """The ``linear_split`` suite's rows: per weight shape [N, K] and row count, ``F.linear``
    against the split product, cycling through enough distinct weights (about 150 MB) that each
    product reads its weight from memory, as a decode step does."""
    tiny = level == "tiny"
    shapes = [(160, 64)] if tiny else [(160, 512), (256, 512), (512, 512), (512, 682),
                                       (1364, 512), (2048, 512)]
    row_counts = [1, 8] if tiny else [1, 4, 8, 16]
    budget = 4e6 if tiny else 150e6
    torch.manual_seed(0)
    rows = []
    for N, K in shapes:
        nw = max(4, int(budget // (N * K * 4)))
        ws = [torch.randn(N, K) for _ in range(nw)]
        halves = [w.view(2, N // 2, K).transpose(1, 2) for w in ws]
        for M in row_counts:
            x = torch.randn(M, K)
            xe = x.expand(2, M, K)
            with torch.no_grad():
                lin = _best_per_call_us(lambda: [F.linear(x, w) for w in ws], nw)
                split = _best_per_call_us(lambda: [torch.bmm(xe, h) for h in halves], nw)
            r = {"suite": "linear_split", "N": N, "K": K, "rows": M, "linear_us": round(lin, 1),
                 "split_us": round(split, 1), "speedup": round(lin / split, 2),
                 "linear_GBps": round(N * K * 4 / lin / 1e3, 1),
                 "split_GBps": round(N * K * 4 / split / 1e3, 1), "level": level}
            rows.append(r)
            print(f"  N={N:5d} K={K:4d} rows={M:2d}: F.linear {r['linear_us']:7.1f} us "
                  f"({r['linear_GBps']:5.1f} GB/s)  split {r['split_us']:7.1f} us "
                  f"({r['split_GBps']:5.1f} GB/s)  {r['speedup']:.2f}x", flush=True)
    return rows


def run_moe_forms(level: str = "quick") -> list[dict]:
    """The ``moe_forms`` suite's rows: per expert shape, token count and routing skew, the padded
    and sorted forms' times and the dispatched form (its rule's pick) over the faster one, for
    inference (``moe_experts_cpu``) and for training (forward + backward of every input's
    gradient: ``_PaddedExpertsFn``, ``_SortedExpertsFn``, ``moe_experts_sorted_autograd``). A
    64 MB read between calls puts the weights out of cache, as in a model whose other weights
    pass through between two MoE calls."""
    from mythos_kernels.cpu import moe as M

    tiny = level == "tiny"
    # (experts, dim, expert hidden, top-k): the mid config's MoE first
    shapes = [(8, 64, 32, 2)] if tiny else [(64, 512, 128, 4), (16, 256, 64, 2),
                                            (32, 1024, 256, 4), (128, 512, 64, 8), (8, 512, 512, 2)]
    tokens = [32] if tiny else [16, 64, 256, 512]
    skews = (0.0, 2.0) if tiny else (0.0, 0.5, 2.0)   # std of a per-expert logit offset
    reps = 1 if tiny else 5
    torch.manual_seed(0)
    flush = torch.randn((1_000_000 if tiny else 64_000_000) // 4)

    def timed(f: Callable[[], Any]) -> float:
        f()
        xs = []
        for _ in range(reps):
            flush.sum()
            t0 = time.perf_counter()
            f()
            xs.append(time.perf_counter() - t0)
        return _median(xs) * 1e3

    rows = []
    with torch.no_grad():
        for E, D, Fh, k in shapes:
            w13 = torch.randn(E, D, 2 * Fh) * 0.02
            w2 = torch.randn(E, Fh, D) * 0.02
            for N in tokens:
                if N * k <= M.FEW_PAIRS:
                    continue
                x = torch.randn(N, D)
                for skew in skews:
                    idx = (torch.randn(N, E) + torch.randn(E) * skew).topk(k, -1).indices
                    w = torch.rand(N, k)
                    flat = idx.reshape(-1)
                    counts = torch.bincount(flat, minlength=E)
                    order = torch.argsort(flat, stable=True)
                    host = counts.tolist()
                    cap = max(host)
                    tp = timed(lambda: M.moe_experts_padded(x, w, idx, w13, w2, counts, order, cap))
                    ts = timed(lambda: M.moe_experts_sorted(x, w, idx, w13, w2, host, order))
                    tc = timed(lambda: M.moe_experts_cpu(x, w, idx, w13, w2))
                    with torch.enable_grad():
                        ins = [t.requires_grad_() for t in (x.clone(), w.clone(), w13.clone(),
                                                            w2.clone())]
                        dy = torch.randn(N, D)

                        def train(fn):
                            return lambda: torch.autograd.grad(fn(ins[0], ins[1], idx, ins[2],
                                                                  ins[3]), ins, dy)
                        tp_t = timed(train(lambda *a: M._PaddedExpertsFn.apply(
                            *a, None, order, host)))
                        ts_t = timed(train(lambda *a: M._SortedExpertsFn.apply(
                            *a, None, order, host)))
                        tc_t = timed(train(M.moe_experts_sorted_autograd))
                    for mode, times in (("inference", (tp, ts, tc)), ("train", (tp_t, ts_t, tc_t))):
                        row = {"suite": "moe_forms", "mode": mode, "E": E, "D": D, "F": Fh, "k": k,
                               "N": N, "skew": skew, "cap": cap, "nonempty": E - host.count(0),
                               "padded_ms": round(times[0], 3), "sorted_ms": round(times[1], 3),
                               "cpu_ms": round(times[2], 3),
                               "cpu_over_best": round(times[2] / min(times[:2]), 3),
                               "level": level}
                        rows.append(row)
                        print(f"  {mode:9s} E={E:3d} D={D:4d} F={Fh:3d} k={k} N={N:3d} "
                              f"skew={skew:.1f} cap={cap:3d} nonempty={row['nonempty']:3d}  padded "
                              f"{times[0]:7.2f} ms  sorted {times[1]:7.2f} ms  picked "
                              f"{times[2]:7.2f} ms ({row['cpu_over_best']:.2f}x best)")
    for mode in ("inference", "train"):
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            total = sum(r["cpu_ms"] for r in mine)
            best = sum(min(r["padded_ms"], r["sorted_ms"]) for r in mine)
            print(f"  {mode}: the picked form's total / the best form's total: {total / best:.3f}; "
                  f"worst case {max(r['cpu_over_best'] for r in mine):.2f}x")
    return rows


NAMED_SUITES: dict[str, Callable[[str], list[dict]]] = {
    "compare": run_compare, "linear_split": run_linear_split, "moe_forms": run_moe_forms,
    "adaptive": run_adaptive}


def run_named_suites(names: list[str], level: str, out_dir: Path | str) -> dict[str, list[dict]]:
    """Run each suite of ``names`` (keys of :data:`NAMED_SUITES`; they measure the CPU whatever
    device the rest of the run uses) and append its rows, with the run's versions and host, to
    ``out_dir/<suite>.jsonl``."""
    unknown = [n for n in names if n not in NAMED_SUITES]
    if unknown:
        raise ValueError(f"suites: unknown {unknown}; named suites are {sorted(NAMED_SUITES)}")
    out: dict[str, list[dict]] = {}
    for name in names:
        print(f"\n== {name} ({level}, CPU)")
        info = run_info(torch.device("cpu"))
        rows = [dict(r, **info) for r in NAMED_SUITES[name](level)]
        append_jsonl(str(Path(out_dir) / f"{name}.jsonl"), rows)
        out[name] = rows
    return out
