"""Side-by-side CPU comparison for the issue's mid config: mythos (reference ops) vs open-mythos
0.5.0 in one process, interleaved repetitions, medians. Appends one JSON row per suite to
bench/results/cpu/compare.jsonl.

    python tools/cpu_compare.py [--reps 9] [--compiled] [--config mid]

``--config`` takes another of the CPU comparison configurations (``bench.model.CPU_CONFIGS``:
tiny-gqa, small-mla, mid-gqa, mid-8-experts, wide-768) instead of the issue's mid config.

``--compiled`` adds a suite with mythos's ``generate(..., compiled=True)`` (the decode step through
torch.compile; its first call, which compiles, is a warm-up outside the timing), interleaved
with open-mythos's generate and mythos's eager one.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mythos  # noqa: E402
from bench._openmythos import load_open_mythos  # noqa: E402
from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, cpu_results, time_interleaved  # noqa: E402
from bench.model import CPU_CONFIGS, MID  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--cold-compile", action="store_true",
                    help="with --compiled: inductor compiles into a fresh, empty cache directory")
    ap.add_argument("--config", default="mid", choices=["mid", *CPU_CONFIGS])
    ap.add_argument("--out", default=cpu_results("compare.jsonl"))
    args = ap.parse_args(argv)
    if args.cold_compile:
        if not args.compiled:
            ap.error("--cold-compile needs --compiled")
        cold = tempfile.mkdtemp(prefix="mythos-inductor-")
        atexit.register(shutil.rmtree, cold, ignore_errors=True)      # the compiled build it holds
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold
    om, _why = load_open_mythos()
    if om is None:
        print("open-mythos 0.5.0 is not installed: pip install --no-deps open-mythos==0.5.0")
        return 1
    torch.manual_seed(0)
    kw = dict(MID if args.config == "mid" else CPU_CONFIGS[args.config])
    a = om.OpenMythos(om.MythosConfig(**kw)).eval()
    b = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, kw["vocab_size"], (2, 256))
    rows = []
    with torch.no_grad():
        a(ids), b(ids)
        t = time_interleaved({"a": lambda: a(ids), "b": lambda: b(ids)}, args.reps)
    ta, tb = t["a"], t["b"]
    rows.append({"suite": "forward", "shape": {"B": 2, "T": 256}, "open_mythos_s": ta,
                 "mythos_s": tb, "speedup_median": statistics.median(ta) / statistics.median(tb)})
    prompt = ids[:1, :64]
    def gen(m):
        torch.manual_seed(0)
        m.generate(prompt, 32, n_loops=8)

    t = time_interleaved({"a": lambda: gen(a), "b": lambda: gen(b)}, max(3, args.reps // 3))
    ga, gb = t["a"], t["b"]
    rows.append({"suite": "generate", "shape": {"B": 1, "prompt": 64, "new": 32},
                 "open_mythos_s": ga, "mythos_s": gb,
                 "open_mythos_tok_s": 32 / statistics.median(ga),
                 "mythos_tok_s": 32 / statistics.median(gb),
                 "speedup_median": statistics.median(ga) / statistics.median(gb)})
    if args.compiled:
        def gen_c():
            torch.manual_seed(0)
            return b.generate(prompt, 32, n_loops=8, compiled=True)

        t0 = time.perf_counter()
        gen_c()                                       # compiles: timed alone, not interleaved
        first = time.perf_counter() - t0
        t = time_interleaved({"a": lambda: gen(a), "b": gen_c, "e": lambda: gen(b)},
                             max(3, args.reps // 3))
        ga, gb, ge = t["a"], t["b"], t["e"]
        rows.append({"suite": "generate_compiled", "shape": {"B": 1, "prompt": 64, "new": 32},
                     "open_mythos_s": ga, "mythos_s": gb, "mythos_eager_s": ge,
                     "open_mythos_tok_s": 32 / statistics.median(ga),
                     "mythos_tok_s": 32 / statistics.median(gb),
                     "mythos_eager_tok_s": 32 / statistics.median(ge),
                     "speedup_median": statistics.median(ga) / statistics.median(gb),
                     "first_call_s": first,
                     "compile_cache": "cold" if args.cold_compile else "default"})
    info = run_info(torch.device("cpu"))
    for r in rows:
        r.update(config=args.config, **info)
    append_jsonl(args.out, rows)
    for r in rows:
        print(f"{r['suite']:17s} {r['shape']}: open-mythos {statistics.median(r['open_mythos_s']):.3f}s"
              f"  mythos {statistics.median(r['mythos_s']):.3f}s  speedup {r['speedup_median']:.2f}x"
              + (f"  (first call, compiling: {r['first_call_s']:.1f}s, {r['compile_cache']} cache)"
                 if "first_call_s" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
