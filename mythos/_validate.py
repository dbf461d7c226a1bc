"""The one argument rule of every public entry point (config, forward, generate, caches, CLIs).

Every value a public entry point takes is checked up front, before any compute or allocation:

* **integers** accept Python ints and integer scalars that ``operator.index`` takes (numpy
  integers, 0-d / one-element integer tensors), as open-mythos's slicing and ``range`` do;
  not bool, not floats (``2.0`` is refused: it would fail in ``range``);
* **floats** accept ints and floats, numpy ones included (``numbers.Real``); not bool, not str;
* **choices** accept one of a listed set of values.

A value of the wrong type raises :class:`ArgumentTypeError`, a ``TypeError`` (also a
``ValueError``, so callers catching ``ValueError`` for bad arguments still catch it); a value
out of range (NaN and infinities included unless the range says otherwise) raises
``ValueError``. Both messages name the argument and what it accepts. The checkers return the
value normalized (a Python ``int`` or ``float``).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Iterable, Optional


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a TypeError; a ValueError too, for older callers)."""


def _range_text(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None,
              none_ok: bool = False) -> Optional[int]:
    """``v`` as a Python int in [lo, hi] (either bound may be None); None passes if ``none_ok``."""
    if v is None and none_ok:
        return None
    accepted = f"an int{' or None' if none_ok else ''} {_range_text(lo, hi)}".rstrip()
    out = None
    if not isinstance(v, bool) and not (hasattr(v, "dtype") and "bool" in str(v.dtype)):
        try:
            out = operator.index(v)
        except (TypeError, ValueError, RuntimeError):
            out = None
    if out is None:
        raise ArgumentTypeError(f"{name} must be {accepted}, got {type(v).__name__} {v!r}")
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise ValueError(f"{name} must be {accepted}, got {out}")
    return out


def check_loops(name: str, v: Any) -> Optional[int]:
    """A loop count (``n_loops``): a positive int, or None / 0 for the config's
    ``max_loop_iters`` (open-mythos reads ``n_loops or cfg.max_loop_iters``)."""
    return check_int(name, v, lo=0, none_ok=True) or None


def check_float(name: str, v: Any, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False, inf_ok: bool = False) -> float:
    """``v`` as a Python float in the range (open ends with ``lo_open`` / ``hi_open``); NaN is
    always refused, +-inf unless ``inf_ok`` (the bounds still apply)."""
    rng = _range_text(lo, hi, lo_open, hi_open)
    accepted = f"a {'' if inf_ok else 'finite '}number {rng}".rstrip()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ArgumentTypeError(f"{name} must be {accepted}, got {type(v).__name__} {v!r}")
    f = float(v)
    bad = (math.isnan(f) or (math.isinf(f) and not inf_ok)
           or (lo is not None and (f <= lo if lo_open else f < lo))
           or (hi is not None and (f >= hi if hi_open else f > hi)))
    if bad:
        raise ValueError(f"{name} must be {accepted}, got {v!r}")
    return f


def device_memory_bytes(device: Any) -> Optional[int]:
    """Total memory of ``device`` (a torch.device): physical RAM for the CPU, the GPU's memory
    for CUDA; None where unknown or nothing is allocated (meta)."""
    import os

    import torch

    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.mem_get_info(device)[1]
    except (ValueError, OSError, RuntimeError):
        pass
    return None


def check_choice(name: str, v: Any, choices: Iterable[Any]) -> Any:
    """``v`` if it is one of ``choices`` (ValueError listing them otherwise)."""
    choices = tuple(choices)
    try:
        ok = v in choices
    except TypeError:  # an unhashable / uncomparable value
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def check_bool(name: str, v: Any, none_ok: bool = False) -> Optional[bool]:
    """``v`` if it is a bool (or None when ``none_ok``)."""
    if (v is None and none_ok) or isinstance(v, bool):
        return v
    raise ArgumentTypeError(f"{name} must be True or False{' or None' if none_ok else ''}, "
                            f"got {type(v).__name__} {v!r}")


__all__ = ["ArgumentTypeError", "check_bool", "check_choice", "check_float", "check_int",
           "device_memory_bytes"]
