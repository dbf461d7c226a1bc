"""Multi-process training on ``torch.distributed``: process-group setup from torchrun's
environment, FSDP2 / DDP wrapping, the all-reduces that keep a looped MoE model's ranks in
lockstep, and sharded checkpoints through ``torch.distributed.checkpoint`` (DCP).

A step's global batch is the same whatever the world size; rank r takes rows
``[r * B / W, (r + 1) * B / W)``. What keeps the ranks in lockstep:

- the loop count of a step is a function of ``(seed, step)`` (:class:`LoopSampler`);
- the "every position halted -> stop" test is all-reduced (:func:`halt_reducer`, a MIN over
  ranks), so every rank runs the same iterations and every FSDP all-gather is matched;
- expert loads are all-reduced before the router-bias update, so every rank holds the same bias;
- the loss is the global mean over answer tokens: each rank's sum of cross-entropies divided by
  the all-reduced token count, times the world size (DDP and FSDP average gradients over ranks).

FSDP2 units (``fully_shard``): each prelude and coda block, the recurrent block's shared
TransformerBlock (attention + MoE experts, called once per loop; not resharded between its
calls), and the root, which holds the
embedding / tied head, the final norm and the recurrent block's small parts (LTI injection, ACT
halting, LoRA, loop-input norm). Router biases are buffers: replicated, not sharded.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

import mythos_kernels as K
from mythos.model import OpenMythos

from .data import IGNORE
from .loss import answer_accuracy, lm_loss
from .recurrence import ForwardOut, train_forward

STRATEGIES = ("ddp", "fsdp")
DCP_DIR = "dcp"
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """The process group of a run: this process's rank, the world size, its device."""

    strategy: str
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_strategy(strategy: Optional[str]) -> None:
    """ValueError unless ``strategy`` is None or one of :data:`STRATEGIES`."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"dist must be one of {STRATEGIES} (or None: one process), got {strategy!r}")


def setup(strategy: str, device: str = "auto", batch_size: Optional[int] = None) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU.

    Raises:
        ValueError: an unknown strategy, a missing torchrun variable, a world size that does not
            divide ``batch_size`` (the global batch), or a device the backend cannot serve.
    """
    check_strategy(strategy)
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(f"--dist {strategy} needs torchrun's environment (missing "
                         f"{', '.join(missing)}): launch with `torchrun --nproc_per_node N -m "
                         "mythos.train ...`, or drop --dist to train in one process")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if batch_size is not None and batch_size % world:
        raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by the world "
                         f"size {world}: each rank takes batch_size / world rows")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--dist supports cpu (gloo) and cuda (nccl) devices, got {device!r}")
    if not dist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    return DistContext(strategy, rank, world, local, dev)


def teardown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# -- all-reduce helpers -----------------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a new tensor; ``t`` itself is untouched). No-op in one process."""
    out = t.clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def halt_reducer(cum_p: torch.Tensor, threshold: float) -> bool:
    """The loop's early-exit test agreed across ranks: True only when every position on every
    rank has halted (an all-reduce MIN of each rank's flag; one host sync per loop)."""
    flag = K.all_halted(cum_p, threshold).to(torch.int32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def reduce_loads(counts: dict) -> dict:
    """Expert loads ``{layer: [E]}`` summed over ranks, layers in a fixed order (every rank's
    model has the same layers)."""
    if not counts or not dist.is_initialized():
        return counts
    layers = list(counts)
    flat = torch.cat([counts[m].reshape(-1).to(torch.int64) for m in layers])
    flat = all_reduce_sum(flat)
    out, i = {}, 0
    for m in layers:
        n = counts[m].numel()
        out[m] = flat[i:i + n]
        i += n
    return out


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for ``t`` (a sharded FSDP2 DTensor is gathered)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -- wrapping ---------------------------------------------------------------------------------

class TrainStep(nn.Module):
    """The training forward as one module call, so that the DDP / FSDP2 wrapper sees it: ids,
    targets -> (loss to backpropagate, float64 [loss contribution, depth sum, correct answers,
    answers] detached (the last two with ``accuracy``), loops run).

    ``n_targets``: the global count of answer tokens of the micro-batch; the loss to
    backpropagate is ``sum_local CE / n_targets * world`` (mean over the global batch once the
    wrapper averages gradients over ranks).
    """

    def __init__(self, model: OpenMythos):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, n_loops: int, n_targets: int,
                world: int, act: bool, grad_loops: Optional[int], checkpoint: bool,
                ponder_weight: float, autocast: Callable, accuracy: bool = False) -> tuple:
        with autocast():
            out: ForwardOut = train_forward(self.model, ids, n_loops, act=act, grad_loops=grad_loops,
                                            checkpoint=checkpoint)
            local = int((targets != IGNORE).sum())
            if local:
                part = lm_loss(self.model, out, targets) * (local / n_targets)
            else:   # no answer token here: a zero loss that still touches the graph
                part = out.h.sum() * 0.0
            total = part * world
            if ponder_weight:
                total = total + ponder_weight * out.ponder
        acc = answer_accuracy(self.model, out.h.float(), targets) if accuracy else (0, 0)
        stats = torch.tensor([float(part.detach()), float(out.depth.detach().double().sum()), *acc],
                             dtype=torch.float64, device=ids.device)
        return total, stats, out.n_loops


def wrap(model: OpenMythos, ctx: DistContext, truncated: bool = False) -> nn.Module:
    """Wrap ``model`` for ``ctx.strategy``; returns the module to call (a :class:`TrainStep`
    under DDP or FSDP2). ``model`` keeps its identity: its parameters are the ones to optimize
    (DTensor shards under FSDP2), its state_dict the one to checkpoint. Sets the recurrent
    block's halt reducer to :func:`halt_reducer`.

    ``truncated``: truncated backprop is on; ACT may then stop the loop before any
    gradient-building iteration, leaving the recurrent block without gradients in that step, so
    DDP looks for unused parameters (``find_unused_parameters``; FSDP2 needs nothing).
    """
    model.recurrent.halt_reducer = halt_reducer
    step = TrainStep(model)
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(step, device_ids=ids, find_unused_parameters=truncated)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if ctx.device.type == "cuda" else MixedPrecisionPolicy())
    for blk in (*model.prelude, *model.coda):
        fully_shard(blk, mp_policy=mp)
    # the shared block runs n_loops times a step: kept gathered from its first call to the end
    # of backward (one all-gather a step instead of one per call; docs/distributed.md)
    fully_shard(model.recurrent.block, mp_policy=mp, reshard_after_forward=False)
    fully_shard(step, mp_policy=mp)
    return step


def no_sync(wrapped: nn.Module, last: bool):
    """Gradient sync only on the last micro-batch of a step (DDP ``no_sync``; FSDP2
    ``set_requires_gradient_sync``)."""
    if hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext() if last else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


# -- checkpoints ------------------------------------------------------------------------------

def _sd_options(full_state: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full_state, cpu_offload=full_state)


def save_dcp(path: str, model: OpenMythos, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state to ``path`` (a folder)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_sd_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _dcp_load(dcp, sd: dict, path: str) -> None:
    with warnings.catch_warnings():   # one process without a process group is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(sd, checkpoint_id=path)


def load_dcp(path: str, model: OpenMythos, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Load a DCP checkpoint written at any world size into ``model`` (and ``optimizer``):
    sharded or replicated under torch.distributed, or a plain single-process model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer is None:
        msd = get_model_state_dict(model, options=_sd_options())
        sd = {"model": msd}
        _dcp_load(dcp, sd, path)
        set_model_state_dict(model, sd["model"], options=_sd_options())
        return
    # a parameter that never had a gradient has no optimizer state in the checkpoint; the fresh
    # state that get_state_dict makes for it is dropped again, so its first step is a first step
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    has = {k[len("optim.state."):].rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    msd, osd = get_state_dict(model, optimizer, options=_sd_options())
    osd["state"] = {k: v for k, v in osd["state"].items() if k in has}
    sd = {"model": msd, "optim": osd}
    _dcp_load(dcp, sd, path)
    set_model_state_dict(model, sd["model"], options=_sd_options())
    set_optimizer_state_dict(model, optimizer, sd["optim"],
                             options=StateDictOptions(strict=False))   # partial: see above
    for name, p in model.named_parameters():
        if name not in has:
            optimizer.state.pop(p, None)


def export_safetensors(ckpt: str, out: str) -> str:
    """Write the weights of checkpoint folder ``ckpt`` (DCP or single-file) as one
    ``model.safetensors``-format file ``out``, as a single-process run saves it. Runs in one
    process. Returns ``out``."""
    from safetensors.torch import save_file

    from .checkpoint import CheckpointError, load_checkpoint, model_tensors, read_meta
    from .presets import config_from_dict

    meta = read_meta(ckpt)
    model = OpenMythos(config_from_dict(meta["config"], f"checkpoint {ckpt!r} config"))
    load_checkpoint(ckpt, model)
    if os.path.isdir(out):
        raise CheckpointError(f"export: {out!r} is a folder; give a file name")
    tmp = out + f".tmp-{os.getpid()}"
    save_file(model_tensors(model), tmp)
    os.replace(tmp, out)
    return out
