"""The CPU MoE's two many-pair forms side by side: ``moe_experts_padded`` (two bmms over a slab
of every expert padded to the largest count) and ``moe_experts_sorted`` (per-expert segments),
over routings from balanced to skewed and several expert shapes, weights read from memory (a
64 MB read between calls, as in a model whose other weights pass through the cache between two
MoE calls). Prints which form ``moe_experts_cpu``'s rule picks and how far that is from the
faster one; appends one JSON row per routing to bench/results/cpu/moe_forms.jsonl.

    python tools/cpu_moe_forms.py [--reps 5]

Rows before commit 4247c4b time the sorted form without expert pairs (``_segment_pair``).
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

from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, cpu_results  # noqa: E402
from mythos_kernels.cpu import moe as M  # noqa: E402

# (experts, dim, expert hidden, top-k): the mid config's MoE first
SHAPES = ((64, 512, 128, 4), (16, 256, 64, 2), (32, 1024, 256, 4), (128, 512, 64, 8),
          (8, 512, 512, 2))
TOKENS = (16, 64, 256, 512)
SKEW = (0.0, 0.5, 2.0)    # std of a per-expert logit offset: 0 = balanced in expectation


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=cpu_results("moe_forms.jsonl"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    flush = torch.randn(64_000_000 // 4)

    def timed(f) -> float:
        f()
        xs = []
        for _ in range(args.reps):
            flush.sum()
            t0 = time.perf_counter()
            f()
            xs.append(time.perf_counter() - t0)
        return statistics.median(xs) * 1e3

    info = run_info("cpu")
    rows = []
    with torch.no_grad():
        for E, D, Fh, k in SHAPES:
            w13 = torch.randn(E, D, 2 * Fh) * 0.02
            w2 = torch.randn(E, Fh, D) * 0.02
            for N in TOKENS:
                if N * k <= M.FEW_PAIRS:
                    continue
                x = torch.randn(N, D)
                for skew in SKEW:
                    idx = (torch.randn(N, E) + torch.randn(E) * skew).topk(k, -1).indices
                    w = torch.rand(N, k)
                    flat = idx.reshape(-1)
                    counts = torch.bincount(flat, minlength=E)
                    order = torch.argsort(flat, stable=True)
                    host = counts.tolist()
                    cap = max(host)
                    tp = timed(lambda: M.moe_experts_padded(x, w, idx, w13, w2, counts, order,
                                                            cap))
                    ts = timed(lambda: M.moe_experts_sorted(x, w, idx, w13, w2, host, order))
                    paired = M._pair_segments_ok(x, w13, w2)
                    pick = "padded" if M._padded_is_cheaper(host, N * k, paired) else "sorted"
                    row = {"suite": "cpu_moe_forms", "E": E, "D": D, "F": Fh, "k": k, "N": N,
                           "skew": skew, "cap": cap, "nonempty": E - host.count(0),
                           "padded_ms": round(tp, 3), "sorted_ms": round(ts, 3), "rule": pick,
                           "rule_over_best": round((tp if pick == "padded" else ts)
                                                   / min(tp, ts), 3), **info}
                    rows.append(row)
                    print(f"E={E:3d} D={D:4d} F={Fh:3d} k={k} N={N:3d} skew={skew:.1f} "
                          f"cap={cap:3d} nonempty={row['nonempty']:3d}  padded {tp:7.2f} ms  "
                          f"sorted {ts:7.2f} ms  rule: {pick} ({row['rule_over_best']:.2f}x best)")
    total = sum(r["padded_ms"] if r["rule"] == "padded" else r["sorted_ms"] for r in rows)
    best = sum(min(r["padded_ms"], r["sorted_ms"]) for r in rows)
    print(f"rule's total / best total: {total / best:.3f}; worst case "
          f"{max(r['rule_over_best'] for r in rows):.2f}x")
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
