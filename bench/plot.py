"""Plot benchmark results: one PNG per op (speedup over eager and % of ceiling vs problem size) and
one for the model-level suites (tokens/s vs context).

    python -m bench.plot bench/results/cpu/results.jsonl [--out DIR]

When a file holds several runs, the latest row per (device, op, provider, mode, dtype, shape) is
used. PNGs go next to the results file unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODE_ORDER = ("forward", "backward", "full")


def load_rows(paths: list[Path | str]) -> list[dict]:
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """Keep the last ok row per (device, op, provider, mode, dtype, shape)."""
    keep: dict = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = (r.get("device"), r.get("op"), r.get("provider"), r.get("mode"), r.get("dtype"),
               json.dumps(r.get("shape"), sort_keys=True))
        keep[key] = r
    return list(keep.values())


_COLORS = {"eager": "tab:orange", "reference": "tab:green", "compile": "tab:blue",
           "triton": "tab:red"}


def _color(provider: str) -> str:
    """One color per provider in every panel (others get matplotlib's next color)."""
    return _COLORS.get(provider, "tab:purple")


def _size_key(r: dict) -> tuple:
    return (r.get("flops") or 0, r.get("bytes") or 0)


def _shape_labels(rows: list[dict]) -> dict[str, str]:
    """Short x-axis label per shape: only the shape keys that vary across these rows."""
    shapes = {json.dumps(r.get("shape"), sort_keys=True): r.get("shape") or {} for r in rows}
    keys = sorted({k for sh in shapes.values() for k in sh})
    varying = [k for k in keys if len({str(sh.get(k)) for sh in shapes.values()}) > 1] or keys
    return {js: ",".join(f"{k}={sh.get(k)}" for k in varying) for js, sh in shapes.items()}


def plot_op(op: str, rows: list[dict], out_dir: Path) -> Path:
    """Speedup over eager and % of ceiling per shape (shapes ordered by work: FLOPs, bytes)."""
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
    device = rows[0].get("device", "?")
    for i, mode in enumerate(modes):
        mrows = [r for r in rows if r["mode"] == mode]
        labels = _shape_labels(mrows)
        order = []  # shape keys by size
        for r in sorted(mrows, key=_size_key):
            js = json.dumps(r.get("shape"), sort_keys=True)
            if js not in order:
                order.append(js)
        pos = {js: k for k, js in enumerate(order)}
        series: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in mrows:
            series[(r["provider"], r["dtype"])].append(r)
        ax_s, ax_c = axes[i]
        for (prov, dt), rs in sorted(series.items()):
            rs.sort(key=lambda r: pos[json.dumps(r.get("shape"), sort_keys=True)])
            xs = [pos[json.dumps(r.get("shape"), sort_keys=True)] for r in rs]
            label = f"{prov} {dt}"
            style = dict(marker="o", label=label, color=_color(prov),
                         ls="-" if dt in ("bfloat16", "float16") else "--")
            if prov != "eager":
                ys = [r.get("speedup_vs_eager") for r in rs]
                pts = [(x, y) for x, y in zip(xs, ys) if y]
                if pts:
                    ax_s.plot(*zip(*pts), **style)
            ys = [r.get("pct_of_ceiling") for r in rs]
            pts = [(x, y) for x, y in zip(xs, ys) if y]
            if pts:
                ax_c.plot(*zip(*pts), **style)
        ax_s.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax_s.set_yscale("log")
        ax_s.set_title(f"{op} {mode}: speedup over eager (open-mythos ops)")
        ax_c.set_title(f"{op} {mode}: % of device ceiling")
        for ax in (ax_s, ax_c):
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels([labels[js] for js in order], rotation=30, ha="right", fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
            if any(not str(ln.get_label()).startswith("_") for ln in ax.lines):
                ax.legend(fontsize=7)   # the axhline alone has no label: no empty legend
        ax_s.set_ylabel("x faster than eager")
        ax_c.set_ylabel("% of ceiling")
        ax_c.set_ylim(bottom=0)
    fig.suptitle(f"{op} on {device}", fontsize=10)
    fig.tight_layout()
    out = out_dir / f"{op}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_model(rows: list[dict], out_dir: Path) -> Path | None:
    suites = [s for s in ("prefill", "decode", "generate", "generate_compiled")
              if any(r.get("suite") == s for r in rows)]
    if not suites:
        return None
    fig, axes = plt.subplots(1, len(suites), figsize=(5.2 * len(suites), 3.8), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        series: dict[tuple[str, int], list[dict]] = defaultdict(list)
        for r in rows:
            if r.get("suite") == suite:
                series[(r["impl"], r["batch"])].append(r)
        for (impl, b), rs in sorted(series.items()):
            rs.sort(key=lambda r: r["context"])
            ax.plot([r["context"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o",
                    ls="-" if impl == "mythos" else "--", label=f"{impl} B={b}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel({"prefill": "tokens T", "decode": "context (cached tokens)",
                       "generate": "prompt tokens", "generate_compiled": "prompt tokens"}[suite])
        ax.set_ylabel("tokens/s")
        ax.set_title(f"model {suite}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"mythos vs open-mythos ({r0.get('config')} config, {r0.get('dtype')}, "
                 f"n_loops={r0.get('n_loops')}) on {r0.get('device')}", fontsize=10)
    fig.tight_layout()
    out = out_dir / "model.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_file(paths: list[Path | str], out_dir: Path | str | None = None) -> list[Path]:
    """Draw every plot for the rows in ``paths``; return the PNG paths."""
    paths = [Path(p) for p in paths]
    out_dir = Path(out_dir) if out_dir else paths[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = latest(load_rows(paths))
    written = []
    by_op: dict[str, list[dict]] = defaultdict(list)
    model_rows = []
    for r in rows:
        if r.get("kind") == "model":
            model_rows.append(r)
        else:
            by_op[r["op"]].append(r)
    for op, rs in sorted(by_op.items()):
        written.append(plot_op(op, rs, out_dir))
    if model_rows:
        p = plot_model(model_rows, out_dir)
        if p:
            written.append(p)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Plot bench results (one PNG per op).")
    ap.add_argument("results", nargs="+", help="results .jsonl file(s)")
    ap.add_argument("--out", help="output folder (default: next to the first results file)")
    args = ap.parse_args(argv)
    written = plot_file(args.results, args.out)
    for p in written:
        print(p)
    if not written:
        print("no ok rows to plot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
