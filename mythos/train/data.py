"""Training data, all local: synthetic multi-hop tasks generated from a seed, and language
modelling over the bytes (or, optionally, a local Hugging Face tokenizer's tokens) of text files.

Every batch is a pure function of ``(seed, split, step, micro)``, so a resumed run sees the data
the uninterrupted run would have seen, and every rank of a distributed run can draw its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

IGNORE = -100   # target of positions that carry no loss

_SPLITS = {"train": 0, "eval": 1}


@dataclass
class Batch:
    """ids [B, T] int64 inputs; targets [B, T] int64, ``IGNORE`` where no loss is taken."""

    ids: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), self.targets.to(device))

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def _rng(seed: int, split: str, step: int, micro: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return np.random.default_rng([int(seed), _SPLITS[split], int(step), int(micro)])


class Task:
    """A data source: ``batch(seed, split, step, micro, batch_size)`` -> :class:`Batch`.

    ``vocab_size``: the ids it uses lie below it; ``has_accuracy``: targets are answer tokens,
    scored by accuracy."""

    name = "task"
    vocab_size = 256
    has_accuracy = False

    def __init__(self, seq_len: int):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
        self.seq_len = seq_len

    def batch(self, seed: int, split: str, step: int, micro: int, batch_size: int) -> Batch:
        raise NotImplementedError


class PointerTask(Task):
    """Pointer chasing over a random permutation ``pi`` of n nodes: the sequence lists the pairs
    ``x pi(x)`` in random order, then ``? s :`` and the answer ``pi^hops(s)``. The loss and the
    accuracy are taken on the answer token only. Token ids: 0 pad, 1 ``?``, 2 ``:``, nodes from 3.
    Held-out split: permutations drawn from a disjoint random stream."""

    name = "pointer"
    has_accuracy = True
    _FIRST = 3

    def __init__(self, seq_len: int, hops: int = 2, vocab_size: int = 256):
        super().__init__(seq_len)
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
            raise ValueError(f"hops must be a positive int, got {hops!r}")
        self.hops = hops
        self.n = min((seq_len + 1 - 4) // 2, vocab_size - self._FIRST)
        if self.n < 2:
            raise ValueError(f"pointer task: seq_len {seq_len} with vocab_size {vocab_size} leaves "
                             f"{self.n} nodes; needs seq_len >= 7 and vocab_size >= 5")
        self.vocab_size = self._FIRST + self.n

    def batch(self, seed: int, split: str, step: int, micro: int, batch_size: int) -> Batch:
        rng = _rng(seed, split, step, micro)
        B, n, L = batch_size, self.n, self.seq_len + 1
        pi = rng.permuted(np.tile(np.arange(n), (B, 1)), axis=1)               # [B, n]
        order = rng.permuted(np.tile(np.arange(n), (B, 1)), axis=1)            # listing order
        start = rng.integers(0, n, size=B)
        cur = _permutation_power(pi, self.hops)[np.arange(B), start]
        seq = np.zeros((B, L), dtype=np.int64)
        body = 2 * n
        off = L - body - 4                                                     # left padding
        seq[:, off:off + body:2] = order + self._FIRST
        seq[:, off + 1:off + body:2] = np.take_along_axis(pi, order, 1) + self._FIRST
        seq[:, -4], seq[:, -3], seq[:, -2], seq[:, -1] = 1, start + self._FIRST, 2, cur + self._FIRST
        return _answer_batch(seq)


class BindingTask(Task):
    """Variable-binding chains ``v0=v1; v1=v2; ...; v{h-1}=d;`` (``hops`` assignments per chain,
    chains interleaved in random order, as many as fit), then ``? v0 :`` and the answer digit d
    of a random chain. Token ids: 0 pad, 1 ``?``, 2 ``:``, 3 ``=``, 4 ``;``, digits 5-14,
    variables from 15."""

    name = "binding"
    has_accuracy = True
    _DIGIT, _VAR = 5, 15

    def __init__(self, seq_len: int, hops: int = 2, vocab_size: int = 256):
        super().__init__(seq_len)
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 1:
            raise ValueError(f"hops must be a positive int, got {hops!r}")
        self.hops = hops
        n_vars = vocab_size - self._VAR
        self.chains = min((seq_len + 1 - 4) // (4 * hops), n_vars // hops if n_vars > 0 else 0)
        if self.chains < 1:
            raise ValueError(f"binding task: seq_len {seq_len} is too short for one chain of {hops} "
                             f"hops (needs seq_len >= {4 * hops + 3}) or vocab_size {vocab_size} < "
                             f"{self._VAR + hops}")
        self.vocab_size = self._VAR + self.chains * hops

    def batch(self, seed: int, split: str, step: int, micro: int, batch_size: int) -> Batch:
        rng = _rng(seed, split, step, micro)
        B, c, h, L = batch_size, self.chains, self.hops, self.seq_len + 1
        names = rng.permuted(np.tile(np.arange(c * h), (B, 1)), axis=1).reshape(B, c, h) + self._VAR
        digits = rng.integers(0, 10, size=(B, c)) + self._DIGIT
        rhs = np.concatenate([names[:, :, 1:], digits[:, :, None]], axis=2)    # [B, c, h]
        stmt = np.stack([names, np.full_like(names, 3), rhs, np.full_like(names, 4)], -1)
        stmt = stmt.reshape(B, c * h, 4)
        order = rng.permuted(np.tile(np.arange(c * h), (B, 1)), axis=1)
        stmt = np.take_along_axis(stmt, order[:, :, None], 1).reshape(B, -1)
        q = rng.integers(0, c, size=B)
        seq = np.zeros((B, L), dtype=np.int64)
        seq[:, L - 4 - stmt.shape[1]:L - 4] = stmt
        seq[:, -4], seq[:, -3], seq[:, -2] = 1, names[np.arange(B), q, 0], 2
        seq[:, -1] = digits[np.arange(B), q]
        return _answer_batch(seq)


def _answer_batch(seq: np.ndarray) -> Batch:
    """Inputs seq[:, :-1]; the only target is the last token (the answer)."""
    t = torch.from_numpy(seq)
    targets = torch.full_like(t[:, 1:], IGNORE)
    targets[:, -1] = t[:, -1]
    return Batch(t[:, :-1].contiguous(), targets)


def _permutation_power(pi: np.ndarray, k: int) -> np.ndarray:
    """``pi^k`` of each row's permutation [B, n] by repeated squaring (log2 k compositions,
    so a hop count of 10^9 costs what 30 do)."""
    out = np.tile(np.arange(pi.shape[1]), (pi.shape[0], 1))
    p = pi
    while k:
        if k & 1:
            out = np.take_along_axis(p, out, 1)                                # p after out
        k >>= 1
        if k:
            p = np.take_along_axis(p, p, 1)                                    # p after p
    return out


class TextLM(Task):
    """Next-token prediction over windows of a token stream (bytes of local files by default).
    The last tenth of the stream (at least one window) is the held-out split."""

    name = "text"

    def __init__(self, tokens: np.ndarray, seq_len: int, vocab_size: int = 256):
        super().__init__(seq_len)
        tokens = np.asarray(tokens, dtype=np.int64)
        L = seq_len + 1
        if tokens.size < 2 * L:
            raise ValueError(f"data holds {tokens.size} tokens, fewer than 2 x (seq_len + 1) = "
                             f"{2 * L}: one window to train on and one held out")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"data tokens must lie in [0, vocab_size={vocab_size}), got values in "
                             f"[{tokens.min()}, {tokens.max()}]")
        self.tokens = tokens
        self.vocab_size = vocab_size
        n_eval = max(tokens.size // 10, L)
        self._split = {"eval": (tokens.size - n_eval, tokens.size), "train": (0, tokens.size - n_eval)}

    @classmethod
    def from_files(cls, paths: Sequence[str], seq_len: int, tokenizer: Optional[str] = None,
                   vocab_size: int = 256) -> "TextLM":
        """Bytes of ``paths`` concatenated, or their text encoded by the Hugging Face tokenizer
        named ``tokenizer`` (local files only: ``transformers`` must be installed and the
        tokenizer cached; nothing is downloaded).

        Raises:
            ValueError naming a missing or empty file, or a tokenizer that is not available.
        """
        if not paths:
            raise ValueError("data: no files given")
        chunks = []
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"data file {p!r} does not exist or is not a file")
            with open(p, "rb") as f:
                raw = f.read()
            if not raw:
                raise ValueError(f"data file {p!r} is empty")
            chunks.append(raw)
        if tokenizer is None:
            tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64)
            return cls(tokens, seq_len, 256)
        tok = load_tokenizer(tokenizer)
        ids = [tok(c.decode("utf-8", errors="replace"))["input_ids"] for c in chunks]
        tokens = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
        return cls(tokens, seq_len, len(tok))

    def batch(self, seed: int, split: str, step: int, micro: int, batch_size: int) -> Batch:
        rng = _rng(seed, split, step, micro)
        lo, hi = self._split[split]
        L = self.seq_len + 1
        starts = rng.integers(lo, hi - L + 1, size=batch_size)
        win = torch.from_numpy(self.tokens[starts[:, None] + np.arange(L)])   # [B, L]
        return Batch(win[:, :-1].contiguous(), win[:, 1:].contiguous())


def load_tokenizer(name: str):
    """A Hugging Face tokenizer from the local cache (``local_files_only``); ValueError if
    ``transformers`` is not installed or the tokenizer is not available locally."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"tokenizer {name!r}: the transformers package is not installed "
                         "(byte-level data needs no tokenizer: omit --tokenizer)") from None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for "not found"
        raise ValueError(f"tokenizer {name!r} is not available locally: {exc}") from None


TASKS = {"pointer": PointerTask, "binding": BindingTask}


def make_task(name: str, seq_len: int, hops: int = 2, vocab_size: int = 256) -> Task:
    """A built-in synthetic task by name (``pointer``, ``binding``)."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} does not exist; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name](seq_len, hops=hops, vocab_size=vocab_size)
