"""Convert a checkpoint file between open-mythos 0.5.0's state_dict layout and mythos's.

    python tools/convert_checkpoint.py IN OUT [--to mythos|open-mythos] [--force]

The layouts differ only in the routed experts: open-mythos keeps three ``nn.Linear`` weights per
expert (``...routed_experts.{e}.gate/up/down.weight``), mythos stacks them (``...ffn.w13``,
``...ffn.w2``; ``mythos.checkpoint``). mythos loads open-mythos files as they are (a load hook
converts), so this is for files that other tools read, or to convert once instead of at every
load.

IN is a file saved with ``torch.save``: a state_dict, or a dict holding one under ``model``,
``state_dict`` or ``model_state_dict`` (every other entry is written back unchanged). It is read
with ``torch.load(weights_only=True)``: tensors and plain containers only. A ``.safetensors``
IN or OUT (a ``mythos.train`` checkpoint's ``model.safetensors``) is read or written as one. Without ``--to`` the
output takes the other layout than IN's. OUT must not exist unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import tempfile

import torch

from mythos.checkpoint import (
    EXPERT_KEY_RE,
    from_open_mythos_state_dict,
    to_open_mythos_state_dict,
)

WRAPPERS = ("model", "state_dict", "model_state_dict")
_STACKED = re.compile(r"(^|\.)ffn\.(w13|w2)$")


def layout(sd: dict) -> str:
    """``"open-mythos"`` or ``"mythos"``: which layout a state_dict's routed experts use."""
    is_open = any(isinstance(k, str) and EXPERT_KEY_RE.match(k) for k in sd)
    stacked = any(isinstance(k, str) and _STACKED.search(k) for k in sd)
    if is_open and stacked:
        raise ValueError("the state_dict holds routed experts in both layouts (per-expert "
                         "routed_experts.* and stacked ffn.w13/w2 keys)")
    if not (is_open or stacked):
        raise ValueError("no routed-expert weights found (neither routed_experts.{e}.*.weight "
                         "nor ffn.w13 / ffn.w2 keys): not an OpenMythos or mythos state_dict")
    return "open-mythos" if is_open else "mythos"


def _state_dict_of(obj) -> tuple[dict, str | None]:
    """(state_dict, the key it sits under in obj, or None when obj is the state_dict)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state_dict or a dict holding one, got {type(obj).__name__}")
    for key in WRAPPERS:
        if isinstance(obj.get(key), dict):
            return obj[key], key
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError(f"no state_dict found: not a dict of tensors, and none under {WRAPPERS}")


def convert(obj, to: str | None = None):
    """``obj`` (a state_dict or a dict holding one, see the module docstring) with its state_dict
    in layout ``to`` (default: the other one); returns (new object, source layout, target)."""
    sd, key = _state_dict_of(obj)
    src = layout(sd)
    dst = to or ("mythos" if src == "open-mythos" else "open-mythos")
    if dst not in ("mythos", "open-mythos"):
        raise ValueError(f"--to must be 'mythos' or 'open-mythos', got {dst!r}")
    if dst == src:
        new = sd
    elif dst == "mythos":
        new = from_open_mythos_state_dict(sd)
    else:
        new = to_open_mythos_state_dict(sd)
    if key is None:
        return new, src, dst
    return {**obj, key: new}, src, dst


def _safetensors_bytes(obj) -> bytes:
    """The state_dict of ``obj`` as safetensors bytes: each tensor its own contiguous copy
    (safetensors refuses shared storage, and a checkpoint's tied embedding and head share it)."""
    from safetensors.torch import save

    sd, _ = _state_dict_of(obj)
    return save({k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="IN")
    ap.add_argument("dst", metavar="OUT")
    ap.add_argument("--to", choices=["mythos", "open-mythos"], default=None)
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.src):
        ap.error(f"IN {args.src}: no such file")
    if os.path.getsize(args.src) == 0:
        ap.error(f"IN {args.src}: the file is empty (not a torch.save checkpoint)")
    # the same file however OUT names it: a symlink, a hard link, another relative path
    same = os.path.realpath(args.src) == os.path.realpath(args.dst) or \
        (os.path.exists(args.dst) and os.path.samefile(args.src, args.dst))
    if same:
        ap.error(f"OUT {args.dst} is the input file {args.src}: a conversion never overwrites its "
                 "input")
    if os.path.exists(args.dst) and not args.force:
        ap.error(f"OUT {args.dst} exists (--force to overwrite)")
    out_dir = os.path.dirname(os.path.abspath(args.dst))
    if os.path.isdir(args.dst) or not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        ap.error(f"OUT {args.dst}: not a writable file path (its folder {out_dir} must exist)")
    try:
        if args.src.endswith(".safetensors"):   # e.g. a mythos.train checkpoint's weights
            from safetensors.torch import load_file
            obj = load_file(args.src)
        else:
            obj = torch.load(args.src, map_location="cpu", weights_only=True)
        new, src, dst = convert(obj, args.to)
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        print(f"convert_checkpoint: {args.src}: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    # written whole or not at all: a temporary file beside OUT, renamed over it
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".convert_checkpoint.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if args.dst.endswith(".safetensors"):
                f.write(_safetensors_bytes(new))
            else:
                torch.save(new, f)
        os.replace(tmp, args.dst)
    except BaseException:
        os.unlink(tmp)
        raise
    same = " (already in that layout: copied)" if src == dst else ""
    print(f"{args.src} ({src} layout) -> {args.dst} ({dst} layout){same}")
    dropped = sorted(map(str, set(new) - {_state_dict_of(new)[1]})) \
        if args.dst.endswith(".safetensors") and _state_dict_of(new)[1] else []
    if dropped:
        print(f"note: a .safetensors file holds tensors only: the state_dict was written, not the "
              f"other entries of IN ({', '.join(dropped)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
