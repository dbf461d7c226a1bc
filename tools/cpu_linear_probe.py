"""CPU probe behind ``mythos_kernels.linear.dense``: F.linear against the split matrix-vector
product (the weight's two row halves in one bmm) for few rows, with weights not in cache; and the
MoE's CPU inference forms against the sorted reference.

Each timing cycles through enough distinct weights (about 150 MB) that every product reads its
weight from memory, as a decode step does; the variants alternate and the best of three rounds is
kept. Appends one JSON row to bench/results/cpu/linear_probe.jsonl.

    python tools/cpu_linear_probe.py
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, cpu_results, time_interleaved  # noqa: E402

SHAPES = [(160, 512), (256, 512), (512, 512), (512, 682), (1364, 512), (2048, 512)]
ROWS = [1, 4, 8, 16]


def _per_call_us(fn, n_weights: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) / n_weights)
    return best * 1e6


def probe_linear(N: int, K: int, M: int) -> dict:
    nw = max(4, int(150e6 // (N * K * 4)))
    ws = [torch.randn(N, K) for _ in range(nw)]
    halves = [w.view(2, N // 2, K).transpose(1, 2) for w in ws]
    x = torch.randn(M, K)
    xe = x.expand(2, M, K)
    lin = _per_call_us(lambda: [F.linear(x, w) for w in ws], nw)
    split = _per_call_us(lambda: [torch.bmm(xe, h) for h in halves], nw)
    return {"N": N, "K": K, "rows": M, "linear_us": round(lin, 1), "split_us": round(split, 1),
            "speedup": round(lin / split, 2), "linear_GBps": round(N * K * 4 / lin / 1e3, 1),
            "split_GBps": round(N * K * 4 / split / 1e3, 1)}


def probe_moe(reps: int = 9) -> list[dict]:
    """One MoE call of 512 tokens, top-4 of 64 experts: the sorted reference against
    ``moe_experts_cpu`` under balanced routing (its padded form) and skewed routing (its sorted
    form: three quarters of the pairs on four experts, as in a random-init model)."""
    M = importlib.import_module("mythos_kernels.cpu.moe")
    R = importlib.import_module("mythos_kernels.moe")
    N, k, E, D, Fh = 512, 4, 64, 512, 128
    x = torch.randn(N, D)
    w13, w2 = torch.randn(E, D, 2 * Fh) * 0.02, torch.randn(E, Fh, D) * 0.02
    weights = torch.softmax(torch.randn(N, k), -1)
    balanced = (torch.arange(N * k) % E)[torch.randperm(N * k)].view(N, k)
    skewed = torch.where(torch.rand(N, k) < 0.75, torch.arange(k).expand(N, k),
                         torch.randint(k, E, (N, k)))
    rows = []
    for routing, idx in (("balanced", balanced), ("skewed", skewed)):
        with torch.no_grad():
            ts = time_interleaved({
                "reference_ms": lambda: R.moe_experts_reference(x, weights, idx, w13, w2),
                "cpu_ms": lambda: M.moe_experts_cpu(x, weights, idx, w13, w2)}, reps)
        r = {k_: round(statistics.median(v) * 1e3, 2) for k_, v in ts.items()}
        r.update(routing=routing, N=N, k=k, E=E, D=D, F=Fh)
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=cpu_results("linear_probe.jsonl"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for N, K in SHAPES:
        for M in ROWS:
            r = probe_linear(N, K, M)
            rows.append(r)
            print(f"N={N:5d} K={K:4d} rows={M:2d}: F.linear {r['linear_us']:7.1f} us "
                  f"({r['linear_GBps']:5.1f} GB/s)  split {r['split_us']:7.1f} us "
                  f"({r['split_GBps']:5.1f} GB/s)  {r['speedup']:.2f}x", flush=True)
    moe = probe_moe()
    for r in moe:
        print(f"MoE call, 512 tokens top-4 of 64, {r['routing']} routing: sorted reference "
              f"{r['reference_ms']} ms, moe_experts_cpu {r['cpu_ms']} ms")
    rec = {"linear": rows, "moe": moe}
    rec.update(run_info(torch.device("cpu")))
    append_jsonl(args.out, [rec])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
