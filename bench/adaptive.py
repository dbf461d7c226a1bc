"""The ``adaptive`` suite: per-token early exit's speed/quality frontier and self-speculative
decoding's speed-up, on the CPU.

Early exit: for each criterion, threshold and fill, a fixed prompt set is decoded with the
full-depth greedy tokens fed back (teacher forcing), so every step compares the same context:
tokens/s of the early-exit steps, mean loops run, the top-1 agreement with the full-depth
next-token distribution and the mean ``KL(full || early exit)``. Speculative decoding: greedy
tokens/s and the acceptance rate for several ``draft_loops`` against plain ``generate``. Rows in
``adaptive.jsonl``; the frontier plot in ``adaptive.png`` beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

import mythos
from mythos import adaptive, early_exit
from mythos.cache import MythosCache

from .model import MID

LEVELS = {
    "tiny": dict(cfg=dict(vocab_size=97, dim=60, n_heads=6, n_kv_heads=2, max_seq_len=64,
                          max_loop_iters=4, prelude_layers=1, coda_layers=1, kv_lora_rank=24,
                          q_lora_rank=20, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=14,
                          n_experts=7, n_shared_experts=1, n_experts_per_tok=3, expert_dim=12,
                          lora_rank=3),
                 B=2, prompt=6, new=4, n_loops=4, thresholds={"act": [0.9], "kl": [1e-2],
                                                              "latent": [0.3]}, drafts=[1]),
    "quick": dict(cfg=MID, B=4, prompt=32, new=16, n_loops=8,
                  thresholds={"act": [0.5, 0.9, 0.99], "kl": [1e-4, 1e-3, 1e-2, 1e-1],
                              "latent": [0.02, 0.05, 0.1, 0.2]}, drafts=[1, 2, 4]),
}
LEVELS["full"] = dict(LEVELS["quick"], B=8, new=32)


def _model(cfg: dict, seed: int = 0) -> mythos.OpenMythos:
    torch.manual_seed(seed)
    m = mythos.OpenMythos(mythos.MythosConfig(**cfg)).eval()
    with torch.no_grad():      # away from the all-equal init: LTI, LoRA, router bias, norms
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@torch.no_grad()
def _decode(m, ids: torch.Tensor, forced: Optional[torch.Tensor], n_new: int, n_loops: int,
            exit_args: Optional[tuple]) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Greedy decode (``forced`` tokens fed back when given): (tokens [B, n_new], log-probs
    [B, n_new, V], seconds of the decode steps, loops run)."""
    B, P = ids.shape
    cache = MythosCache(P + n_new)
    logits = [m._logits(m._hidden(ids, n_loops, cache, 0)[:, -1])]
    toks = [logits[0].argmax(-1)]
    loops, t0 = 0, time.perf_counter()
    for i in range(1, n_new):
        cur = (forced[:, i - 1] if forced is not None else toks[-1])[:, None]
        if exit_args is None:
            h = m._hidden(cur, n_loops, cache, P + i - 1)[:, -1]
            loops += n_loops * B
        else:
            h, depth = early_exit.hidden_step(m, cur, cache, P + i - 1, n_loops, *exit_args)
            loops += int(depth.sum())
        logits.append(m._logits(h))
        toks.append(logits[-1].argmax(-1))
    secs = time.perf_counter() - t0
    return (torch.stack(toks, 1), torch.log_softmax(torch.stack(logits, 1).float(), -1), secs,
            loops)


def run_adaptive(level: str = "quick", out_dir: Optional[str] = None) -> list[dict]:
    """The suite's rows (printed as they come); the plot written where ``out_dir`` says
    (default ``bench/results/cpu``; none at the ``tiny`` level)."""
    L = LEVELS[level]
    m = _model(L["cfg"])
    g = torch.Generator().manual_seed(0)
    B, n_new, n_loops = L["B"], L["new"], L["n_loops"]
    ids = torch.randint(0, m.cfg.vocab_size, (B, L["prompt"]), generator=g)
    ref_tok, ref_lp, ref_s, _ = _decode(m, ids, None, n_new, n_loops, None)
    steps = B * (n_new - 1)
    rows = [{"suite": "adaptive", "mode": "full_depth", "tokens_per_s": steps / ref_s,
             "mean_loops": float(n_loops), "top1_agree": 1.0, "mean_kl": 0.0, "B": B,
             "n_loops": n_loops}]
    for crit, thrs in L["thresholds"].items():
        for thr in thrs:
            for fill in early_exit.FILLS:
                tok, lp, s, loops = _decode(m, ids, ref_tok, n_new, n_loops, (crit, thr, fill))
                kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)[:, 1:].mean()
                rows.append({"suite": "adaptive", "mode": "early_exit", "criterion": crit,
                             "threshold": thr, "fill": fill, "tokens_per_s": steps / s,
                             "mean_loops": loops / steps,
                             "top1_agree": float((tok[:, 1:] == ref_tok[:, 1:]).float().mean()),
                             "mean_kl": float(kl), "B": B, "n_loops": n_loops})
                print(f"  {crit:6s} {thr:<7g} {fill:9s} {rows[-1]['tokens_per_s']:7.1f} tok/s  "
                      f"loops {rows[-1]['mean_loops']:.2f}  top1 {rows[-1]['top1_agree']:.3f}  "
                      f"KL {rows[-1]['mean_kl']:.2e}")
    t0 = time.perf_counter()
    plain = m.generate(ids, n_new, n_loops=n_loops, temperature=0)
    plain_s = time.perf_counter() - t0
    rows.append({"suite": "adaptive", "mode": "plain_generate", "tokens_per_s": B * n_new / plain_s,
                 "B": B, "n_loops": n_loops})
    for d in L["drafts"]:
        for k in (2, 4):
            stats: dict = {}
            t0 = time.perf_counter()
            out = adaptive.generate(m, ids, n_new, n_loops=n_loops, temperature=0, draft_loops=d,
                                    draft_tokens=k, stats=stats)
            s = time.perf_counter() - t0
            rows.append({"suite": "adaptive", "mode": "speculative", "draft_loops": d,
                         "draft_tokens": k, "tokens_per_s": B * n_new / s,
                         "acceptance": stats["accepted"] / max(stats["drafted"], 1),
                         "identical": bool(torch.equal(out, plain)), "B": B, "n_loops": n_loops})
            print(f"  speculative d={d} k={k}: {rows[-1]['tokens_per_s']:.1f} tok/s (plain "
                  f"{B * n_new / plain_s:.1f}), acceptance {rows[-1]['acceptance']:.2f}")
    if level != "tiny":
        plot_adaptive(rows, Path(out_dir or "bench/results/cpu") / "adaptive.png")
    return rows


def plot_adaptive(rows: list[dict], path: Path) -> None:
    """tokens/s against top-1 agreement, one marker per fill, one colour per criterion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"act": "tab:blue", "kl": "tab:orange", "latent": "tab:green"}
    marks = {"recompute": "o", "latest": "s", "project": "^"}
    for r in rows:
        if r["mode"] == "early_exit":
            ax.scatter(r["tokens_per_s"], r["top1_agree"], c=colours[r["criterion"]],
                       marker=marks[r["fill"]], s=30)
        elif r["mode"] in ("full_depth", "speculative"):
            ax.scatter(r["tokens_per_s"], 1.0, c="black", marker="x" if r["mode"] == "speculative"
                       else "*", s=60)
    for c, col in colours.items():
        ax.scatter([], [], c=col, label=c)
    for f, mk in marks.items():
        ax.scatter([], [], c="grey", marker=mk, label=f"fill={f}")
    ax.scatter([], [], c="black", marker="*", label="full depth")
    ax.scatter([], [], c="black", marker="x", label="speculative (exact)")
    ax.set_xlabel("decode tokens/s (CPU)")
    ax.set_ylabel("top-1 agreement with full depth")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["LEVELS", "plot_adaptive", "run_adaptive"]
