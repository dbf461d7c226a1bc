"""``python -m mythos.train plot DIR``: a run's curves from DIR/metrics.jsonl as a PNG."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

PANELS = (("loss", ("loss", "eval_loss")), ("eval accuracy", ("eval_acc",)), ("lr", ("lr",)),
          ("tokens/s", ("tokens_per_s",)), ("loops", ("n_loops", "mean_halt_depth")),
          ("rho(A)", ("rho_A",)), ("expert load max/mean", ("load_max_over_mean",)),
          ("grad norm", ("grad_norm",)))


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl: JSON objects with an integer ``step`` (a torn last line,
    from a killed run, and anything else is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    """Draw ``run_dir``'s metrics into ``out`` (default ``run_dir/metrics.png``); returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} does not exist: not a training run folder")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path!r} holds no metrics rows")
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="o" if k.startswith("eval") else None,
                        markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mythos.train plot",
                                description="Draw a training run's curves (PNG).")
    p.add_argument("dir", metavar="DIR", help="the run folder (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: DIR/metrics.png)")
    ns = p.parse_args(argv)
    try:
        out = plot_run(ns.dir, ns.out)
    except ValueError as exc:
        p.error(str(exc))
    print(out)
    return 0
