"""``python -m bench``: the quick benchmark (a few minutes on a 2-core CPU); ``--full`` for the
performance-target shapes. See ``bench/README.md``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import ceilings as _ceil
from .devinfo import REPO, default_device, device_slug, git_commit, load_avg, triton_version
from .harness import CUDA_ONLY_REASON, LEVELS, MODES, all_ops, run_ops, select_ops


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time eager (open-mythos ops) / reference / torch.compile / Triton side by "
                    "side per op, and mythos vs open-mythos end to end.")
    ap.add_argument("--full", action="store_true",
                    help="the performance-target shapes of the kernel issues (meant for a GPU)")
    ap.add_argument("--level", choices=LEVELS, help="tiny | quick | full (overrides --full)")
    ap.add_argument("--ops", help="comma list of ops or groups (default: all); see --list")
    ap.add_argument("--providers", help="comma list, e.g. eager,reference,compile,triton")
    ap.add_argument("--modes", help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--model", dest="model", action="store_true", default=None,
                    help="run only the model-level suites (mythos vs open-mythos)")
    ap.add_argument("--no-model", dest="model", action="store_false",
                    help="skip the model-level suites")
    ap.add_argument("--suites", help="model suites: prefill,decode,generate,generate_compiled,train "
                    "(default all; the compiled one is in the full plans only)")
    ap.add_argument("--out", help="results folder (default bench/results/<device-slug>/)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--compile", action="store_true",
                    help="include torch.compile on CPU in quick mode (slow to compile)")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads: a number, or auto (default): torch's choice, but 1 "
                         "when other processes already load the CPUs (OpenMP threads then stall "
                         "on every parallel region and timings jump by whole scheduler ticks)")
    ap.add_argument("--recalibrate", action="store_true", help="measure the ceilings again")
    ap.add_argument("--time-budget", type=float,
                    help="seconds; measurements past it are skipped (reported as such)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw PNGs")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--list", action="store_true", help="list ops, groups and providers")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Run the benchmark; torch's thread count is restored on return (called in-process, e.g.
    by the tests, a busy machine's switch to one thread must not outlive the call)."""
    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads != "auto":
        torch.set_num_threads(int(args.threads))
    if args.list:
        for op in all_ops().values():
            print(f"{op.name:14s} group={op.group:10s} providers={','.join(op.providers)}  "
                  f"modes={','.join(op.modes)}  -- {op.description}")
        return 0
    device = torch.device(args.device) if args.device else default_device()
    level = args.level or ("full" if args.full else "quick")
    out_dir = Path(args.out) if args.out else REPO / "bench" / "results" / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    t0 = time.perf_counter()

    print(f"mythos bench: level={level} device={device} "
          f"({_ceil.device_name(device)}), torch {torch.__version__}, "
          f"triton {triton_version() or 'not installed'}, commit {git_commit()}")
    if device.type != "cuda":
        print(f"No CUDA GPU: measuring the CPU fallback (reference) against open-mythos's op "
              f"sequences and model. {CUDA_ONLY_REASON}; on a GPU this command runs every "
              "Triton kernel too.")
        la, n = load_avg(), os.cpu_count() or 1
        if la is not None and la > 0.8 * n:
            if args.threads == "auto" and torch.get_num_threads() > 1:
                torch.set_num_threads(1)
                print(f"busy CPU (load average {la} on {n} CPUs): using 1 torch thread, which "
                      "times far more steadily here (--threads N overrides).")
            print(f"WARNING: load average {la} on {n} CPUs: other processes compete, CPU timings "
                  "will be noisy (rows record load_avg and threads).")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("WARNING: TRITON_INTERPRET is set: Triton runs in the interpreter, timings of "
              "'triton' rows are meaningless.")
    ceil = _ceil.get_ceilings(device, refresh=args.recalibrate)
    print(f"ceilings ({_ceil.cache_path()}): copy {ceil['copy_gbps']:.3g} GB/s, matmul "
          + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in sorted(ceil["matmul_tflops"].items())))

    run_model = args.model is not False
    run_opsuite = args.model is not True
    if run_opsuite:
        try:
            ops = select_ops(_csv(args.ops))
        except KeyError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        run_ops(ops, level=level, device=device, out_path=results,
                providers=_csv(args.providers), modes=_csv(args.modes),
                compile_on_cpu=args.compile, ceil=ceil, progress=not args.quiet,
                time_budget_s=args.time_budget)
    if run_model:
        from .model import SUITES, run_model_suite

        left = None
        if args.time_budget is not None:
            left = max(0.0, args.time_budget - (time.perf_counter() - t0))
        suites = tuple(_csv(args.suites) or SUITES)
        if "train" in suites:  # one optimizer step, mythos vs open-mythos (bench/train.py)
            from .train import run_train_suite

            run_train_suite(level, device, out_path=results)
            suites = tuple(s for s in suites if s != "train")
        if suites:
            run_model_suite(level, device, out_path=results, suites=suites,
                            progress=not args.quiet, time_budget_s=left)
    print(f"\nresults appended to {results}")
    if not args.no_plot and results.exists():
        try:
            from .plot import plot_file

            pngs = plot_file([results], out_dir)
            print(f"plots: {', '.join(str(p.relative_to(out_dir)) for p in pngs)} in {out_dir}")
        except Exception as exc:  # plotting must not lose a run
            print(f"plotting failed: {type(exc).__name__}: {exc}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
