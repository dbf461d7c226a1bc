"""``python -m bench``: the quick benchmark (a few minutes on a CPU); ``--full`` for the
performance-target shapes. See ``bench/README.md``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import ceilings as _ceil
from .devinfo import REPO, default_device, device_slug, git_commit, load_avg, triton_version
from .harness import CUDA_ONLY_REASON, LEVELS, MODES, all_ops, check_selection, run_ops, select_ops


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _threads(s: str) -> str:
    """--threads: ``auto`` or an int >= 1 (argparse type)."""
    if s != "auto":
        try:
            n = int(s)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'auto', got {s!r}")
    return s


def _seconds(s: str) -> float:
    """--time-budget: a finite number of seconds > 0 (argparse type)."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {s!r}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time eager (open-mythos ops) / reference / torch.compile / Triton side by "
                    "side per op, and mythos vs open-mythos end to end.")
    ap.add_argument("--full", action="store_true",
                    help="the performance-target shapes (meant for a GPU)")
    ap.add_argument("--level", choices=LEVELS, help="tiny | quick | full (overrides --full)")
    ap.add_argument("--ops", help="comma list of ops or groups (default: all); see --list")
    ap.add_argument("--providers", help="comma list, e.g. eager,reference,compile,triton")
    ap.add_argument("--modes", help=f"comma list of {','.join(MODES)}")
    ap.add_argument("--model", dest="model", action="store_true", default=None,
                    help="run only the model-level suites (mythos vs open-mythos)")
    ap.add_argument("--no-model", dest="model", action="store_false",
                    help="skip the model-level suites")
    ap.add_argument("--suites", help="model suites: prefill,decode,generate,generate_compiled "
                    "(default all; the compiled one is in the full plans only); suites run only "
                    "when named: train (one optimizer step, bench/train.py) and the CPU suites "
                    "compare,linear_split,moe_forms (bench/suites.py)")
    ap.add_argument("--out", help="results folder (default bench/results/<device-slug>/)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--compile", action="store_true",
                    help="include torch.compile on CPU in quick mode (slow to compile)")
    ap.add_argument("--threads", default="auto", type=_threads,
                    help="torch CPU threads: a number, or auto (default): torch's choice, but 1 "
                         "when other processes already load the CPUs (OpenMP threads then stall "
                         "on every parallel region and timings jump by whole scheduler ticks)")
    ap.add_argument("--recalibrate", action="store_true", help="measure the ceilings again")
    ap.add_argument("--time-budget", type=_seconds,
                    help="seconds; measurements past it are skipped (reported as such)")
    ap.add_argument("--no-plot", action="store_true", help="do not draw PNGs")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--list", action="store_true", help="list ops, groups and providers")
    args = ap.parse_args(argv)
    _check_args(ap, args)
    return args


def _writable_dir(path: Path) -> str | None:
    """Why results cannot be written under ``path`` (a folder, made if missing), or None. Writes
    nothing: an existing file is only opened for append, a new folder only probed with a
    temporary file in its nearest existing parent."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a folder"
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
        results = path / "results.jsonl"
        if results.exists():
            with open(results, "a"):
                pass
    except OSError as exc:
        return f"cannot write in {parent} ({exc.strerror or exc})"
    return None


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value checked before anything is measured or written: ``ap.error`` (exit 2) on a
    name that selects nothing, an unknown device, or an output folder that cannot be written."""
    if args.list:
        return
    try:
        args.device_ = torch.device(args.device) if args.device else default_device()
    except RuntimeError:
        ap.error(f"--device must be cpu or cuda (cuda:N), got {args.device!r}")
    if args.device_.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device_.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    args.level = args.level or ("full" if args.full else "quick")
    run_opsuite, run_model = args.model is not True, args.model is not False
    if not run_opsuite and (args.ops or args.providers or args.modes):
        ap.error("--ops, --providers and --modes select op suites: not with --model")
    if not run_model and args.suites:
        ap.error("--suites selects model suites: not with --no-model")
    if run_opsuite:
        try:
            args.ops_ = select_ops(_csv(args.ops))
            check_selection(args.ops_, args.level, args.device_, _csv(args.providers),
                            _csv(args.modes))
        except (KeyError, ValueError) as exc:
            ap.error(str(exc.args[0] if exc.args else exc))
    if run_model:
        from .model import SUITES
        from .suites import NAMED_SUITES

        for name in _csv(args.suites) or ():
            if name not in SUITES and name not in NAMED_SUITES and name != "train":
                ap.error(f"--suites: unknown suite {name!r}; known: "
                         f"{', '.join((*SUITES, 'train', *NAMED_SUITES))}")
    args.out_dir = Path(args.out) if args.out else REPO / "bench" / "results" / device_slug(args.device_)
    why = _writable_dir(args.out_dir)
    if why:
        ap.error(f"--out: {why}")


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
    device, level, out_dir = args.device_, args.level, args.out_dir
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
        run_ops(args.ops_, level=level, device=device, out_path=results,
                providers=_csv(args.providers), modes=_csv(args.modes),
                compile_on_cpu=args.compile, ceil=ceil, progress=not args.quiet,
                time_budget_s=args.time_budget)
    if run_model:
        from .model import SUITES, run_model_suite

        left = None
        if args.time_budget is not None:
            left = max(0.0, args.time_budget - (time.perf_counter() - t0))
        from .suites import NAMED_SUITES, run_named_suites

        requested = _csv(args.suites) or list(SUITES)
        if "train" in requested:  # one optimizer step, mythos vs open-mythos (bench/train.py)
            from .train import run_train_suite

            run_train_suite(level, device, out_path=results)
        suites = tuple(s for s in requested if s not in NAMED_SUITES and s != "train")
        if suites:
            run_model_suite(level, device, out_path=results, suites=suites,
                            progress=not args.quiet, time_budget_s=left)
        named = [s for s in requested if s in NAMED_SUITES]      # CPU measurements, any --device
        run_named_suites(named, level, out_dir if args.out else REPO / "bench" / "results" / "cpu")
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
