"""Reusable CPU scratch buffers for the CPU inference forms' large intermediates.

torch allocates CPU tensors with plain ``malloc``. glibc hands blocks of a few MB back to the
kernel when they are freed (above its mmap threshold, or by trimming the top of the heap), so
the next call's buffer of the same size faults in again, page by page, and every fault zeroes
4 KB. At the mid config the MoE forms' gathered rows, slab and products (a few MB each) would
fault in on every loop; ``tools/cpu_ab.py --switches moe_scratch`` times keeping them.

:func:`scratch` keeps one buffer per (tag, dtype) per thread and hands out views of it, so a
buffer's pages stay mapped from one call to the next. Only for intermediates that die inside the
function that asks for them (never returned, never saved for backward), in code that does not call
itself: the next call with the same tag overwrites the buffer. Buffers over ``MAX_BYTES`` are not
kept (a plain ``torch.empty``), nor are non-CPU ones. :func:`release_scratch` drops them.

:func:`kept_output` is the same for a result that *is* returned (the forward's logits): it is
reused only once nothing references it any more.
"""

from __future__ import annotations

import math
import threading

import torch

# largest buffer kept between calls (per tag and dtype; six tags in the MoE forms, so at most
# ~192 MB held). Bigger products take long enough that their faults matter less.
MAX_BYTES = 32 << 20

_local = threading.local()


def _mine(name: str) -> dict:
    """This thread's dict ``name`` of kept tensors ("bufs": scratch, "outs": kept outputs)."""
    d = getattr(_local, name, None)
    if d is None:
        d = {}
        setattr(_local, name, d)
    return d


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``shape``: a view of this thread's kept buffer for
    ``(tag, dtype)``, grown when too small (see the module docstring for when it may be used)."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel * dtype.itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _mine("bufs")
    buf = bufs.get((tag, dtype))
    if buf is None or buf.numel() < numel:
        # a normal tensor even under torch.inference_mode(): an inference tensor could not be
        # written outside it (calls under no_grad would raise)
        with torch.inference_mode(False):
            buf = bufs[(tag, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


# largest output kept by kept_output, and how many it keeps per tag per thread
MAX_OUTPUT_BYTES = 512 << 20
KEPT_OUTPUTS = 2


def _storage_refs(t: torch.Tensor) -> int:
    """References to ``t``'s storage (every tensor or view of it holds one)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


# a lone tensor's count as _storage_refs reads it (the temporary storage object adds one)
_LONE_REFS = _storage_refs(torch.empty(1)) if hasattr(torch._C, "_storage_Use_Count") else None


def kept_output(tag: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
    """A contiguous tensor of ``shape`` for a function to fill and *return*: one of this thread's
    ``KEPT_OUTPUTS`` kept buffers for ``tag`` that no tensor or view references any more (the
    caller dropped that result), else a new one, kept in place of the oldest. Two, so that
    ``logits = model(x)`` in a loop, which still holds the previous logits during the call,
    finds the other one free. Their pages then stay mapped from one call to the next: the mid
    config's 65 MB logits (B=2, T=256, vocabulary 32000) faulted in 16,000 pages on every forward
    (glibc maps blocks that large afresh). A result the caller still holds is never written, nor
    one moved to shared memory.

    None (the caller allocates as usual) off the CPU, over ``MAX_OUTPUT_BYTES``, or where this
    torch does not report storage references. :func:`release_scratch` drops them."""
    numel = math.prod(shape)
    if (torch.device(device).type != "cpu" or numel * dtype.itemsize > MAX_OUTPUT_BYTES
            or _LONE_REFS is None):
        return None
    outs = _mine("outs")
    # a result moved to shared memory (share_memory_(), a torch.multiprocessing queue) may be
    # read by another process after this one drops it: never reused
    ring = outs[tag] = [b for b in outs.get(tag, []) if not b.is_shared()]
    size = torch.Size(shape)
    for buf in ring:
        if buf.shape == size and buf.dtype == dtype and _storage_refs(buf) <= _LONE_REFS:
            break
    else:
        with torch.inference_mode(False):   # see scratch: a normal tensor, writable anywhere
            buf = torch.empty(shape, dtype=dtype)
        ring.append(buf)
        del ring[:-KEPT_OUTPUTS]
    # a view, never the kept tensor itself: whatever holds the result holds a storage reference
    return buf.view(size)


def scratch_bytes() -> int:
    """Bytes this thread's kept scratch buffers and outputs hold."""
    kept = [*_mine("bufs").values(), *(b for ring in _mine("outs").values() for b in ring)]
    return sum(b.numel() * b.element_size() for b in kept)


def release_scratch() -> None:
    """Drop this thread's kept scratch buffers and outputs (allocated again when next needed;
    an output the caller still holds stays valid)."""
    _local.bufs = {}
    _local.outs = {}
