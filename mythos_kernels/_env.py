"""Every environment variable mythos reads, and the one set of rules for reading them.

=============================== ======================== =================== ====================================
variable                        accepted values          default             meaning
=============================== ======================== =================== ====================================
``MYTHOS_BACKEND``              ``auto``, ``triton`` or  ``auto``            which implementation serves each op
                                ``reference`` (any case)                     (``_dispatch``); read where neither
                                                                             ``use_backend`` nor ``set_backend``
                                                                             chose
``MYTHOS_CPU_DECODE_PLAN``      a switch (below)         on                  the planned CPU decode step
                                                                             (``mythos.decode``)
``MYTHOS_CPU_FAST_MULTINOMIAL`` a switch                 on                  the vectorized CPU draw of
                                                                             ``torch.multinomial(p, 1)``
                                                                             (``mythos.sampling``)
``MYTHOS_CPU_ONEDNN``           a switch                 on                  CPU fp32 products through oneDNN:
                                                                             the default of the ``onednn``
                                                                             CPU variant (``cpu/linear.py``)
``MYTHOS_CPU_WEIGHT_COPIES``    a switch                 on                  derived (transposed, packed) weight
                                                                             copies for CPU inference (the
                                                                             default of the ``weight_copies``
                                                                             CPU variant); off trades their
                                                                             speed for memory
``MYTHOS_HALT_LAG``             ``0`` or ``1``           ``0``               loops the ACT early-exit check may
                                                                             lag (``mythos_kernels.HaltCheck``)
``MYTHOS_CACHE_DIR``            a directory              ``~/.cache/mythos`` where ``bench`` keeps measured
                                                                             device ceilings
``MYTHOS_COMMIT``               any text                 git ``HEAD``        the commit ``bench`` rows record
=============================== ======================== =================== ====================================

``MYTHOS_BENCH_ADAPTIVE_MODELS`` (free text: comma-separated ``.safetensors`` paths; default none)
names models saved by ``mythos.experiments`` that the ``adaptive`` bench suite adds.

A *switch* takes ``1``/``0``, ``true``/``false``, ``on``/``off`` or ``yes``/``no``, in any case.
An unset or empty variable takes its default; surrounding whitespace is ignored (except in the
free-text ones). Any other value raises ``ValueError`` naming the variable and what it
accepts. Each variable is read where it is used, on every use, so a change made while the
process runs takes effect; :func:`check_environment` parses all of them at once, and the model's
``forward`` and ``generate`` call it before any compute, so a bad value fails there and not
halfway through a call (with a cache half written).

``TRITON_INTERPRET`` is Triton's own (``1``/``true``/``on``/``yes``/``y`` in any case: kernels
run through its CPU interpreter); ``mythos_kernels.interpreter_active`` reads it by that rule.
The test suite also reads ``MYTHOS_TEST_DEVICE`` (a torch device; default ``cuda`` where there is
one, else ``cpu``).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

BACKEND_CHOICES = ("auto", "triton", "cpu", "reference")

_TRUE = frozenset(("1", "true", "on", "yes"))
_FALSE = frozenset(("0", "false", "off", "no"))
_SWITCH = "1/0, true/false, on/off or yes/no (any case)"


def _raw(name: str) -> str | None:
    """The variable's value with surrounding whitespace removed; None when unset or empty."""
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def env_flag(name: str, default: bool) -> bool:
    """A switch: ``1/true/on/yes`` -> True, ``0/false/off/no`` -> False (any case); ``default``
    when unset or empty.

    Raises:
        ValueError: any other value, naming the variable and the accepted values.
    """
    value = _raw(name)
    if value is None:
        return default
    low = value.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name} must be {_SWITCH}, got {value!r}")


def env_int(name: str, default: int, lo: int, hi: int) -> int:
    """An integer in ``[lo, hi]`` (decimal digits, optional sign); ``default`` when unset or empty.

    Raises:
        ValueError: not an integer, or out of range, naming the variable and the range.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        n = int(value, 10)
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        accepted = f"{lo} or {hi}" if hi == lo + 1 else f"an integer in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return n


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """One of ``choices`` (lower-case names; the value is matched in any case), returned lower-case;
    ``default`` when unset or empty.

    Raises:
        ValueError: any other value, naming the variable and the choices.
    """
    value = _raw(name)
    if value is None:
        return default
    low = value.lower()
    if low not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return low


def env_str(name: str, default: str) -> str:
    """Free text, taken as it is (no stripping); ``default`` when unset or empty."""
    value = os.environ.get(name)
    return value if value else default


_CHECKS: dict[str, Callable[[], object]] = {
    "MYTHOS_BACKEND": lambda: env_choice("MYTHOS_BACKEND", BACKEND_CHOICES, "auto"),
    "MYTHOS_CPU_DECODE_PLAN": lambda: env_flag("MYTHOS_CPU_DECODE_PLAN", True),
    "MYTHOS_CPU_FAST_MULTINOMIAL": lambda: env_flag("MYTHOS_CPU_FAST_MULTINOMIAL", True),
    "MYTHOS_CPU_ONEDNN": lambda: env_flag("MYTHOS_CPU_ONEDNN", True),
    "MYTHOS_CPU_WEIGHT_COPIES": lambda: env_flag("MYTHOS_CPU_WEIGHT_COPIES", True),
    "MYTHOS_HALT_LAG": lambda: env_int("MYTHOS_HALT_LAG", 0, 0, 1),
    "MYTHOS_CACHE_DIR": lambda: env_str("MYTHOS_CACHE_DIR", ""),
    "MYTHOS_COMMIT": lambda: env_str("MYTHOS_COMMIT", ""),
    "MYTHOS_BENCH_ADAPTIVE_MODELS": lambda: env_str("MYTHOS_BENCH_ADAPTIVE_MODELS", ""),
}
VARIABLES = tuple(_CHECKS)   # the names in the table above


def check_environment() -> None:
    """Parse every variable in the table; raise ``ValueError`` (naming it) at the first bad one."""
    for check in _CHECKS.values():
        check()
