#!/usr/bin/env python3
"""Compile every registered Triton kernel for real GPUs on a machine without one, and report.

For each kernel in :func:`mythos_kernels.registered_kernels` (kernels register themselves at
import, one entry per shipped/autotune config) and each target architecture (default sm_90 and
sm_80), this runs ``triton.compile`` with a ``GPUTarget`` -- no GPU needed: the Triton wheel ships
``ptxas`` and ``cuobjdump`` -- and reads from the cubin:

* ``registers``    -- ``REG`` from ``cuobjdump --dump-resource-usage``;
* ``spill_bytes``  -- ``STACK`` (bytes of the per-thread stack frame: spills and local arrays);
                      ``spill_stores``/``spill_loads`` from ``ptxas -v`` are given as well;
* ``shared_bytes`` -- shared memory per block: Triton's dynamic request + static ``SHARED``;
* ``hgmma``        -- whether ``HGMMA`` (Hopper wgmma tensor cores) appears in the SASS;
* ``local_ops``    -- number of ``LDL``/``STL`` (local-memory) instructions in the SASS.

Usage::

    python tools/kernel_report.py                 # table
    python tools/kernel_report.py --json          # list of objects
    python tools/kernel_report.py --strict        # also fail on spills / missing HGMMA
    python tools/kernel_report.py --arch 90 --kernel lti_act_step
    python tools/kernel_report.py --module path/to/extra_kernels.py   # import more kernels
    python tools/kernel_report.py --jobs 1        # compile serially (default: min(4, CPUs))

Exit status: 1 if any config fails to compile (or, with ``--strict``, spills, lacks HGMMA on
sm_90 while its config says ``expect_hgmma``, or a ``@triton.jit`` kernel in ``mythos_kernels`` is
not registered -- helpers called by registered kernels excepted); 2 on a usage error; 0 otherwise.
"""

from __future__ import annotations

import os

# Compile for real GPUs: the interpreter must be off before Triton is imported.
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_ARCHS = (90, 80)
KEYS = ("kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "hgmma")


def nvidia_bin(tool: str) -> str:
    """Path of a tool shipped in the Triton wheel (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    import triton

    env = os.environ.get(f"TRITON_{tool.upper()}_PATH")
    if env and Path(env).exists():
        return env
    p = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / tool
    if p.exists():
        return str(p)
    from shutil import which

    found = which(tool)
    if found:
        return found
    raise FileNotFoundError(f"{tool} not found in the Triton wheel ({p}) or on PATH")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads")


def parse_resource_usage(text: str, fn_name: str | None = None) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` -> {registers, stack, static_shared, local}."""
    blocks = re.split(r"\n\s*Function ", "\n" + text)
    for block in blocks[1:]:
        name = block.split(":", 1)[0].strip()
        m = _RES_RE.search(block)
        if m and (fn_name is None or name == fn_name):
            return {"registers": int(m[1]), "stack": int(m[2]), "static_shared": int(m[3]),
                    "local": int(m[4])}
    m = _RES_RE.search(text)
    if not m:
        raise RuntimeError(f"could not parse cuobjdump resource usage:\n{text[:500]}")
    return {"registers": int(m[1]), "stack": int(m[2]), "static_shared": int(m[3]),
            "local": int(m[4])}


def parse_ptxas_log(text: str) -> dict[str, int] | None:
    m = _PTXAS_RE.search(text or "")
    if not m:
        return None
    return {"stack_frame": int(m[1]), "spill_stores": int(m[2]), "spill_loads": int(m[3])}


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}): {r.stderr[:500]}")
    return r.stdout + r.stderr


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _jit_fn(fn):
    """The ``JITFunction`` behind ``fn`` (unwraps autotuners/heuristics)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{fn!r} is not a @triton.jit function (is TRITON_INTERPRET set? the "
                        "report must run with the interpreter off)")
    return fn


def compile_config(fn, cfg, arch: int, workdir: Path) -> dict[str, Any]:
    """Compile one kernel config for one arch and measure it. Raises on a compile failure."""
    import triton
    from triton.compiler import ASTSource

    jfn = _jit_fn(fn)
    sig = dict(cfg.signature)
    for k in cfg.constexprs:  # Triton >= 3.3 wants constexprs named in the signature too
        sig.setdefault(k, "constexpr")
    ordered = {name: sig[name] for name in jfn.arg_names if name in sig}
    missing = [n for n in jfn.arg_names if n not in sig]
    if missing:
        raise ValueError(f"signature lacks arguments {missing}")
    # What Triton's JIT specializes at launch: 16-byte aligned pointers (torch allocations) and
    # the integers the config declares multiples of 16. Without these hints the report would
    # measure unvectorized code that never runs.
    div = set(getattr(cfg, "divisible", ()))
    attrs = {(jfn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in ordered.items() if t.startswith("*") or n in div}
    src = ASTSource(fn=jfn, signature=ordered, constexprs=dict(cfg.constexprs), attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        from triton import knobs

        ctx = knobs.nvidia.scope()
    except Exception:  # older Triton: no knobs module
        knobs, ctx = None, contextlib.nullcontext()
    with ctx, contextlib.redirect_stdout(log):
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = True   # ptxas -v output on fresh compiles
        kernel = triton.compile(src, target=_target(arch), options=options)
    compile_s = time.perf_counter() - t0
    cubin = kernel.asm["cubin"]
    name = kernel.metadata.name
    fd, tmpname = tempfile.mkstemp(prefix=f"{name}_sm{arch}_", suffix=".cubin", dir=workdir)
    os.close(fd)
    path = Path(tmpname)
    path.write_bytes(cubin)
    res = parse_resource_usage(_run([nvidia_bin("cuobjdump"), "--dump-resource-usage",
                                     str(path)]), name)
    sass = _run([nvidia_bin("cuobjdump"), "--dump-sass", str(path)])
    ptx_info = parse_ptxas_log(log.getvalue())
    if ptx_info is None:  # cached compile: ask ptxas ourselves
        ptx = workdir / f"{path.stem}.ptx"
        ptx.write_text(kernel.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        try:
            ptx_info = parse_ptxas_log(_run([nvidia_bin("ptxas"), "-v", f"--gpu-name={gpu}",
                                             str(ptx), "-o", str(ptx.with_suffix(".o"))]))
        except Exception:
            ptx_info = None
    dyn_shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    local_ops = len(re.findall(r"\b(?:LDL|STL)(?:\.[A-Z0-9]+)*\b", sass))
    return {
        "registers": res["registers"],
        "spill_bytes": res["stack"],
        "shared_bytes": dyn_shared + res["static_shared"],
        "hgmma": "HGMMA" in sass,
        "spill_stores": ptx_info["spill_stores"] if ptx_info else None,
        "spill_loads": ptx_info["spill_loads"] if ptx_info else None,
        "local_ops": local_ops,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "compile_s": round(compile_s, 3),
    }


def import_extra(spec: str) -> None:
    """Import a module by dotted name or file path (it registers kernels at import)."""
    p = Path(spec)
    if p.suffix == ".py" and p.exists():
        mod_name = f"_kernel_report_extra_{abs(hash(str(p.resolve()))) & 0xffffff:x}"
        s = importlib.util.spec_from_file_location(mod_name, p)
        mod = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = mod
        assert s.loader is not None
        s.loader.exec_module(mod)
        EXTRA_MODULES.append(mod_name)
    else:
        importlib.import_module(spec)
        EXTRA_MODULES.append(spec)


def _compile_row(kname: str, ci: int, arch: int, workdir: str, progress: bool
                 ) -> dict[str, Any]:
    """One (kernel, config, arch) row; never raises (a failure is recorded in ``error``)."""
    from mythos_kernels._registry import registered_kernels

    entry = registered_kernels()[kname]
    cfg = entry.configs[ci]
    row: dict[str, Any] = {"kernel": kname, "config": cfg.name, "arch": f"sm_{arch}",
                           "registers": None, "spill_bytes": None, "shared_bytes": None,
                           "hgmma": None, "expect_hgmma": bool(cfg.expect_hgmma), "error": None,
                           "same_build_as": None}
    if progress:
        print(f"[kernel_report] {kname} {cfg.name} sm_{arch}", file=sys.stderr, flush=True)
    try:
        row.update(compile_config(entry.fn, cfg, arch, Path(workdir)))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".strip()[:2000]
    return row


def report(archs: Iterable[int] = DEFAULT_ARCHS, kernels: Iterable[str] | None = None,
           progress: bool = False, jobs: int = 1) -> list[dict[str, Any]]:
    """One row per (kernel, config, arch), in registry order; failed compiles have ``error`` set
    and null metrics. A config that builds the same binary as an earlier one is not compiled
    again: its row repeats that one's metrics and names it in ``same_build_as``. ``jobs > 1``
    compiles in forked worker processes."""
    import mythos_kernels  # noqa: F401 - importing registers the shipped kernels
    from mythos_kernels._registry import registered_kernels

    reg = registered_kernels()
    names = list(kernels) if kernels else sorted(reg)
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise KeyError(f"unknown kernel(s) {unknown}; registered: {sorted(reg)}")
    # configs that compile to the same binary (same kernel, signature, constexprs, launch
    # settings) are compiled once per arch: the first one's row serves the others
    first: dict[tuple, tuple[str, int]] = {}
    same_as: dict[tuple[str, int], tuple[str, int]] = {}
    for k in names:
        for ci, cfg in enumerate(reg[k].configs):
            same_as[(k, ci)] = first.setdefault(build_key(reg[k].fn, cfg), (k, ci))
    tasks = [(k, ci, arch) for (k, ci), rep in same_as.items() if rep == (k, ci) for arch in archs]
    with tempfile.TemporaryDirectory(prefix="kernel_report_") as tmp:
        if jobs > 1 and len(tasks) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)),
                                     mp_context=mp.get_context("fork")) as ex:
                futs = [ex.submit(_compile_row, k, ci, a, tmp, progress) for k, ci, a in tasks]
                built = [f.result() for f in futs]
        else:
            built = [_compile_row(k, ci, a, tmp, progress) for k, ci, a in tasks]
    by_task = dict(zip(tasks, built))
    rows = []
    for (k, ci), (rk, rci) in same_as.items():
        cfg = reg[k].configs[ci]
        for arch in archs:
            row = dict(by_task[(rk, rci, arch)])
            if (rk, rci) != (k, ci):
                row.update(kernel=k, config=cfg.name, expect_hgmma=bool(cfg.expect_hgmma),
                           same_build_as=f"{rk} [{reg[rk].configs[rci].name}]")
            rows.append(row)
    return rows


def build_key(fn, cfg) -> tuple:
    """What ``triton.compile`` sees of a config: configs with equal keys give the same binary."""
    return (id(fn), tuple(sorted(cfg.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in cfg.constexprs.items())), cfg.num_warps,
            cfg.num_stages, tuple(sorted(getattr(cfg, "divisible", ()))))


EXTRA_MODULES: list[str] = []   # modules imported with --module (scanned like mythos_kernels)


def unregistered_kernels(package: str = "mythos_kernels") -> list[str]:
    """``module.name`` of every module-level ``@triton.jit`` function in ``package`` (and in the
    ``--module`` imports) that is not registered and is not called by a registered kernel (a
    helper): a kernel left out of the report."""
    from triton.runtime.jit import JITFunction

    from mythos_kernels._registry import registered_kernels

    reg_fns = []
    for entry in registered_kernels().values():
        try:
            reg_fns.append(_jit_fn(entry.fn))
        except TypeError:
            continue
    reg_ids = {id(f) for f in reg_fns}
    sources = "\n".join(getattr(f, "src", "") or "" for f in reg_fns)
    found = []      # (module, jit fn) defined in scope
    aliases: dict[int, set[str]] = {}  # id(fn) -> every name it is bound to in scope
    for mod_name, mod in sorted(sys.modules.items()):
        in_scope = (mod_name == package or mod_name.startswith(package + ".")
                    or mod_name in EXTRA_MODULES)
        if mod is None or not in_scope:
            continue
        for attr, val in sorted(vars(mod).items()):
            try:
                fn = _jit_fn(val) if hasattr(val, "fn") or isinstance(val, JITFunction) else None
            except TypeError:
                fn = None
            if fn is None:
                continue
            aliases.setdefault(id(fn), set()).update({attr, getattr(fn, "__name__", attr)})
            if getattr(fn, "__module__", mod_name) == mod_name:
                found.append((mod_name, fn))
    out = []
    for mod_name, fn in found:
        if id(fn) in reg_ids:
            continue
        if any(re.search(rf"\b{re.escape(n)}\s*\(", sources) for n in aliases[id(fn)]):
            continue  # a @triton.jit helper called (under any name) from a registered kernel
        out.append(f"{mod_name}.{getattr(fn, '__name__', '?')}")
    return sorted(set(out))


def problems(rows: list[dict[str, Any]], strict: bool) -> list[str]:
    """Reasons for a non-zero exit."""
    out = []
    for r in rows:
        tag = f"{r['kernel']} [{r['config']}] {r['arch']}"
        if r.get("error"):
            out.append(f"{tag}: compile failed: {r['error'].splitlines()[0][:200]}")
            continue
        if strict:
            if (r.get("spill_bytes") or 0) > 0 or (r.get("spill_stores") or 0) > 0:
                out.append(f"{tag}: spills ({r['spill_bytes']} stack bytes, "
                           f"{r.get('spill_stores')} spill-store bytes)")
            if r.get("expect_hgmma") and r["arch"] == "sm_90" and not r.get("hgmma"):
                out.append(f"{tag}: expected HGMMA on sm_90 but the SASS has none")
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["kernel", "config", "arch", "regs", "spill B", "smem B", "HGMMA", "LDL/STL", "warps",
            "stages", "compile s", "note"]
    body = []
    for r in rows:
        if r.get("error"):
            body.append([r["kernel"], r["config"], r["arch"], "-", "-", "-", "-", "-", "-", "-",
                         "-", "COMPILE FAILED: " + r["error"].splitlines()[0][:80]])
            continue
        note = []
        if (r.get("spill_bytes") or 0) > 0 or (r.get("spill_stores") or 0) > 0:
            note.append("SPILLS")
        if r.get("expect_hgmma") and r["arch"] == "sm_90" and not r.get("hgmma"):
            note.append("NO HGMMA")
        body.append([r["kernel"], r["config"], r["arch"], r["registers"], r["spill_bytes"],
                     r["shared_bytes"], "yes" if r["hgmma"] else "no", r.get("local_ops", "-"),
                     r.get("num_warps", "-"), r.get("num_stages", "-"), r.get("compile_s", "-"),
                     " ".join(note)])
    if not body:
        return "no Triton kernels are registered (mythos_kernels._registry.register_kernel)"
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(cols, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ap.add_argument("--strict", action="store_true",
                    help="also exit non-zero on spills, or on sm_90 configs that expect HGMMA "
                         "and lack it")
    ap.add_argument("--arch", action="append", type=int,
                    help="compute capability to target (repeatable; default 90 and 80)")
    ap.add_argument("--kernel", action="append", help="only this registered kernel (repeatable)")
    ap.add_argument("--module", action="append", default=[],
                    help="import this module or .py file first (it registers extra kernels)")
    ap.add_argument("--progress", action="store_true", help="progress lines on stderr")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="parallel compile processes (default: min(4, CPUs))")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_report: unset TRITON_INTERPRET (the report compiles for real GPUs)",
              file=sys.stderr)
        return 2
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    for m in args.module:
        try:
            import_extra(m)
        except ImportError as exc:
            ap.error(f"--module {m}: {exc}")
    try:
        rows = report(args.arch or DEFAULT_ARCHS, args.kernel, progress=args.progress,
                      jobs=args.jobs)
    except KeyError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
    bad = problems(rows, args.strict)
    left_out = unregistered_kernels()
    for name in left_out:
        print(f"kernel_report: {name} is a @triton.jit kernel that is not registered "
              "(mythos_kernels._registry.register_kernel)", file=sys.stderr)
    if args.strict:
        bad += [f"{n}: not registered" for n in left_out]
    for b in bad:
        print(f"kernel_report: {b}", file=sys.stderr)
    if not rows:
        print("kernel_report: no kernels registered", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
