"""Probe for issue 2's generate target: the compiled CPU decode step against the eager one.

Mid config, B=1, a 64-token prompt prefilled into a preallocated cache, then per-token decode
steps timed four ways, in one process:

- ``eager``: generate()'s CPU step (append to the cache, attend over the valid prefix);
- ``eager_static``: the static-shape step (write by position tensor, attend over the whole
  cache with a mask), the step a CUDA graph captures;
- ``compiled_plain``: that static step through ``torch.compile`` (inductor, C++ codegen) as
  compiled code sees it by default: plain ``F.linear`` products, the head as ``x @ W^T``;
- ``compiled``: the step ``generate(..., compiled=True)`` runs: the same, plus the head's
  transposed copy passed in as an input (``K.decode_head_weight`` / ``lm_head_transposed``)
  and the split few-row products traced (``K.compiled_split``).

Under compile the reference MoE takes its traceable gather form for decode-sized batches
(``mythos_kernels.moe.moe_experts_gathered``), so each compiled step is one graph. The four run
interleaved, one call each per round. (Rows before this form also timed ``compiled_frozen``,
the plain step with inductor's ``freezing``: 14.9-16.0 ms against 15.8-18.7 compiled_plain.)
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
import mythos_kernels as K  # noqa: E402
from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, cpu_results, time_interleaved  # noqa: E402
from bench.model import MID  # noqa: E402
from mythos.cache import MythosCache  # noqa: E402
from mythos.model import _decode_step  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=cpu_results("compile_probe.jsonl"))
    args = ap.parse_args(argv)
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
            with K.weights_unchanged():   # as in generate (there: one check per call)
                m._logits(m._hidden(tok, n_loops, cache, pos[0])[:, -1])
            pos[0] += 1

        # static step (idempotent: same token, same position); two functions with their own
        # code objects, so Dynamo keeps one compiled graph for each
        scache = MythosCache(prompt + 8)
        m._hidden(ids, n_loops, scache, 0)
        plain = dict(scache)   # a plain dict of the same layer caches: traceable lookups
        p = torch.full((1,), prompt, dtype=torch.long)

        def static():
            with K.weights_unchanged():
                return m._logits(m._hidden(tok, n_loops, plain, 0, p)[:, -1])

        def static_plain():
            return m._logits(m._hidden(tok, n_loops, plain, 0, p)[:, -1])

        ref = static()
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        head_t = K.decode_head_weight(m.head.weight)
        split = K.two_threads()
        gen_step = torch.compile(_decode_step, dynamic=False)

        def compiled():
            with K.compiled_split(split):
                return gen_step(m, tok, n_loops, plain, p, head_t)

        fns = {"eager": eager, "eager_static": static,
               "compiled_plain": torch.compile(static_plain, dynamic=False),
               "compiled": compiled}
        for name in ("compiled_plain", "compiled"):
            t0 = time.perf_counter()
            out = fns[name]()
            row[f"{name}_compile_s"] = round(time.perf_counter() - t0, 1)
            row[f"{name}_rel_err"] = float((out - ref).norm() / ref.norm())
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
