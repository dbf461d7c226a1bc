"""``python -m mythos.train``: train a looped MoE model; ``python -m mythos.train plot DIR``
draws a run's curves."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Optional, Sequence

from .checkpoint import CheckpointError, checkpoint_dir, config_mismatch, latest_checkpoint, list_checkpoints
from .data import TASKS
from .distributed import STRATEGIES, teardown
from .init import INIT_SCHEMES
from .presets import config_names, resolve_config
from .recurrence import LOOP_SAMPLING
from .trainer import DTYPES, TrainConfig, Trainer, resume_trainer

# settings a resumed run may change; any other flag given with --resume must match the run's
RESUME_OVERRIDES = ("steps", "eval_every", "save_every", "log_every", "keep", "eval_batches",
                    "device", "dist")


def int_at_least(lo: int, hi: Optional[int] = None):
    """An argparse type: an int >= ``lo`` (and <= ``hi``)."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
    if hi is not None:
        what = f"an integer in [{lo}, {hi}]"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v
    return parse


_pos_int, _nonneg_int = int_at_least(1), int_at_least(0)


def _finite(lo: float, strict: bool):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} "
                                             f"{lo:g}, got {s}")
        return v
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown for options that take a value, not for on/off switches (whose default is
    the switch not given)."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _check_out(flag: str, path: str) -> None:
    """``path`` can be a run folder: not empty, not a file, under a folder (creatable)."""
    if not path:
        raise ValueError(f"{flag} must name a folder, got an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path!r}: {parent!r} is not a writable folder")


def build_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """The training parser; ``explicit_only``: every default suppressed (to see which flags a
    command line gave)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m mythos.train",
        description="Train a mythos looped MoE model on a built-in task or local text files. "
                    "Writes DIR/metrics.jsonl (one JSON row per logged step) and checkpoints in "
                    "DIR/checkpoints. 'python -m mythos.train plot DIR' draws the curves.",
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS if explicit_only else None)

    def a(*names, **kw):
        if explicit_only:
            kw["default"] = argparse.SUPPRESS
        return p.add_argument(*names, **kw)

    a("--config", default=d.config, help="model: a preset or variant name "
      f"({', '.join(config_names())}) or a JSON file of MythosConfig fields")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=argparse.SUPPRESS if explicit_only else None,
                     help=f"a built-in task ({', '.join(TASKS)}); the default when --data is absent "
                          "is pointer")
    src.add_argument("--data", nargs="+", metavar="FILE",
                     default=argparse.SUPPRESS if explicit_only else None,
                     help="local text files for byte-level language modelling")
    a("--hops", type=_pos_int, default=d.hops, help="the task's hop count (its difficulty)")
    a("--tokenizer", default=None, help="a locally cached Hugging Face tokenizer for --data "
      "(needs transformers; default: bytes)")
    a("--steps", type=_pos_int, default=d.steps, help="optimizer steps in all (a resumed run "
      "continues up to this)")
    a("--batch-size", type=_pos_int, default=d.batch_size, help="sequences per micro-batch")
    a("--seq-len", type=_pos_int, default=d.seq_len, help="tokens per sequence")
    a("--lr", type=_finite(0, True), default=d.lr, help="peak learning rate (AdamW)")
    a("--min-lr-ratio", type=_finite(0, False), default=d.min_lr_ratio,
      help="final learning rate of the cosine decay, as a fraction of --lr")
    a("--warmup", type=_nonneg_int, default=d.warmup, help="linear warmup steps")
    a("--decay-steps", type=_pos_int, default=d.decay_steps, help="cosine decay horizon "
      "(default: --steps of the run's first command)")
    a("--weight-decay", type=_finite(0, False), default=d.weight_decay,
      help="AdamW weight decay (matrices only)")
    a("--clip", type=_finite(0, False), default=d.clip, help="gradient-norm clip (0: none)")
    a("--grad-accum", type=_pos_int, default=d.grad_accum, help="micro-batches per step")
    a("--seed", type=int_at_least(0, 2 ** 63 - 1), default=d.seed,
      help="seed of weights, data and loop counts")
    a("--out", default=d.out, metavar="DIR", help="run folder (metrics.jsonl, checkpoints)")
    a("--resume", default=None, metavar="DIR", help="continue the run in DIR from its newest "
      "checkpoint up to --steps (other settings are the run's)")
    a("--keep", type=_pos_int, default=d.keep, help="checkpoints kept (the newest)")
    a("--eval-every", type=_nonneg_int, default=d.eval_every, help="evaluate every N steps (0: never)")
    a("--eval-batches", type=_pos_int, default=d.eval_batches, help="held-out batches per evaluation")
    a("--save-every", type=_nonneg_int, default=d.save_every,
      help="checkpoint every N steps (0: only at the end)")
    a("--log-every", type=_pos_int, default=d.log_every, help="write a metrics row every N steps")
    a("--n-loops", type=_finite(1, False), default=d.n_loops,
      help="recurrent loops per step (the mean when sampled)")
    a("--loop-sampling", choices=LOOP_SAMPLING, default=d.loop_sampling,
      help="loop count per step: fixed, Poisson-lognormal around --n-loops, or uniform in "
           "[--min-loops, --max-loops]")
    a("--min-loops", type=_pos_int, default=d.min_loops, help="smallest loop count")
    a("--max-loops", type=_pos_int, default=d.max_loops,
      help="loop-count cap (default: the config's max_loop_iters)")
    a("--grad-loops", type=_pos_int, default=d.grad_loops,
      help="truncated backprop: only the last K loops keep gradients (default: all)")
    a("--no-act", dest="act", action="store_false", default=True,
      help="ACT off: every loop runs, output is the last loop's state")
    a("--ponder-weight", type=_finite(0, False), default=d.ponder_weight,
      help="weight of the ponder loss (mean expected halting depth)")
    a("--checkpoint-activations", action="store_true", default=False,
      help="recompute each loop iteration in backward (less memory)")
    a("--bias-update-rate", type=_finite(0, False), default=d.bias_update_rate,
      help="router-bias update speed gamma (aux-loss-free balancing; 0: off)")
    a("--init", choices=INIT_SCHEMES, default=d.init,
      help="weights of a new run: open-mythos's N(0, 0.02), or fan-in (N(0, 1/fan_in) projections, "
           "N(0, 1) embedding), which small models (dim ~50) need to leave chance")
    a("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    a("--dtype", choices=DTYPES, default=d.dtype,
      help="auto: bf16 autocast on GPU, fp32 on CPU")
    a("--dist", choices=STRATEGIES, default=d.dist,
      help="multi-process training under torchrun: fsdp (FSDP2 sharding) or ddp (replicas); "
           "gloo on CPU, NCCL on CUDA. Needs torchrun's environment (an error without it); "
           "--batch-size is then the global batch, split over the ranks")
    a("--no-progress", dest="progress", action="store_false", default=True,
      help="no progress bar")
    return p


def _settings(ns: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(ns).items() if k in names}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (argument errors exit 2 before any step)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        from .plot import main as plot_main
        return plot_main(argv[1:])
    if argv and argv[0] == "export":
        return _export(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = _settings(build_parser(explicit_only=True).parse_args(argv))
    if ns.data:   # absolute: a resume from another working folder finds the same files
        ns.data = [os.path.abspath(p) for p in ns.data]
        if "data" in given:
            given["data"] = ns.data
    if ns.resume is None and "hops" in given and ns.data:
        parser.error("--hops sets a built-in task's difficulty: it has no effect with --data")
    if ns.resume is None and "tokenizer" in given and not ns.data:
        parser.error("--tokenizer encodes --data files: it has no effect with a task")
    try:
        if ns.resume is not None:
            trainer = _resume(ns, given)
        else:
            if ns.task is None and not ns.data:
                ns.task = "pointer"
            _check_out("--out", ns.out)
            if list_checkpoints(ns.out):
                raise ValueError(f"--out {ns.out!r} already holds checkpoints of a run: continue it "
                                 f"with --resume {ns.out} or choose another --out")
            if os.path.exists(os.path.join(ns.out, "metrics.jsonl")):
                raise ValueError(f"--out {ns.out!r} holds metrics.jsonl of an earlier run (stopped "
                                 "before its first checkpoint): choose another --out or remove it")
            trainer = Trainer(TrainConfig(**_settings(ns)))
    except (ValueError, TypeError) as exc:
        teardown()
        parser.error(str(exc) + _older_checkpoint_hint(exc, ns.resume))
    try:
        if trainer.step >= trainer.tc.steps:
            print(f"nothing to do: the run is at step {trainer.step} of --steps {trainer.tc.steps}")
            return 0
        if trainer.is_main:
            os.makedirs(trainer.tc.out, exist_ok=True)
            with open(os.path.join(trainer.tc.out, "command.json"), "a") as f:
                f.write(json.dumps({"argv": argv, "start_step": trainer.step}) + "\n")
        trainer.run(progress=ns.progress)
    except KeyboardInterrupt:
        print(f"interrupted; continue from the newest checkpoint with: python -m mythos.train "
              f"--resume {trainer.tc.out} --steps {trainer.tc.steps}", file=sys.stderr)
        return 130
    finally:
        teardown()
    return 0


def _export(argv: list) -> int:
    """``python -m mythos.train export CHECKPOINT OUT.safetensors``: a checkpoint's weights (a
    --dist run's DCP shards or a single-process one) as one safetensors file."""
    p = argparse.ArgumentParser(prog="python -m mythos.train export",
                                description="Write a checkpoint's weights as one model.safetensors "
                                            "file (the single-process format).")
    p.add_argument("checkpoint", help="a checkpoint folder (DIR/checkpoints/step-N) or a run folder "
                                      "(its newest checkpoint)")
    p.add_argument("out", help="the .safetensors file to write")
    ns = p.parse_args(argv)
    from .distributed import export_safetensors

    path = ns.checkpoint
    if os.path.isdir(checkpoint_dir(path)):
        path = latest_checkpoint(path) or path
    try:
        export_safetensors(path, ns.out)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    print(f"wrote {ns.out}")
    return 0


def _older_checkpoint_hint(exc: Exception, run_dir: Optional[str]) -> str:
    """Where a resume failed on its newest checkpoint and an older one is kept: how to resume
    from that one instead."""
    if not isinstance(exc, CheckpointError) or run_dir is None:
        return ""
    kept = list_checkpoints(run_dir)
    if len(kept) < 2 or kept[-1][1] not in str(exc):
        return ""
    return (f" (the older checkpoint {kept[-2][1]!r} is kept: move {kept[-1][1]!r} away to "
            "resume from it)")


def _resume(ns: argparse.Namespace, given: dict) -> Trainer:
    run_dir = ns.resume
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"--resume {run_dir!r} is not a folder")
    if "out" in given and os.path.realpath(given["out"]) != os.path.realpath(run_dir):
        raise ValueError(f"--out {given['out']!r} with --resume {run_dir!r}: a resumed run writes "
                         "into its own folder (omit --out)")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"--resume {run_dir!r} holds no checkpoint")
    from .checkpoint import read_meta

    meta = read_meta(path)
    saved = meta.get("train") or {}
    if "config" in given:
        diff = config_mismatch(meta["config"], resolve_config(given["config"]))
        if diff:
            raise CheckpointError(f"--config {given['config']!r} does not match the checkpoint "
                                  f"{path!r}: " + "; ".join(diff))
    for k, v in given.items():
        if k in RESUME_OVERRIDES or k in ("config", "out"):
            continue
        if k in saved and saved[k] != v:
            raise ValueError(f"--{k.replace('_', '-')} {v!r} differs from the run's {saved[k]!r}: "
                             f"a resumed run keeps its settings (only {', '.join(RESUME_OVERRIDES)} "
                             "may change)")
    overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDES}
    overrides["dist"] = given.get("dist")   # how this launch runs, not the saved run's
    return resume_trainer(run_dir, overrides)
