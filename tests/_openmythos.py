"""The real open-mythos 0.5.0 package for the parity tests. ``bench/_openmythos.py`` stubs
``transformers`` (imported by the package only for its tokenizer) before the import. Only the
installed package counts here: the benchmarks' fallback to a local source copy is not accepted as
a parity reference."""

from __future__ import annotations

import importlib

from bench._openmythos import load_open_mythos as _load


def load_open_mythos():
    """The ``open_mythos`` package module, or None if the package is not installed."""
    mod, source = _load()
    if mod is None or not source.startswith("open-mythos"):
        return None
    return importlib.import_module("open_mythos")
