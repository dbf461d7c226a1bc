"""The training loop: AdamW, linear warmup + cosine decay, gradient clipping and accumulation,
bf16 autocast on GPU, loop counts sampled per step, router-bias updates, evaluation, metrics and
checkpoints. :class:`Trainer` is what ``python -m mythos.train`` runs; its pieces are public for
users' own loops."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from mythos._validate import device_memory_bytes
from mythos.config import MythosConfig, allocation_terms
from mythos.model import OpenMythos

from .balance import LoadTracker, load_stats, moe_layers, update_router_bias
from .checkpoint import (
    CheckpointError,
    is_dcp,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_checkpoint_dcp,
    set_rng_state,
)
from .data import IGNORE, Task, TextLM, make_task
from .distributed import DistContext, all_reduce_sum, check_strategy, full, reduce_loads, setup, wrap
from .distributed import no_sync as _no_sync
from .init import INIT_SCHEMES, init_weights
from .loss import answer_accuracy, lm_loss
from .presets import resolve_config
from .recurrence import LOOP_SAMPLING, LoopSampler, spectral_radius, train_forward

DTYPES = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Every setting of a training run (the command line's flags, same names)."""

    config: str = "tiny"
    task: Optional[str] = None
    hops: int = 2
    data: Optional[list] = None
    tokenizer: Optional[str] = None
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    out: str = "runs/mythos"
    keep: int = 3
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    log_every: int = 1
    n_loops: float = 4
    loop_sampling: str = "fixed"
    min_loops: int = 1
    max_loops: Optional[int] = None
    grad_loops: Optional[int] = None
    act: bool = True
    ponder_weight: float = 0.0
    checkpoint_activations: bool = False
    bias_update_rate: float = 1e-3
    init: str = "open-mythos"
    device: str = "auto"
    dtype: str = "auto"
    dist: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def validate(self, own_task: bool = False) -> None:
        """ValueError naming the first invalid setting; ``own_task``: the run's data is a
        :class:`~mythos.train.Task` object of the caller's (then task and data, if set, are only
        labels)."""
        def pos_int(name, zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
                raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} int, "
                                 f"got {v!r}")

        for n in ("steps", "batch_size", "seq_len", "grad_accum", "keep", "eval_batches",
                  "log_every", "hops", "min_loops"):
            pos_int(n)
        for n in ("warmup", "eval_every", "save_every", "seed"):
            pos_int(n, zero=True)
        for n in ("decay_steps", "max_loops", "grad_loops"):
            if getattr(self, n) is not None:
                pos_int(n)

        def num(name, lo=None, lo_open=False, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"{name} must be <= {hi}, got {v!r}")

        num("lr", 0, lo_open=True)
        num("min_lr_ratio", 0, hi=1)
        num("weight_decay", 0)
        num("clip", 0)
        num("ponder_weight", 0)
        num("bias_update_rate", 0)
        num("n_loops", 1)
        if self.loop_sampling not in LOOP_SAMPLING:
            raise ValueError(f"loop_sampling must be one of {LOOP_SAMPLING}, got {self.loop_sampling!r}")
        check_strategy(self.dist)
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not own_task and (self.task is None) == (not self.data):
            raise ValueError("give exactly one of task (a built-in task) and data (text files)")
        if self.ponder_weight > 0 and not self.act:
            raise ValueError("ponder_weight > 0 needs ACT (act=True): without ACT every position "
                             "runs every loop")


def _check_training_memory(cfg: MythosConfig, device: torch.device) -> None:
    """ValueError before anything is allocated when the weights, their gradients and AdamW's
    two states (4 x the fp32 weights, activations not counted) exceed ``device``'s memory."""
    limit = device_memory_bytes(device)
    weights = sum(allocation_terms(cfg, 4).values())
    if limit is not None and 4 * weights > limit:
        raise ValueError(f"training this config needs about {4 * weights / 2**30:.4g} GiB before "
                         f"activations (the {weights / 2**30:.4g} GiB of fp32 weights, their "
                         f"gradients and AdamW's two states), more than the {limit / 2**30:.4g} "
                         f"GiB of memory of {device}")


def lr_at(tc: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps to ``lr``, then cosine decay to ``lr * min_lr_ratio``
    at ``decay_steps`` (default ``steps``), constant after."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    horizon = tc.decay_steps or tc.steps
    frac = min(max(step - tc.warmup, 0) / max(horizon - tc.warmup, 1), 1.0)
    lo = tc.lr * tc.min_lr_ratio
    return lo + 0.5 * (tc.lr - lo) * (1.0 + math.cos(math.pi * frac))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available")
    return dev


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (fused where torch has it for the device): weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": other, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def build_task(tc: TrainConfig, cfg: MythosConfig) -> Task:
    """The run's data source, checked against the model's vocabulary and context."""
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if tc.task is not None:
        task = make_task(tc.task, tc.seq_len, hops=tc.hops, vocab_size=cfg.vocab_size)
    else:
        task = TextLM.from_files(tc.data, tc.seq_len, tokenizer=tc.tokenizer)
    if task.vocab_size > cfg.vocab_size:
        raise ValueError(f"the data uses {task.vocab_size} token ids, more than the model's "
                         f"vocab_size {cfg.vocab_size}")
    return task


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer:
    """One training run: everything is built and checked on construction, before any step.

    Args:
        tc: the run's settings.
        model_cfg: the model config (default ``resolve_config(tc.config)``).
        task: a data source of the user's own (a :class:`~mythos.train.Task`; default: the one
            ``tc.task`` / ``tc.data`` name). Its batches must fit the model's vocabulary.
    """

    def __init__(self, tc: TrainConfig, model_cfg: Optional[MythosConfig] = None,
                 task: Optional[Task] = None):
        tc.validate(own_task=task is not None)
        if tc.decay_steps is None:   # the horizon is the first command's --steps, kept on resume
            tc.decay_steps = tc.steps
        self.tc = tc
        self.cfg = model_cfg or resolve_config(tc.config)
        # under --dist: the process group (torchrun's), this rank's device and slice of a batch
        self.ctx: Optional[DistContext] = None
        if tc.dist is not None:
            self.ctx = setup(tc.dist, tc.device, tc.batch_size)
            self.device = self.ctx.device
        else:
            self.device = resolve_device(tc.device)
            _check_training_memory(self.cfg, self.device)
        max_loops = tc.max_loops or self.cfg.max_loop_iters
        self.sampler = LoopSampler(tc.loop_sampling, tc.n_loops, max_loops, tc.min_loops)
        if tc.grad_loops is not None and tc.grad_loops > max_loops:
            raise ValueError(f"grad_loops {tc.grad_loops} exceeds max_loops {max_loops}")
        if task is None:
            self.task = build_task(tc, self.cfg)
        elif not isinstance(task, Task):
            raise TypeError(f"task must be a mythos.train.Task, got {type(task).__name__}")
        elif task.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"task {task.name!r} uses {task.vocab_size} token ids, more than the "
                             f"model's vocab_size {self.cfg.vocab_size}")
        elif task.seq_len > self.cfg.max_seq_len:
            raise ValueError(f"task {task.name!r} has seq_len {task.seq_len}, more than the "
                             f"model's max_seq_len {self.cfg.max_seq_len}")
        else:
            self.task = task
        self._own_task = task is not None
        use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        seed_all(tc.seed)
        self.model = init_weights(OpenMythos(self.cfg), tc.init).to(self.device).train()
        self.engine = (wrap(self.model, self.ctx, truncated=tc.grad_loops is not None)
                       if self.ctx is not None else None)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay)
        self.tracker = LoadTracker(self.model)
        self.step = 0          # steps taken
        self._metrics_path = os.path.join(tc.out, "metrics.jsonl")

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoint metadata (rank 0; True in one process)."""
        return self.ctx is None or self.ctx.is_main

    def _batch(self, split: str, step: int, micro: int):
        """This rank's rows of the global batch (all of it in one process)."""
        b = self.task.batch(self.tc.seed, split, step, micro, self.tc.batch_size)
        if self.ctx is not None:
            per = self.tc.batch_size // self.ctx.world
            rows = slice(self.ctx.rank * per, (self.ctx.rank + 1) * per)
            b = dataclasses.replace(b, ids=b.ids[rows], targets=b.targets[rows])
        return b.to(self.device)

    def _micro_dist(self, b, n: int, last: bool) -> tuple[torch.Tensor, float, int]:
        """One micro-batch under DDP/FSDP2: (global mean loss, mean halting depth, loops run)."""
        tc, world = self.tc, self.ctx.world
        n_targets = int(all_reduce_sum((b.targets != IGNORE).sum().reshape(1).to(torch.int64)))
        with _no_sync(self.engine, last):
            total, stats, run = self.engine(b.ids, b.targets, n, max(n_targets, 1), world, tc.act,
                                            tc.grad_loops, tc.checkpoint_activations,
                                            tc.ponder_weight, self._autocast, False)
            (total / tc.grad_accum).backward()
        stats = all_reduce_sum(stats).cpu()
        return stats[0], float(stats[1]) / (b.ids.numel() * world), run

    # -- pieces -----------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns its metrics row. A step
        whose loss or gradient norm is not finite is not applied (``skipped: 1``)."""
        tc, model = self.tc, self.model
        step = self.step
        n = self.sampler(tc.seed, step)
        lr = lr_at(tc, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        self.tracker.reset()
        loss_sum = torch.zeros((), dtype=torch.float64)
        depth_sum = 0.0
        run = 0
        with self.tracker:
            for micro in range(tc.grad_accum):
                b = self._batch("train", step, micro)
                if self.engine is not None:
                    loss_v, depth, r = self._micro_dist(b, n, micro + 1 == tc.grad_accum)
                    loss_sum += loss_v
                    depth_sum += depth
                    run = max(run, r)
                    continue
                with self._autocast():
                    out = train_forward(model, b.ids, n, act=tc.act, grad_loops=tc.grad_loops,
                                        checkpoint=tc.checkpoint_activations)
                    loss = lm_loss(model, out, b.targets)
                    total = loss + tc.ponder_weight * out.ponder if tc.ponder_weight else loss
                (total / tc.grad_accum).backward()
                loss_sum += loss.detach().double().cpu()
                depth_sum += float(out.depth.detach().float().mean())
                run = max(run, out.n_loops)
        gn = torch.nn.utils.clip_grad_norm_(self._params(), tc.clip if tc.clip > 0 else math.inf)
        loss_v = float(loss_sum) / tc.grad_accum
        grad_norm = float(full(gn))
        counts = reduce_loads(self.tracker.counts)
        skipped = not (math.isfinite(loss_v) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
            update_router_bias(model, counts, tc.bias_update_rate)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        row = {"step": self.step, "loss": loss_v, "lr": lr,
               "tokens_per_s": tc.grad_accum * tc.batch_size * self.task.seq_len / max(dt, 1e-9),
               "n_loops": n, "loops_run": run, "grad_norm": grad_norm,
               "rho_A": spectral_radius(model), "mean_halt_depth": depth_sum / tc.grad_accum,
               "skipped": int(skipped)}
        layers = moe_layers(model)
        if layers:
            row.update(load_stats(counts.get(layers[0])))
        return row

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss (and answer accuracy on a task) over ``eval_batches`` held-out batches at the
        mean loop count."""
        tc, model = self.tc, self.model
        n = max(self.sampler.min_loops, min(round(self.sampler.mean), self.sampler.max_loops))
        model.eval()
        losses, correct, total = [], 0, 0
        try:
            for i in range(tc.eval_batches):
                b = self._batch("eval", i, 0)
                if self.engine is not None:
                    n_t = int(all_reduce_sum((b.targets != IGNORE).sum().reshape(1).to(torch.int64)))
                    _, st, _ = self.engine(b.ids, b.targets, n, max(n_t, 1), self.ctx.world, tc.act,
                                           None, False, 0.0, self._autocast, self.task.has_accuracy)
                    st = all_reduce_sum(st).cpu()
                    losses.append(float(st[0]))
                    correct, total = correct + int(st[2]), total + int(st[3])
                    continue
                with self._autocast():
                    out = train_forward(model, b.ids, n, act=tc.act)
                    losses.append(float(lm_loss(model, out.h, b.targets)))
                if self.task.has_accuracy:
                    c, t = answer_accuracy(model, out.h.float(), b.targets)
                    correct, total = correct + c, total + t
        finally:
            model.train()
        row = {"step": self.step, "eval_split": "eval", "eval_loss": sum(losses) / len(losses),
               "n_loops": n}
        if self.task.has_accuracy:
            row["eval_acc"] = correct / max(total, 1)
        return row

    # -- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict:
        opt = {} if self.ctx is not None else {"optimizer": self.optimizer.state_dict()}  # DCP holds it
        return {**opt,
                "schedule": {"step": self.step, "lr": self.tc.lr, "warmup": self.tc.warmup,
                             "decay_steps": self.tc.decay_steps,
                             "min_lr_ratio": self.tc.min_lr_ratio},
                "rng": rng_state(), "data": {"seed": self.tc.seed, "step": self.step},
                "world_size": 1 if self.ctx is None else self.ctx.world,
                "router_bias": {f"{i}": m.router_bias.detach().cpu().clone()
                                for i, m in enumerate(moe_layers(self.model))}}

    def meta(self) -> dict:
        meta = {"config": dataclasses.asdict(self.cfg), "train": train_config_dict(self.tc)}
        if self._own_task:   # a resume needs the same object passed again
            meta["own_task"] = f"{type(self.task).__module__}.{type(self.task).__qualname__}"
        return meta

    def save(self) -> str:
        if self.ctx is not None:
            return save_checkpoint_dcp(self.tc.out, self.step, self.model, self.optimizer, self.state(),
                                       self.meta(), keep=self.tc.keep, main=self.is_main)
        return save_checkpoint(self.tc.out, self.step, self.model, self.state(), self.meta(),
                               keep=self.tc.keep)

    def load(self, path: str) -> None:
        """Continue from checkpoint ``path``: weights, optimizer, RNG states, step."""
        if self.ctx is not None and not is_dcp(path):
            raise CheckpointError(f"checkpoint {path!r} is a single-process one (model.safetensors): "
                                  "resume it without --dist, or from a --dist checkpoint")
        meta, state = load_checkpoint(path, self.model, self.optimizer if is_dcp(path) else None)
        try:
            if not is_dcp(path):
                self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            self.step = int(state["data"]["step"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path!r}: state.pt does not match this run "
                                  f"({type(exc).__name__}: {exc})") from None
        if self.step != int(meta["step"]):
            raise CheckpointError(f"checkpoint {path!r}: meta.json step {meta['step']} != "
                                  f"state.pt step {self.step}")
        if self.is_main:
            self._drop_rows_after(self.step)

    def _drop_rows_after(self, step: int) -> None:
        """Remove metrics rows past ``step`` (written after the checkpoint a resume starts from,
        by a run that was killed or stopped before its next save), so the resumed run's rows
        replace them instead of following them; rewritten atomically."""
        if not os.path.isfile(self._metrics_path):
            return
        with open(self._metrics_path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                continue
            keep.append(line)
        if len(keep) == len(lines):
            return
        tmp = self._metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self._metrics_path)

    # -- the run ----------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        """Append ``row`` to metrics.jsonl as strict JSON: a non-finite number (a skipped step's
        loss, say) is written as null."""
        if not self.is_main:
            return
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v
               for k, v in row.items()}
        with open(self._metrics_path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")

    def run(self, progress: bool = True) -> list[dict]:
        """Train from the current step to ``steps``; returns the rows written.

        In a single process run from the main thread, Ctrl-C (SIGINT) ends the run after the
        step in progress, saves a checkpoint of it and raises KeyboardInterrupt (a second
        Ctrl-C stops at once, unsaved); ``--resume`` continues from there."""
        from tqdm import tqdm

        tc = self.tc
        os.makedirs(tc.out, exist_ok=True)
        rows = []
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (progress and self.is_main), mininterval=0.5,
                   dynamic_ncols=True, desc="train")
        stop: list[int] = []
        restore = None
        if self.ctx is None and threading.current_thread() is threading.main_thread():
            def on_interrupt(signum, frame):
                if stop:
                    raise KeyboardInterrupt
                stop.append(signum)
                bar.write("interrupted: ending after this step with a checkpoint (Ctrl-C again to "
                          "stop at once, unsaved)")
            restore = signal.signal(signal.SIGINT, on_interrupt)
        saved = None
        try:
            while self.step < tc.steps:
                if stop:
                    if saved != self.step:
                        self.save()
                    bar.write(f"stopped at step {self.step} of {tc.steps}: checkpoint saved in "
                              f"{tc.out}")
                    raise KeyboardInterrupt
                row = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                loops=row["n_loops"], refresh=False)
                if row["skipped"] and self.is_main:
                    bar.write(f"step {self.step}: the loss or the gradients are not finite: "
                              "step skipped (not applied)")
                if row["skipped"] or self.step % tc.log_every == 0 or self.step == tc.steps:
                    self.log(row)
                    rows.append(row)
                if tc.eval_every and (self.step % tc.eval_every == 0 or self.step == tc.steps):
                    ev = self.evaluate()
                    self.log(ev)
                    rows.append(ev)
                    if self.is_main:
                        bar.write(f"step {self.step}: eval_loss {ev['eval_loss']:.4f}"
                                  + (f" eval_acc {ev['eval_acc']:.3f}" if "eval_acc" in ev else ""))
                if (tc.save_every and self.step % tc.save_every == 0) or self.step == tc.steps:
                    self.save()
                    saved = self.step
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)
            bar.close()
        return rows


def train_config_dict(tc: TrainConfig) -> dict:
    d = dataclasses.asdict(tc)
    d.pop("extra", None)
    return d


def _saved_horizon(path: str) -> Optional[int]:
    """The cosine horizon a checkpoint's state.pt recorded (None where it cannot be read)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        return int(state["schedule"]["decay_steps"])
    except Exception:  # noqa: BLE001 - a DCP checkpoint, or a corrupt file: load() reports it
        return None


def resume_trainer(run_dir: str, overrides: dict, task: Optional[Task] = None) -> Trainer:
    """A Trainer continuing the run in ``run_dir`` from its newest checkpoint, with ``overrides``
    (e.g. ``steps``) applied to its saved settings. A run trained on a Task object of the
    caller's needs it passed again as ``task`` (its data cannot be rebuilt from the settings).

    Raises:
        CheckpointError if the folder holds no checkpoint or a corrupt one.
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"resume: {run_dir!r} holds no checkpoint "
                              f"(looked in {os.path.join(run_dir, 'checkpoints')})")
    from .checkpoint import read_meta
    from .presets import config_from_dict

    meta = read_meta(path)
    saved = meta.get("train")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path!r}: meta.json has no run settings")
    own = meta.get("own_task")
    if own is not None and task is None:
        raise CheckpointError(f"the run in {run_dir!r} trained on a Task object of its own ({own}): "
                              "resume it from Python with resume_trainer(run_dir, overrides, "
                              "task=...) passing that task again")
    if own is None and task is not None:
        raise ValueError(f"the run in {run_dir!r} trained on its settings' task or data, not on a "
                         "Task object: resume it without task=")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    if tc.decay_steps is None:   # a checkpoint from before the horizon was stored in its settings
        tc.decay_steps = _saved_horizon(path)
    for k, v in overrides.items():
        setattr(tc, k, v)
    tc.out = run_dir
    trainer = Trainer(tc, config_from_dict(meta["config"], f"checkpoint {path!r} config"), task)
    trainer.load(path)
    return trainer
