"""The command line of the experiments: one subcommand per experiment, three sizes (``--quick``
for CI, the default for a 2-core CPU in about ten minutes, ``--scale`` for a GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Optional, Sequence

from mythos.train import INIT_SCHEMES
from mythos.train.cli import int_at_least
from mythos.train.trainer import resolve_device

from .common import Size, set_threads

SIZES = {
    # a smoke test: well under two minutes on an idle 2-core CPU
    "quick": Size(dim=32, expert_dim=32, n_experts=4, nodes=5, train_loops=2, steps=150, batch_size=16,
                  seeds=(0,), train_hops=(1, 2), eval_hops=(1, 2, 3, 4), eval_batches=1, eval_batch_size=128,
                  eval_every=50),
    # about ten minutes on an idle 2-core CPU per command
    "default": Size(),
    # a single GPU
    "scale": Size(dim=256, expert_dim=256, n_experts=8, nodes=12, train_loops=4, steps=4000, batch_size=128,
                  lr=1e-3, seeds=(0, 1, 2), train_hops=(1, 2, 3, 4), eval_hops=tuple(range(1, 9)),
                  eval_batches=4, eval_batch_size=512, eval_every=500),
}

EPILOG = """experiments:
  depth     train with L loops under three regimes (fixed depth L; depth sampled per step around L,
            Poisson-lognormal; sampled depth with ACT off), evaluate at n_loops 1..4L and at hop
            counts inside and beyond the training range. Writes DIR/results.json, DIR/depth.png.
  act-scan  one model per act_threshold in {0.8, 0.9, 0.95, 0.99, 0.999} (depth sampled around L,
            a small ponder term): accuracy and mean halting depth. DIR/results.json, DIR/act_scan.png.
  vs-dense  the looped model (prelude, one recurrent block run L times, coda) against the same
            architecture run once (same parameters) and against a non-looped stack with as many
            distinct blocks as the looped model runs (same compute), same task and token budget.
            DIR/results.json, DIR/vs_dense.png.
Every experiment saves its trained models as DIR/models/*.safetensors (+ a JSON of config and run).
Task: pointer chasing over a random permutation of n nodes, one token per edge x -> pi(x), then s,
h marks '?' and ':'; the answer is pi^h(s) (one content lookup per hop); held-out sequences. Weights: --init fan-in
(N(0, 1/fan_in) projections, N(0, 1) embedding) by default: at these widths open-mythos's N(0, 0.02)
stays at chance far longer than these runs last.
Sizes: --quick dim 32, 5 nodes, L 2, 150 steps, one seed; default dim 48, 6 nodes, L 3, hops 1-2
trained and 1-4 evaluated, 1500 steps of batch 64, seeds 0,1,2 (act-scan: 0,1); --scale dim 256,
12 nodes, L 4, hops 1-4 trained and 1-8 evaluated, 4000 steps of batch 128 (for a GPU)."""

HELP = {"depth": "accuracy against n_loops 1..4L and hop count, three training regimes",
        "act-scan": "accuracy and halting depth for act_threshold 0.8 ... 0.999",
        "vs-dense": "looped model against same-parameter and same-compute non-looped models"}


_pos_int = int_at_least(1)


def _seeds(s: str) -> tuple:
    try:
        v = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or any(x < 0 for x in v):
        raise argparse.ArgumentTypeError(f"expected one or more non-negative integers, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mythos.experiments",
                                description="Depth experiments on mythos's training path.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True, metavar="{depth,act-scan,vs-dense}")
    for name in ("depth", "act-scan", "vs-dense"):
        s = sub.add_parser(name, help=HELP[name], description=HELP[name],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--out", required=True, help="output folder (results.json, the plot, models/)")
        size = s.add_mutually_exclusive_group()
        size.add_argument("--quick", action="store_true",
                          help="smoke-test sizes (under two minutes on an idle 2-core CPU)")
        size.add_argument("--scale", action="store_true", help="GPU sizes (dim 256, 4000 steps of batch 128)")
        s.add_argument("--steps", type=_pos_int, default=None, help="override the training steps")
        s.add_argument("--train-loops", type=_pos_int, default=None, help="override L, the training depth")
        s.add_argument("--init", choices=INIT_SCHEMES, default=None,
                       help="override the weight initialisation (default: fan-in)")
        s.add_argument("--seeds", type=_seeds, default=None,
                       help="override the seeds, e.g. 0,1,2 (mean and spread are reported)")
        s.add_argument("--device", default="auto", help="torch device (auto: cuda when available)")
        s.add_argument("--threads", type=_pos_int, default=1,
                       help="torch CPU threads (tiny models train fastest on one)")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def size_from_args(args: argparse.Namespace) -> Size:
    size = SIZES["quick" if args.quick else "scale" if args.scale else "default"]
    over = {k: v for k, v in (("steps", args.steps), ("train_loops", args.train_loops),
                              ("seeds", args.seeds), ("init", args.init)) if v is not None}
    if args.experiment == "act-scan" and not (args.quick or args.scale) and args.seeds is None:
        over["seeds"] = (0, 1)      # five models per seed: two seeds keep the default near ten minutes
    return dataclasses.replace(size, **over)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"argument --device: {exc}")
    size = size_from_args(args)
    set_threads(args.threads if args.device in ("auto", "cpu") else None)
    t0 = time.perf_counter()
    if args.experiment == "depth":
        from . import depth as mod
    elif args.experiment == "act-scan":
        from . import act_scan as mod
    else:
        from . import vs_dense as mod
    res = mod.run(args.out, size, device=args.device, progress=not args.no_progress)
    print(mod.summary(res))
    print(f"wrote {args.out}/results.json and the plot in {time.perf_counter() - t0:.0f} s")
    return 0
