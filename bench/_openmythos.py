"""Import open-mythos 0.5.0 (the model we reimplement) for side-by-side benchmarks and tests.

``open_mythos/__init__.py`` imports ``transformers`` for its tokenizer only; when ``transformers``
is not installed a stub module with an ``AutoTokenizer`` attribute is put in ``sys.modules`` first,
so the model classes import without it (the tokenizer itself is then unusable).

Install the package with ``pip install --no-deps open-mythos==0.5.0``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import ModuleType

_REPO = Path(__file__).resolve().parent.parent
# A verbatim copy of open_mythos/main.py that some checkouts keep (git-ignored): used only when the
# package is not installed, and reported as such.
_LOCAL_COPY = _REPO / ".om" / "open_mythos_main.py"

_cached: tuple[ModuleType | None, str] | None = None


def _stub_transformers() -> None:
    if "transformers" in sys.modules:
        return
    try:
        importlib.import_module("transformers")
        return
    except Exception:
        pass
    stub = types.ModuleType("transformers")

    class AutoTokenizer:
        """Stub: transformers is not installed; the open-mythos tokenizer is unavailable."""

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise ImportError("transformers is not installed (stubbed for benchmarking)")

    stub.AutoTokenizer = AutoTokenizer
    stub.__mythos_stub__ = True
    sys.modules["transformers"] = stub


def load_open_mythos() -> tuple[ModuleType | None, str]:
    """Return ``(module, source)``: the module exposing ``OpenMythos`` and ``MythosConfig``.

    ``source`` is ``"open-mythos <version>"`` for the installed package, ``"local copy
    .om/open_mythos_main.py"`` for the fallback copy, or the reason neither could be imported
    (module ``None``).
    """
    global _cached
    if _cached is not None:
        return _cached
    try:
        _stub_transformers()
        mod = importlib.import_module("open_mythos.main")
        importlib.import_module("open_mythos")
        try:
            from importlib.metadata import version

            ver = version("open-mythos")
        except Exception:
            ver = "?"
        _cached = (mod, f"open-mythos {ver}")
    except Exception as exc:
        if _LOCAL_COPY.exists():
            spec = importlib.util.spec_from_file_location("_open_mythos_main_copy", _LOCAL_COPY)
            mod = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(mod)
            _cached = (mod, "local copy .om/open_mythos_main.py")
        else:
            _cached = (None, f"open-mythos not importable ({type(exc).__name__}: {exc}); "
                             "install with: pip install --no-deps open-mythos==0.5.0")
    return _cached


def open_mythos_version() -> str | None:
    """The installed open-mythos version, or None."""
    mod, src = load_open_mythos()
    return src if mod is not None else None
