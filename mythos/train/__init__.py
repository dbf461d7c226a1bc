"""Training for mythos's looped MoE models: a library for users' own loops and the command line
``python -m mythos.train`` on top.

Pieces: data (:class:`PointerTask`, :class:`BindingTask`, :class:`TextLM`), the training forward
(:func:`train_forward`: ACT on/off, truncated backprop, activation checkpointing, ponder term),
loop-count sampling (:class:`LoopSampler`), the loss (:func:`lm_loss`), aux-loss-free router-bias
balancing (:class:`LoadTracker`, :func:`update_router_bias`), initialisation (:func:`init_weights`),
checkpoints and :class:`Trainer`.
"""

from .balance import LoadTracker, load_stats, moe_layers, update_router_bias
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import IGNORE, Batch, BindingTask, PointerTask, Task, TextLM, make_task
from .init import INIT_SCHEMES, init_weights
from .loss import answer_accuracy, lm_loss
from .presets import config_names, resolve_config
from .recurrence import ForwardOut, LoopSampler, recurrent_forward, spectral_radius, train_forward
from .trainer import TrainConfig, Trainer, lr_at, make_optimizer, resume_trainer

__all__ = [
    "Batch", "BindingTask", "CheckpointError", "ForwardOut", "IGNORE", "INIT_SCHEMES", "LoadTracker",
    "LoopSampler",
    "PointerTask", "Task", "TextLM", "TrainConfig", "Trainer", "answer_accuracy", "config_names",
    "init_weights",
    "latest_checkpoint", "lm_loss", "load_checkpoint", "load_stats", "lr_at", "make_optimizer",
    "make_task", "moe_layers", "recurrent_forward", "resolve_config", "resume_trainer",
    "save_checkpoint", "spectral_radius", "train_forward", "update_router_bias",
]
