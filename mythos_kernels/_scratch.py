"""Reusable CPU scratch buffers for the CPU inference forms' large intermediates.

torch allocates CPU tensors with plain ``malloc``. glibc hands blocks of a few MB back to the
kernel when they are freed (above its mmap threshold, or by trimming the top of the heap), so
the next call's buffer of the same size faults in again, page by page, and every fault zeroes
4 KB. At the mid config (B=2, T=256, 2-core VM, minor faults counted per op):

- random-init (skewed) routing, the sorted MoE form: its gathered rows and outputs (4 MB each)
  faulted in on every loop, ~10,000 of the forward's ~31,000 faults; kept, the forward went
  from 413.8 to 403.2 ms (``tools/cpu_ab.py --switches moe_scratch``, 20 interleaved reps);
- balanced routing (a trained model's; routing replaced by random permutations), the padded
  form: its slab, products and selected rows faulted ~37,000 times a forward; kept, 525 -> 457
  ms (16 interleaved reps against the former code, bitwise the same logits).

:func:`scratch` keeps one buffer per (tag, dtype) per thread and hands out views of it, so a
buffer's pages stay mapped from one call to the next. Only for intermediates that die inside the
function that asks for them (never returned, never saved for backward), in code that does not call
itself: the next call with the same tag overwrites the buffer. Buffers over ``MAX_BYTES`` are not
kept (a plain ``torch.empty``), nor are non-CPU ones. :func:`release_scratch` drops them.
"""

from __future__ import annotations

import math
import threading

import torch

# largest buffer kept between calls (per tag and dtype; six tags in the MoE forms, so at most
# ~192 MB held). Bigger products take long enough that their faults matter less.
MAX_BYTES = 32 << 20

_local = threading.local()


def scratch(tag: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``shape``: a view of this thread's kept buffer for
    ``(tag, dtype)``, grown when too small (see the module docstring for when it may be used)."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel * dtype.itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get((tag, dtype))
    if buf is None or buf.numel() < numel:
        # a normal tensor even under torch.inference_mode(): an inference tensor could not be
        # written outside it (calls under no_grad would raise)
        with torch.inference_mode(False):
            buf = bufs[(tag, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def scratch_bytes() -> int:
    """Bytes this thread's kept scratch buffers hold."""
    return sum(b.numel() * b.element_size() for b in getattr(_local, "bufs", {}).values())


def release_scratch() -> None:
    """Drop this thread's kept scratch buffers (they are allocated again when next needed)."""
    _local.bufs = {}
