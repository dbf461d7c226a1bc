"""Shared pieces of the experiments: the multi-hop task, sizes, training one model on the training
path (:class:`~mythos.train.Trainer`), evaluation at a loop count, saving, JSON and plots."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from mythos.config import MythosConfig
from mythos.model import OpenMythos
from mythos.train import TrainConfig, Trainer, lm_loss, train_forward
from mythos.train.data import Batch, Task, _answer_batch, _rng
from mythos.train.loss import answer_accuracy


class MultiHopPointer(Task):
    """Pointer chasing with one token per edge and the hop count spelled out. The sequence lists
    the ``n`` edges ``x -> pi(x)`` of a random permutation ``pi`` of the nodes, one token each, in
    random order, then the start node ``s``, ``h`` tokens ``?`` and ``:``; the answer is
    ``pi^h(s)``, with ``h`` drawn uniformly from ``hops`` (or fixed by ``batch(..., hops=h)``).
    A hop is one content lookup (the current node against the edges' sources), so ``h`` hops are
    ``h`` chained lookups: work that loop iterations can share, and a hop count past the trained
    ones is the same ``?`` token repeated more often. Every sequence is left-padded to one length,
    that of ``max_hops`` (default ``max(hops)``), so a hop count has the same layout in training
    and in evaluation (give ``max_hops`` the largest count evaluated). Token ids: 0 pad, 1 ``?``,
    2 ``:``, node ``x`` is ``3 + x``, edge ``x -> y`` is ``3 + n + x * n + y``. Inputs are
    ``n + 2 + max_hops`` tokens."""

    name = "multihop-pointer"
    has_accuracy = True
    FIRST = 3

    def __init__(self, nodes: int = 6, hops: Sequence[int] = (1, 2), max_hops: Optional[int] = None):
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
            raise ValueError(f"nodes must be an int >= 2, got {nodes!r}")
        hops = tuple(hops)
        if not hops or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hops):
            raise ValueError(f"hops must be a non-empty sequence of positive ints, got {hops!r}")
        max_hops = max(hops) if max_hops is None else max_hops
        if isinstance(max_hops, bool) or not isinstance(max_hops, int) or max_hops < max(hops):
            raise ValueError(f"max_hops must be an int >= max(hops) = {max(hops)}, got {max_hops!r}")
        super().__init__(nodes + 2 + max_hops)
        self.n, self.hops, self.max_hops = nodes, hops, max_hops
        self.vocab_size = self.FIRST + nodes + nodes * nodes

    def batch(self, seed: int, split: str, step: int, micro: int, batch_size: int,
              hops: Optional[int] = None) -> Batch:
        rng = _rng(seed, split, step, micro)
        B, n = batch_size, self.n
        pi = rng.permuted(np.tile(np.arange(n), (B, 1)), axis=1)
        order = rng.permuted(np.tile(np.arange(n), (B, 1)), axis=1)
        start = rng.integers(0, n, size=B)
        if hops is not None and not 1 <= hops <= self.max_hops:
            raise ValueError(f"hops must be in [1, max_hops = {self.max_hops}], got {hops!r}")
        h = np.full(B, hops) if hops is not None else rng.choice(np.asarray(self.hops), size=B)
        H = self.max_hops
        cur = start.copy()
        for k in range(int(h.max())):
            cur = np.where(k < h, pi[np.arange(B), cur], cur)
        seq = np.zeros((B, n + 3 + H), dtype=np.int64)      # [pad] edges s ?..? : answer
        pos = np.arange(n + 3 + H)[None, :]
        first = (H - h)[:, None]                             # the edges start here
        edges = self.FIRST + n + order * n + np.take_along_axis(pi, order, 1)
        rows = np.arange(B)[:, None]
        seq[rows, first + np.arange(n)[None, :]] = edges
        seq[np.arange(B), (H - h) + n] = start + self.FIRST
        seq[(pos > first + n) & (pos < n + 1 + H)] = 1
        seq[:, -2], seq[:, -1] = 2, cur + self.FIRST
        return _answer_batch(seq)


@dataclass
class Size:
    """The sizes of one experiment run (model, data, schedule, evaluation)."""

    dim: int = 48
    expert_dim: int = 48
    n_experts: int = 4
    nodes: int = 6
    train_loops: int = 3
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    init: str = "fan-in"
    seeds: tuple = (0, 1, 2)
    train_hops: tuple = (1, 2)
    eval_hops: tuple = (1, 2, 3, 4)
    eval_batches: int = 2
    eval_batch_size: int = 256
    eval_every: int = 250

    @property
    def seq_len(self) -> int:
        """Input tokens per training sequence."""
        return self.task().seq_len

    def task(self, hops: Optional[Sequence[int]] = None) -> MultiHopPointer:
        """The multi-hop task at this size (hops: ``train_hops`` unless given), laid out for the
        largest hop count evaluated."""
        hops = self.train_hops if hops is None else hops
        return MultiHopPointer(self.nodes, hops, max(max(hops), *self.eval_hops, *self.train_hops))


def model_config(size: Size, **over) -> MythosConfig:
    """A small GQA looped MoE model (one prelude, one recurrent and one coda block);
    ``max_loop_iters = 2 * train_loops``, so evaluation up to ``4 * train_loops`` loops runs past
    it (the depth-wise LoRA index clamps to the last one)."""
    kw = dict(vocab_size=size.task().vocab_size, dim=size.dim, n_heads=4,
              n_kv_heads=2, max_seq_len=max(64, size.seq_len), max_loop_iters=2 * size.train_loops,
              prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=size.n_experts,
              n_shared_experts=1, n_experts_per_tok=2, expert_dim=size.expert_dim, lora_rank=4,
              rope_theta=10000.0)
    kw.update(over)
    return MythosConfig(**kw)


def n_params(model: torch.nn.Module) -> int:
    """Parameter count, ``sum(p.numel())``."""
    return sum(p.numel() for p in model.parameters())


def train_model(cfg: MythosConfig, size: Size, seed: int, *, n_loops: int, loop_sampling: str = "fixed",
                act: bool = True, ponder_weight: float = 0.0, device: str = "auto", out: str = "",
                desc: str = "train", progress: bool = True) -> tuple[OpenMythos, dict]:
    """Train one model with :class:`~mythos.train.Trainer` on the multi-hop task (hops drawn from
    ``size.train_hops``); returns the model (eval mode) and its training curves
    ``{"step", "loss", "n_loops", "mean_halt_depth", "eval_step", "eval_acc"}``."""
    from tqdm import tqdm

    max_loops = cfg.max_loop_iters if loop_sampling != "fixed" else max(n_loops, cfg.max_loop_iters)
    task = size.task()
    tc = TrainConfig(task=task.name, steps=size.steps, batch_size=size.batch_size,
                     seq_len=size.seq_len, lr=size.lr, warmup=max(size.steps // 20, 1), seed=seed, init=size.init,
                     n_loops=n_loops, loop_sampling=loop_sampling, max_loops=max_loops, act=act,
                     ponder_weight=ponder_weight, device=device, out=out or os.devnull,
                     eval_every=0, save_every=0)
    trainer = Trainer(tc, cfg, task=task)
    curves = {"step": [], "loss": [], "n_loops": [], "mean_halt_depth": [], "eval_step": [],
              "eval_acc": []}
    with tqdm(total=size.steps, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0,
              leave=False) as bar:
        while trainer.step < size.steps:
            row = trainer.train_step()
            for k in ("step", "loss", "n_loops", "mean_halt_depth"):
                curves[k].append(row[k])
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
            if size.eval_every and (trainer.step % size.eval_every == 0 or trainer.step == size.steps):
                ev = evaluate(trainer.model, task, n_loops=int(round(n_loops)), act=act, seed=seed,
                              batches=1, batch_size=size.eval_batch_size)
                trainer.model.train()
                curves["eval_step"].append(trainer.step)
                curves["eval_acc"].append(ev["accuracy"])
    return trainer.model.eval(), curves


@torch.no_grad()
def evaluate(model: OpenMythos, task: MultiHopPointer, *, n_loops: int, act: bool, seed: int,
             batches: int, batch_size: int, hops: Optional[int] = None) -> dict:
    """Held-out accuracy, loss and mean halting depth at ``n_loops`` (``train_forward``; past
    ``max_loop_iters`` the LoRA index clamps), hops drawn from the task's range or fixed."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = total = 0
    loss = depth = 0.0
    try:
        for i in range(batches):
            b = task.batch(seed, "eval", i, 0 if hops is None else hops, batch_size, hops=hops).to(dev)
            out = train_forward(model, b.ids, n_loops, act=act)
            loss += float(lm_loss(model, out.h.float(), b.targets))
            depth += float(out.depth[:, -1].float().mean())
            c, t = answer_accuracy(model, out.h.float(), b.targets)
            correct, total = correct + c, total + t
    finally:
        model.train(was)
    return {"accuracy": correct / max(total, 1), "loss": loss / batches, "halt_depth": depth / batches}


def save_model(model: OpenMythos, path: str, meta: dict, size: Optional[Size] = None) -> str:
    """The weights as safetensors at ``path`` and ``meta`` (config, run; the run's ``size``, which
    names the task, when given) beside it as JSON."""
    from safetensors.torch import save_model as st_save

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    st_save(model, path)      # the tied head / embedding stored once
    with open(path.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(meta if size is None else {**meta, "size": dataclasses.asdict(size)}, f, indent=1,
                  default=_jsonable)
    return path


def load_model(path: str) -> OpenMythos:
    """A model saved by :func:`save_model` (config from the JSON beside the weights)."""
    from safetensors.torch import load_model as st_load

    with open(path.rsplit(".", 1)[0] + ".json") as f:
        meta = json.load(f)
    model = OpenMythos(MythosConfig(**meta["config"]))
    st_load(model, path)
    return model.eval()


def _jsonable(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str, obj: dict) -> str:
    """``obj`` as JSON at ``path`` (written to a temporary file, then renamed: never half-written)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable, allow_nan=False)
    os.replace(tmp, path)
    return path


def mean_std(rows: Sequence[Sequence[float]]) -> tuple[list, list]:
    """Per-column mean and (population) standard deviation over seeds."""
    a = np.asarray(rows, dtype=np.float64)
    return a.mean(0).tolist(), a.std(0).tolist()


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def finish_figure(fig, path, axes, chance_axes, chance) -> str:
    """Mark ``chance`` (a red dotted line) on ``chance_axes``, grid every axis, save ``fig`` to
    ``path`` and close it."""
    plt = pyplot()
    if chance:
        for ax in chance_axes:
            ax.axhline(chance, color="r", ls=":", lw=1, label="chance")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def config_dict(cfg: MythosConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: v for k, v in d.items() if not (isinstance(v, float) and not math.isfinite(v))}


def set_threads(n: Optional[int]) -> None:
    """torch's intra-op threads (tiny models run fastest on one)."""
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive int, got {n!r}")
        torch.set_num_threads(n)
