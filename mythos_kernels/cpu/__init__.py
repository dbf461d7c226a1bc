"""CPU forms of the ops, one module per op (``cpu/<op>.py``). Importing a module registers its
forms with the dispatch point (:func:`mythos_kernels._dispatch.register_cpu`); the package's
``__init__`` imports them all, so an op's module never imports its CPU forms."""

from . import linear, mla_decode, moe, rmsnorm  # noqa: F401
