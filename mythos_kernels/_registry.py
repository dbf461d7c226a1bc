"""Registry of Triton kernels for the GPU-free compile report (``tools/kernel_report.py``).

Each kernel module calls :func:`register_kernel` at import time with every launch
configuration it ships (one entry per autotune config), so a new kernel cannot be left out
of the report. A config names the Triton signature (argument name -> type string such as
``"*fp32"``, ``"i32"``, ``"fp32"`` or ``"constexpr"``) and the constexpr values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class KernelConfig:
    """One compile configuration of a kernel."""

    name: str                      # short label, e.g. "fp32-D2048-BLOCK4096"
    signature: dict[str, str]      # every non-constexpr argument -> Triton type string
    constexprs: dict[str, Any]     # constexpr argument -> value
    num_warps: int = 4
    num_stages: int = 3
    expect_hgmma: bool = False     # the report flags a GEMM kernel whose sm_90 SASS lacks HGMMA
    # integer arguments this config assumes are multiples of 16 (as Triton's JIT specializes them
    # at launch when they are); pointer arguments are always taken as 16-byte aligned.
    divisible: tuple[str, ...] = ()


@dataclass
class KernelEntry:
    name: str
    fn: Callable                   # the @triton.jit function
    configs: list[KernelConfig] = field(default_factory=list)


_KERNELS: dict[str, KernelEntry] = {}


def register_kernel(name: str, fn: Callable, configs: list[KernelConfig]) -> None:
    """Register ``fn`` (a ``@triton.jit`` kernel) under ``name`` with its shipped configs."""
    if not configs:
        raise ValueError(f"kernel {name!r} registered without any config")
    _KERNELS[name] = KernelEntry(name, fn, list(configs))


def registered_kernels() -> dict[str, KernelEntry]:
    """All registered kernels (importing :mod:`mythos_kernels` registers the shipped ones)."""
    return dict(_KERNELS)


def unregister_kernel(name: str) -> None:
    """Remove a kernel (used by tests that register a throwaway kernel)."""
    _KERNELS.pop(name, None)
