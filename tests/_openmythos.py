"""Import open-mythos 0.5.0 (installed with ``pip install --no-deps open-mythos==0.5.0``).

Its package ``__init__`` imports ``transformers`` only for its tokenizer; when transformers is
absent a stub module stands in (the tokenizer is never used by the tests)."""

from __future__ import annotations

import importlib
import sys
import types


def load_open_mythos():
    """The ``open_mythos`` module, or None if the package is not installed."""
    try:
        importlib.util.find_spec("open_mythos")
    except Exception:
        return None
    if importlib.util.find_spec("open_mythos") is None:
        return None
    if "transformers" not in sys.modules:
        try:
            import transformers  # noqa: F401
        except Exception:
            stub = types.ModuleType("transformers")

            class AutoTokenizer:  # pragma: no cover - never called
                @classmethod
                def from_pretrained(cls, *a, **k):
                    raise RuntimeError("transformers is not installed (stub)")

            stub.AutoTokenizer = AutoTokenizer
            sys.modules["transformers"] = stub
    return importlib.import_module("open_mythos")
