"""Training checkpoints: ``DIR/checkpoints/step-NNNNNNNN/`` holding

- ``model.safetensors``: the model's state_dict (router biases included; the tied head saved
  as its own copy), loadable by ``OpenMythos.load_state_dict`` and convertible to open-mythos's
  layout by ``tools/convert_checkpoint.py``;
- ``state.pt``: optimizer, LR schedule, RNG states, data position (``torch.load`` with
  ``weights_only=True``);
- ``meta.json``: step, model config and the run's arguments.

A multi-process run (``--dist``) writes ``dcp/`` (model and optimizer shards through
``torch.distributed.checkpoint``, loadable at any world size or in one process) in place of
``model.safetensors`` and the optimizer part of ``state.pt``; ``python -m mythos.train export``
turns it into a single-file ``model.safetensors``.

A checkpoint is written into a temporary folder, then renamed: a run killed mid-save leaves
the earlier checkpoints whole. The last ``keep`` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mythos.config import MythosConfig
from mythos.model import OpenMythos

_NAME = re.compile(r"^step-(\d{8,})$")
FILES = ("model.safetensors", "state.pt", "meta.json")
DCP_DIR = "dcp"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete, corrupt or does not match the model."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest checkpoint folder of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: OpenMythos) -> dict[str, torch.Tensor]:
    """The state_dict as independent contiguous CPU tensors (safetensors refuses shared
    storage: the tied head gets its own copy)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir: str, step: int, model: OpenMythos, state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 3) -> str:
    """Write checkpoint ``step`` of the run atomically, then drop all but the last ``keep``.
    Returns its folder."""
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(model_tensors(model), os.path.join(tmp, "model.safetensors"))
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"step": step, **meta}, f, indent=1, sort_keys=True)
    _publish(tmp, final, FILES, run_dir, keep)
    return final


def _publish(tmp: str, final: str, files, run_dir: str, keep: int) -> None:
    """Make the checkpoint written in ``tmp`` visible as ``final`` in one rename (``files`` synced
    to disk first), then drop all but the run's last ``keep`` checkpoints."""
    for name in files:
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(final):   # a re-save of the same step (never an older run's: resume
        old = final + f".old-{os.getpid()}"          # starts after the last checkpoint)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def is_dcp(path: str) -> bool:
    """Whether checkpoint folder ``path`` holds sharded DCP weights (a multi-process run's)."""
    return os.path.isdir(os.path.join(path, DCP_DIR))


def read_meta(path: str) -> dict:
    """A checkpoint's meta.json; CheckpointError if the folder is incomplete or unreadable."""
    need = FILES[1:] if is_dcp(path) else FILES
    missing = [n for n in need if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: missing {', '.join(missing)}")
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        int(meta["step"])
        meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: meta.json is corrupt ({exc})") from None
    return meta


def config_mismatch(saved: dict, cfg: MythosConfig) -> list[str]:
    """The MythosConfig fields where ``cfg`` differs from a checkpoint's saved config."""
    now = dataclasses.asdict(cfg)
    return [f"{k}: checkpoint {saved.get(k)!r}, requested {now[k]!r}" for k in now
            if saved.get(k) != now[k]]


def load_checkpoint(path: str, model: OpenMythos,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[dict, dict]:
    """Read checkpoint ``path`` and load its weights into ``model`` (strictly). Everything is
    read and checked before the model is touched (a DCP checkpoint: its metadata; it is read
    straight into the model, and into ``optimizer`` when given). Returns ``(meta, state)``.

    Raises:
        CheckpointError naming the folder and what is wrong (incomplete, corrupt, config or
        tensor mismatch).
    """
    meta = read_meta(path)
    diff = config_mismatch(meta["config"], model.cfg)
    if diff:
        raise CheckpointError(f"checkpoint {path!r} was trained with another model config: "
                              + "; ".join(diff))
    if is_dcp(path):
        return meta, _load_dcp_checkpoint(path, model, optimizer)
    try:
        tensors = load_file(os.path.join(path, "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: model.safetensors is corrupt ({exc})") from None
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a corrupt file
        raise CheckpointError(f"checkpoint {path!r}: state.pt is corrupt ({exc})") from None
    own = model.state_dict()
    bad = sorted(set(own) ^ set(tensors))
    bad += [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"checkpoint {path!r}: tensors do not match the model: {bad[:5]}")
    model.load_state_dict(tensors, strict=True)
    return meta, state


def _load_state(path: str) -> dict:
    try:
        return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a corrupt file
        raise CheckpointError(f"checkpoint {path!r}: state.pt is corrupt ({exc})") from None


def _load_dcp_checkpoint(path: str, model: OpenMythos,
                         optimizer: Optional[torch.optim.Optimizer]) -> dict:
    from .distributed import load_dcp

    state = _load_state(path)
    try:
        load_dcp(os.path.join(path, DCP_DIR), model, optimizer)
    except Exception as exc:  # noqa: BLE001 - DCP raises CheckpointException, RuntimeError, ...
        raise CheckpointError(f"checkpoint {path!r}: dcp/ does not match this model "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return state


def save_checkpoint_dcp(run_dir: str, step: int, model: OpenMythos, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], meta: dict[str, Any], keep: int = 3,
                        main: bool = True) -> str:
    """Collective (every rank calls it): write checkpoint ``step`` with the model and optimizer
    as DCP shards; ``main`` (rank 0) writes state.pt and meta.json, renames the folder into
    place and drops all but the last ``keep``. Returns the folder."""
    import torch.distributed as dist

    from .distributed import save_dcp

    root = checkpoint_dir(run_dir)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}-dist")
    if main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    save_dcp(os.path.join(tmp, DCP_DIR), model, optimizer)   # collective
    if main:
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, **meta}, f, indent=1, sort_keys=True)
        _publish(tmp, final, FILES[1:], run_dir, keep)
    dist.barrier()
    return final
