"""Preallocated KV caches, written by position (no torch.cat per step).

A cache for the whole model is a dict (open-mythos's call style: pass ``kv_cache={}`` and reuse
it), mapping each layer-and-loop key (``prelude_0``, ``recurrent_loop_3``, ``coda_1``...) to a
:class:`LayerCache`. :class:`MythosCache` is that dict with a fixed capacity, which ``generate``
uses to allocate each buffer exactly once; a plain ``{}`` grows its buffers by doubling, up to
``max_seq_len``.

Per layer it stores
* MLA: the RMS-normalized latent ``c_kv [B, S, kv_lora_rank]`` and one RoPE'd key
  ``k_rope [B, S, qk_rope_head_dim]`` shared by all heads;
* GQA: ``k, v [B, S, n_kv_heads, head_dim]`` (RoPE applied to k).
"""

from __future__ import annotations

import torch

from ._validate import check_int


class CacheCapacityError(ValueError):
    """Writing past a cache's capacity."""


class LayerCache:
    """Named [B, capacity, ...] buffers sharing one valid length."""

    def __init__(self, capacity: int, max_capacity: int, fixed: bool):
        self.capacity = capacity
        self.max_capacity = max_capacity
        self.fixed = fixed
        self.length = 0
        self.buffers: dict[str, torch.Tensor] = {}

    def check_append(self, batch: int, n_new: int) -> None:
        """Raise before any write if ``n_new`` positions for ``batch`` rows do not fit."""
        if self.buffers:
            b = next(iter(self.buffers.values())).shape[0]
            if b != batch:
                raise ValueError(f"kv_cache holds batch size {b}, got input with batch size {batch}")
        end = self.length + n_new
        limit = self.capacity if self.fixed else self.max_capacity
        if end > limit:
            raise CacheCapacityError(f"kv_cache capacity exceeded: {self.length} cached + {n_new} "
                                     f"new positions > capacity {limit}")

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write ``new[name]`` ([B, T, ...]) at positions [length, length + T) and return views of
        every buffer over [0, length + T)."""
        T = next(iter(new.values())).shape[1]
        self.check_append(next(iter(new.values())).shape[0], T)
        end = self.length + T
        for name, x in new.items():
            buf = self.buffers.get(name)
            # a wider dtype than the buffer's (e.g. fp32 after a bf16 autocast prefill) widens
            # the buffer, as open-mythos's torch.cat promotes: new positions keep full precision
            dtype = x.dtype if buf is None else torch.promote_types(buf.dtype, x.dtype)
            if buf is None or buf.shape[1] < end or buf.dtype != dtype:
                if buf is not None and buf.shape[1] >= end:
                    cap = buf.shape[1]                              # only the dtype widens
                elif self.fixed:
                    cap = self.capacity
                else:
                    cap = min(max(end, 2 * (buf.shape[1] if buf is not None else 0), 16),
                              self.max_capacity)
                # zeros, not empty: the static decode step attends over the whole buffer with a
                # mask, and 0 * NaN from never-written garbage would poison p @ V
                # a normal tensor even under torch.inference_mode(), so a cache started there
                # can be continued outside it (as open-mythos's torch.cat cache can)
                with torch.inference_mode(False):
                    grown = x.new_zeros((x.shape[0], cap) + tuple(x.shape[2:]), dtype=dtype)
                if buf is not None:
                    grown[:, :self.length] = buf[:, :self.length]
                self.buffers[name] = buf = grown
            buf[:, self.length:end] = x.detach()
        self.length = end
        return {name: buf[:, :end] for name, buf in self.buffers.items()}

    def append_next(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`append`, with its checks done in one pass when the buffers can already take
        ``new`` (they exist with this dtype and batch and have room: a planned decode step,
        ``mythos.decode``, after a prefill); otherwise :meth:`append` itself (growth, dtype
        widening, the capacity error). The same writes, the same returned views either way."""
        x0 = next(iter(new.values()))
        end = self.length + x0.shape[1]
        bufs = self.buffers
        if len(bufs) != len(new) or end > (self.capacity if self.fixed else self.max_capacity):
            return self.append(**new)
        for name, x in new.items():
            buf = bufs.get(name)
            if buf is None or buf.shape[1] < end or buf.dtype != x.dtype or \
                    buf.shape[0] != x.shape[0]:
                return self.append(**new)
        for name, x in new.items():
            bufs[name][:, self.length:end] = x
        self.length = end
        return {name: buf[:, :end] for name, buf in bufs.items()}

    def write_at(self, positions: torch.Tensor, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Static-shape write for a captured decode step: ``buf[:, positions] = new`` (positions an
        int64 device tensor [T]) and return the full-capacity buffers. Needs a fixed-capacity
        cache whose buffers exist (a prefill ran); the valid length is tracked by the caller."""
        if not self.fixed or not self.buffers:
            raise ValueError("write_at needs a MythosCache whose buffers were filled by a prefill")
        for name, x in new.items():
            self.buffers[name].index_copy_(1, positions, x.detach())
        return dict(self.buffers)

    def nbytes(self) -> int:
        """Bytes of the valid positions."""
        return sum(b[:, :self.length].numel() * b.element_size() for b in self.buffers.values())


class MythosCache(dict):
    """A kv_cache dict whose layer buffers are preallocated with a fixed ``capacity``."""

    def __init__(self, capacity: int):
        super().__init__()
        # checked here; the buffers are allocated on the first write, per layer
        self.capacity = check_int("capacity", capacity, lo=1)

    @property
    def length(self) -> int:
        """Positions cached so far (0 when empty)."""
        return max((c.length for c in self.values() if isinstance(c, LayerCache)), default=0)


def layer_cache(kv_cache: dict, key: str, max_seq_len: int) -> LayerCache:
    """The LayerCache under ``key``, created on first use."""
    c = kv_cache.get(key)
    if c is None:
        if isinstance(kv_cache, MythosCache):
            c = LayerCache(kv_cache.capacity, kv_cache.capacity, fixed=True)
        else:
            c = LayerCache(0, max_seq_len, fixed=False)
        kv_cache[key] = c
    elif not isinstance(c, LayerCache):
        raise ValueError(f"kv_cache[{key!r}] is not a mythos LayerCache (got {type(c).__name__}); "
                         "pass an empty dict {} to start a cache")
    return c


def cache_length(kv_cache: dict | None) -> int:
    """Positions already cached (the largest over layers; 0 for None or an empty dict)."""
    if not kv_cache:
        return 0
    return max((c.length for c in kv_cache.values() if isinstance(c, LayerCache)), default=0)


def cache_bytes_per_token(cfg, dtype_bytes: int = 4, open_mythos: bool = False) -> int:
    """Cache bytes one token costs across all layers and loop depths (max_loop_iters loops).

    open_mythos=True counts open-mythos's layout (MLA rope key copied per head)."""
    layers = cfg.prelude_layers + cfg.coda_layers + cfg.max_loop_iters
    if cfg.attn_type == "mla":
        rope = cfg.qk_rope_head_dim * (cfg.n_heads if open_mythos else 1)
        per_layer = cfg.kv_lora_rank + rope
    else:
        per_layer = 2 * cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    return layers * per_layer * dtype_bytes
