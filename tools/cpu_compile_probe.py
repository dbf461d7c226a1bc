"""Probe for issue 2's generate target: would a compiled CPU decode step beat the eager one?

Mid config, B=1, a 64-token prompt prefilled into a preallocated cache, then per-token decode
steps timed four ways, in one process:

- ``eager``: generate()'s CPU step (append to the cache, attend over the valid prefix);
- ``eager_static``: the static-shape step (write by position tensor, attend over the whole
  cache with a mask), the step a CUDA graph captures;
- ``compiled``: that static step through ``torch.compile`` (inductor, C++ codegen);
- ``compiled_frozen``: the same with ``torch._inductor.config.freezing`` (weights as constants,
  prepacked for oneDNN).

Under compile the reference MoE takes its traceable gather form for decode-sized batches
(``mythos_kernels.moe.moe_experts_gathered``; the sorted form reads expert counts on the host),
so the whole step is one graph: the step ``generate(..., compiled=True)`` runs, plus a frozen
variant. The four run interleaved, one call each per round.
Appends one JSON row to bench/results/cpu/compile_probe.jsonl.

    python tools/cpu_compile_probe.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mythos  # noqa: E402
from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, time_interleaved  # noqa: E402
from bench.model import MID  # noqa: E402
from mythos.cache import MythosCache  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "cpu",
                                                  "compile_probe.jsonl"))
    args = ap.parse_args(argv)
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    m = mythos.OpenMythos(mythos.MythosConfig(**MID)).eval()
    prompt, n_loops = 64, 8
    ids = torch.randint(0, MID["vocab_size"], (1, prompt))
    row = {"suite": "cpu_compile_probe", "config": "mid", "B": 1, "prompt": prompt,
           "n_loops": n_loops, "steps": args.steps}
    with torch.no_grad():
        # eager, generate()'s CPU step: appends, so it gets a cache with room for every call
        cache = MythosCache(prompt + 4 * args.steps + 8)
        m._hidden(ids, n_loops, cache, 0)
        pos = [prompt]
        tok = ids[:, -1:]

        def eager():
            m._logits(m._hidden(tok, n_loops, cache, pos[0])[:, -1])
            pos[0] += 1

        # static step (idempotent: same token, same position); two functions with their own
        # code objects, so Dynamo keeps one compiled graph for each
        scache = MythosCache(prompt + 8)
        m._hidden(ids, n_loops, scache, 0)
        plain = dict(scache)   # a plain dict of the same layer caches: traceable lookups
        p = torch.full((1,), prompt, dtype=torch.long)

        def static():
            return m._logits(m._hidden(tok, n_loops, plain, 0, p)[:, -1])

        def static_frozen():
            return m._logits(m._hidden(tok, n_loops, plain, 0, p)[:, -1])

        ref = static()
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        fns = {"eager": eager, "eager_static": static}
        for name, fn, freeze in (("compiled", static, False),
                                 ("compiled_frozen", static_frozen, True)):
            inductor_config.freezing = freeze
            step = torch.compile(fn, dynamic=False)
            t0 = time.perf_counter()
            out = step()
            row[f"{name}_compile_s"] = round(time.perf_counter() - t0, 1)
            row[f"{name}_rel_err"] = float((out - ref).norm() / ref.norm())
            fns[name] = step
        inductor_config.freezing = False
        for fn in fns.values():
            fn()
        # interleaved: each round runs every variant once (this VM drifts between phases)
        for n, ts in time_interleaved(fns, args.steps).items():
            row[f"{n}_ms"] = statistics.median(ts) * 1e3
            row[f"{n}_all_ms"] = [round(t * 1e3, 2) for t in ts]
    row.update(run_info("cpu"))
    append_jsonl(args.out, [row])
    print({k: v for k, v in row.items() if not k.endswith("all_ms")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
