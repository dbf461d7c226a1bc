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

A :class:`LayerCache` reads as open-mythos's cache entry, a read-only mapping with its key names
and shapes: ``entry["c_kv"]`` ``[B, S, kv_lora_rank]``, ``entry["k_rope"]``
``[B, S, n_heads, qk_rope_head_dim]`` (the one shared key broadcast over the heads), or
``entry["k"]``, ``entry["v"]``; each a view of the valid prefix, never a copy. One difference:
mythos's ``c_kv`` holds the latent after ``kv_norm`` (open-mythos's holds it before).

A cache is consistent or refused. ``OpenMythos.forward`` checks it before any compute
(:func:`check_cache`: it fits the model, every layer holds what one sequence of calls leaves,
``start_pos`` is its length) and writes to it inside :class:`CacheWrite`, which on an exception
puts every layer back to the length it had; a cache that could not be put back stays marked
and is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Optional

import torch

from ._validate import check_int


class CacheError(ValueError):
    """A kv_cache that does not fit the model or the call, or was left unusable."""


class CacheCapacityError(CacheError):
    """Writing past a cache's capacity."""


# the buffers each attention type caches: name -> what that layout is called in messages
_KINDS = {("c_kv", "k_rope"): "MLA", ("k", "v"): "GQA"}


class LayerCache:
    """Named [B, capacity, ...] buffers sharing one valid length.

    Read as a mapping it is open-mythos's cache entry (module docstring): ``entry[name]``, ``in``,
    ``keys()``, ``values()``, ``items()``, ``get``, iteration and ``len`` give views of the valid
    prefix ``[:, :length]``; ``k_rope`` broadcast to ``[B, S, heads, dr]`` when ``heads`` is set
    (MLA layers set it). Writes go through :meth:`append` / :meth:`write_at` only."""

    def __init__(self, capacity: int, max_capacity: int, fixed: bool, heads: Optional[int] = None):
        self.capacity = capacity
        self.max_capacity = max_capacity
        self.fixed = fixed
        self.heads = heads                    # MLA: the heads k_rope is read out for
        self.length = 0
        self.buffers: dict[str, torch.Tensor] = {}
        self.unusable: Optional[str] = None   # why the cache must be refused (set mid-write)

    def __getitem__(self, name: str) -> torch.Tensor:
        """Buffer ``name`` over the valid positions, a view (open-mythos's entry layout)."""
        buf = self.buffers[name][:, :self.length]
        if name == "k_rope" and self.heads is not None:
            B, S, dr = buf.shape
            return buf.unsqueeze(2).expand(B, S, self.heads, dr)
        return buf

    def __iter__(self) -> Iterator[str]:
        return iter(self.buffers)

    def __len__(self) -> int:
        return len(self.buffers)

    def __contains__(self, name: object) -> bool:
        return name in self.buffers

    def __bool__(self) -> bool:   # an object, truthy whatever it holds (as before the mapping)
        return True

    keys = Mapping.keys
    items = Mapping.items
    values = Mapping.values
    get = Mapping.get

    @property
    def kind(self) -> Optional[str]:
        """The attention type that filled it ("MLA" or "GQA", from its buffer names; None while
        empty)."""
        return _KINDS.get(tuple(self.buffers), "unknown") if self.buffers else None

    def layout(self) -> dict[str, tuple[int, ...]]:
        """Each buffer's per-position shape (the dims after [B, S])."""
        return {name: tuple(b.shape[2:]) for name, b in self.buffers.items()}

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


Mapping.register(LayerCache)   # isinstance(entry, Mapping), as open-mythos's dict entries


class ReadOnlyLayer(LayerCache):
    """A read-only view of a :class:`LayerCache`: attention through it sees the cached positions
    and the new ones, and writes nothing (its buffers are the viewed layer's, never modified).
    :meth:`append` returns ``cat(cached prefix, new)``, :meth:`write_at` full-capacity copies
    with ``new`` at ``positions``."""

    def __init__(self, lc: LayerCache):
        super().__init__(lc.capacity, lc.max_capacity, lc.fixed, lc.heads)
        self.length = lc.length
        self.buffers = lc.buffers

    def append(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = next(iter(new.values()))
        self.check_append(x0.shape[0], x0.shape[1])
        return {n: torch.cat([b[:, :self.length], new[n].detach()], 1)
                for n, b in self.buffers.items()}

    append_next = append

    def write_at(self, positions: torch.Tensor, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.fixed or not self.buffers:
            raise ValueError("write_at needs a MythosCache whose buffers were filled by a prefill")
        return {n: b.index_copy(1, positions, new[n].detach().to(b.dtype))
                for n, b in self.buffers.items()}


def read_only(kv_cache: dict, keys: Iterable[str]) -> dict[str, ReadOnlyLayer]:
    """Read-only views (:class:`ReadOnlyLayer`) of the layers ``keys`` of ``kv_cache``, as a
    kv_cache dict: a forward through them attends over the cache and leaves it as it was."""
    return {k: ReadOnlyLayer(kv_cache[k]) for k in keys}


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


def layer_cache(kv_cache: dict, key: str, max_seq_len: int, heads: Optional[int] = None) -> LayerCache:
    """The LayerCache under ``key``, created on first use (``heads``: an MLA layer's head count,
    for the per-head ``k_rope`` view)."""
    c = kv_cache.get(key)
    if c is None:
        if isinstance(kv_cache, MythosCache):
            c = LayerCache(kv_cache.capacity, kv_cache.capacity, fixed=True, heads=heads)
        else:
            c = LayerCache(0, max_seq_len, fixed=False, heads=heads)
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


def cache_layout(cfg) -> dict[str, tuple[int, ...]]:
    """The buffers a layer of ``cfg``'s model caches and their per-position shapes."""
    if cfg.attn_type == "mla":
        return {"c_kv": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}
    head_dim = cfg.dim // cfg.n_heads
    return {"k": (cfg.n_kv_heads, head_dim), "v": (cfg.n_kv_heads, head_dim)}


def _describe(layout: dict[str, tuple[int, ...]]) -> str:
    kind = _KINDS.get(tuple(layout), "unknown")
    return f"{kind} (" + ", ".join(f"{n} {list(s)}" for n, s in layout.items()) + ")"


def _loop_index(key: str) -> int:
    """t for a ``recurrent_loop_{t}`` key, else -1."""
    if key.startswith("recurrent_loop_"):
        t = key[15:]
        if t.isdigit() and str(int(t)) == t:
            return int(t)
    return -1


def _misfit(key: str, c: LayerCache, want: dict, cfg) -> None:
    raise CacheError(f"kv_cache does not fit this model: layer {key!r} was filled by "
                     f"{_describe(c.layout())} attention, this model caches {_describe(want)} "
                     f"({cfg.attn_type!r})")


def check_cache(kv_cache: dict, cfg, input_ids: torch.Tensor, start_pos: int) -> None:
    """Refuse ``kv_cache`` for this call before any compute, with a :class:`CacheError` naming
    what is wrong. It must

    * hold only mythos :class:`LayerCache` values under this model's keys (``prelude_{i}``,
      ``coda_{i}`` for the configured layer counts, ``recurrent_loop_{t}``);
    * fit the model: each layer's buffers those of ``cfg``'s attention type with its shapes
      (:func:`cache_layout`), floating point, on ``input_ids``'s device, ``input_ids``'s batch;
    * not be marked unusable (a write that could not be rolled back, see :class:`CacheWrite`);
    * be consistent: every layer each call writes (prelude, coda, loop 0) holds the cache's
      length, a deeper loop no more positions than the one before it;
    * have ``start_pos`` equal to its length, and room for ``input_ids``'s positions.

    O(layers) Python over shapes and lengths, no tensor reads."""
    B, T = input_ids.shape
    S0 = 0
    for key, c in kv_cache.items():
        if not isinstance(c, LayerCache):
            raise CacheError(f"kv_cache[{key!r}] is not a mythos LayerCache (got "
                             f"{type(c).__name__}); pass an empty dict {{}} to start a cache")
        if c.unusable is not None:
            raise CacheError(f"kv_cache is unusable: {c.unusable}; start a new cache")
        if c.length > S0:
            S0 = c.length
    if not kv_cache:
        if start_pos != 0:
            raise CacheError(f"start_pos ({start_pos}) must equal the positions kv_cache holds "
                             "(0: it is empty), or be omitted")
        return
    want = None
    n_pre, n_coda = cfg.prelude_layers, cfg.coda_layers
    core = 0   # layers every call writes: the prelude's, the coda's, loop 0
    for key, c in kv_cache.items():
        t = _loop_index(key)
        if t < 0:
            head, _, i = key.rpartition("_")
            n = n_pre if head == "prelude" else n_coda if head == "coda" else -1
            if not i.isdigit() or str(int(i)) != i or int(i) >= n:
                raise CacheError(f"kv_cache has a layer {key!r} this model does not have "
                                 f"(prelude_layers={n_pre}, coda_layers={n_coda}): it was filled "
                                 "by another model")
        if t <= 0:
            core += 1
        if c.length != S0 and t <= 0:
            raise CacheError(f"kv_cache is inconsistent: layer {key!r} holds {c.length} positions, "
                             f"others {S0} (a write to it was cut short?); start a new cache")
        if t > 0:
            prev = kv_cache.get(f"recurrent_loop_{t - 1}")
            if prev is None or prev.length < c.length:
                raise CacheError(f"kv_cache is inconsistent: layer {key!r} holds {c.length} "
                                 f"positions, 'recurrent_loop_{t - 1}' "
                                 f"{0 if prev is None else prev.length}; start a new cache")
        bufs = c.buffers
        if not bufs:
            continue
        if want is None:
            want = cache_layout(cfg)
            dev = input_ids.device
        if len(bufs) != len(want):
            _misfit(key, c, want, cfg)
        for n, b in bufs.items():
            shape = b.shape
            if shape[2:] != want.get(n):
                _misfit(key, c, want, cfg)
            if shape[0] != B:
                raise CacheError(f"kv_cache holds batch size {shape[0]}, got input with batch "
                                 f"size {B}")
            if not b.dtype.is_floating_point:
                raise CacheError(f"kv_cache[{key!r}].buffers[{n!r}] has dtype {b.dtype}; a "
                                 "cache holds floating-point values")
        if b.device != dev:   # a layer's buffers are made together, on one device
            raise CacheError(f"kv_cache is on {b.device}, input_ids on {dev}")
        limit = c.capacity if c.fixed else c.max_capacity
        if c.length + T > limit:
            raise CacheCapacityError(f"kv_cache holds {c.length} positions; {T} more exceed its "
                                     f"capacity {limit}")
    if S0 and core != n_pre + n_coda + 1:
        raise CacheError(f"kv_cache is inconsistent: it holds {S0} positions but only {core} of "
                         f"the {n_pre + n_coda + 1} layers every call writes; start a new cache")
    if start_pos != S0:
        raise CacheError(f"start_pos ({start_pos}) must equal the positions kv_cache holds "
                         f"({S0}), or be omitted")


_MID_WRITE = ("a forward that was writing to it stopped and its rollback did not finish (or "
              "another call is writing to it now)")


class CacheWrite:
    """``with CacheWrite(kv_cache):`` around a forward that appends to ``kv_cache`` (None: does
    nothing). On an exception every layer goes back to the length it had (appends write by
    position, so positions past a length are unused; they are zeroed again for the static
    step, which reads the whole buffer under a mask) and layers the call created are removed:
    the cache is as before the call. Meanwhile each layer is marked unusable, and stays so if
    the rollback itself fails or is interrupted; :func:`check_cache` then refuses it."""

    __slots__ = ("cache", "before")

    def __init__(self, kv_cache: Optional[dict]):
        self.cache = kv_cache
        self.before: list = []

    def __enter__(self) -> "CacheWrite":
        if self.cache is not None:
            self.before = [(k, c, c.length) for k, c in self.cache.items()]
            for _, c, _ in self.before:
                c.unusable = _MID_WRITE
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        cache = self.cache
        if cache is None:
            return False
        if exc_type is not None:
            try:
                self._roll_back(cache)
            except BaseException:  # noqa: BLE001 - the layers stay marked; the first error wins
                return False
        for _, c, _ in self.before:
            c.unusable = None
        return False

    def _roll_back(self, cache: dict) -> None:
        kept = {k for k, _, _ in self.before}
        for k in [k for k in cache if k not in kept]:
            del cache[k]
        with torch.no_grad(), torch.inference_mode(False):
            for k, c, n in self.before:
                cache[k] = c
                for b in c.buffers.values():
                    if b.shape[1] > n:
                        b[:, n:].zero_()
                c.length = n


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
