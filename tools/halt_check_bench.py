"""Measure the ACT "every row halted -> stop" check: a blocking read each loop iteration (lag 0,
what open-mythos does with ``halted.all()``) against mythos's one-iteration-late read (lag 1,
``mythos_kernels.HaltCheck``), on the whole model forward (no cache, so early exit is live).

Three cases: ``act_threshold=100`` (no row ever halts: every loop runs under both lags, so the
difference is the per-iteration sync alone), and two where every row halts early -- the halting
linear set to a constant probability (weight 0, bias logit(p)) with the default threshold 0.99:
p = 0.3 halts every row after 4 loops, p ~ 1 after 1 loop. There lag 1 runs one extra iteration
(the logits are identical: a halted row's weight is exactly 0). Interleaved
repetitions, medians; one JSON row per case appended to ``bench/results/<device>/halt_check.jsonl``.

    python tools/halt_check_bench.py [--config 1b|mid] [--reps 15]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mythos  # noqa: E402
import mythos.model as mm  # noqa: E402
import mythos_kernels as K  # noqa: E402
from bench.devinfo import default_device, device_slug, run_info  # noqa: E402
from bench.harness import append_jsonl  # noqa: E402
from bench.model import CONFIGS, _sync  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None, help="1b (GPU default) or mid (CPU default)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = default_device()
    cfg_name = args.config or ("1b" if dev.type == "cuda" else "mid")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [(1, 256), (8, 2048)] if dev.type == "cuda" else [(1, 64), (2, 256)]
    out = args.out or os.path.join(ROOT, "bench", "results", device_slug(dev), "halt_check.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    orig = K.HaltCheck
    rows = []
    kw = dict(CONFIGS[cfg_name])
    torch.manual_seed(0)
    with torch.device(dev):
        model = mythos.OpenMythos(mythos.MythosConfig(**kw)).to(dtype=dtype).eval()
    n_loops = kw["max_loop_iters"]
    halt = model.recurrent.act.halt
    w0, b0 = halt.weight.detach().clone(), halt.bias.detach().clone()
    cases = [("no exit", 100.0, None), ("all halt after 4 loops", 0.99, 0.3),
             ("all halt after 1 loop", 0.99, 1.0)]
    for case, thr, p_const in cases:
        model.recurrent.cfg.act_threshold = thr      # read at every forward
        with torch.no_grad():
            if p_const is None:
                halt.weight.copy_(w0)
                halt.bias.copy_(b0)
            else:
                halt.weight.zero_()
                halt.bias.fill_(20.0 if p_const >= 1.0 else float(torch.logit(torch.tensor(p_const))))
        for B, T in shapes:
            ids = torch.randint(0, kw["vocab_size"], (B, T), device=dev)
            times: dict[int, list[float]] = {0: [], 1: []}
            outs = {}
            with torch.no_grad():
                for rep in range(args.reps + 2):
                    for lag in (0, 1):
                        mm.K.HaltCheck = functools.partial(orig, lag=lag)
                        try:
                            _sync(dev)
                            t0 = time.perf_counter()
                            o = model(ids, n_loops=n_loops)
                            _sync(dev)
                            dt = time.perf_counter() - t0
                        finally:
                            mm.K.HaltCheck = orig
                        if rep >= 2:                   # two warm-up rounds
                            times[lag].append(dt)
                        outs[lag] = o
            same = bool(torch.equal(outs[0], outs[1]))
            med = {lag: statistics.median(ts) * 1e3 for lag, ts in times.items()}
            row = {"kind": "halt_check", "case": case, "config": cfg_name,
                   "dtype": str(dtype).split(".")[-1], "act_threshold": thr,
                   "halt_probability": p_const, "n_loops": n_loops, "shape": {"B": B, "T": T},
                   "lag0_ms": med[0], "lag1_ms": med[1], "lag0_s": times[0], "lag1_s": times[1],
                   "saved_per_iteration_ms": (med[0] - med[1]) / n_loops,
                   "logits_identical": same, **run_info(dev)}
            rows.append(row)
            print(f"{case:<24} B={B} T={T:<5} lag0 {med[0]:8.2f} ms  lag1 {med[1]:8.2f} ms  "
                  f"ratio {med[0] / med[1]:.3f}  logits identical: {same}", flush=True)
    append_jsonl(out, rows)
    print(f"appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
