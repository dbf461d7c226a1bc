"""The ``adaptive`` suite: per-token early exit's speed/quality frontier and self-speculative
decoding's speed-up, on the CPU.

Early exit: for each criterion, threshold and fill, a fixed prompt set is decoded with the
full-depth greedy tokens fed back (teacher forcing), so every step compares the same context:
tokens/s of the early-exit steps, mean loops run, the top-1 agreement with the full-depth
next-token distribution and the mean ``KL(full || early exit)``. Speculative decoding: greedy
tokens/s and the acceptance rate for several ``draft_loops`` against plain ``generate``. Rows in
``adaptive.jsonl``; the frontier plot in ``adaptive.png`` beside it.

The mid config (random weights) measures speed; trained models, where the halting depth varies,
measure quality: ``MYTHOS_BENCH_ADAPTIVE_MODELS=path1,path2`` names models saved by
``python -m mythos.experiments ... --out DIR`` (``DIR/models/NAME.safetensors`` with
``NAME.json`` beside it). Each is decoded over held-out sequences of its multi-hop pointer task
(the first half prefilled, the rest fed back one token at a time); its rows add the answer
token's agreement with full depth (``answer_agree``) and its accuracy (``answer_acc``).
"""

from __future__ import annotations

import json
import os
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
MODELS_ENV = "MYTHOS_BENCH_ADAPTIVE_MODELS"
TRAINED_BATCH = {"tiny": 4, "quick": 32, "full": 128}     # held-out sequences per trained model


def model_paths(value: Optional[str] = None) -> list[Path]:
    """The trained models ``value`` names (default: ``$MYTHOS_BENCH_ADAPTIVE_MODELS``), a comma
    list of ``.safetensors`` files each with its ``.json`` (config) beside it; ValueError naming
    the variable and the path for anything else, before any model is built."""
    value = os.environ.get(MODELS_ENV, "") if value is None else value
    paths = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        p = Path(item)
        meta = p.with_suffix(".json")
        if p.suffix != ".safetensors" or not p.is_file():
            raise ValueError(f"{MODELS_ENV}: {item!r} is not a .safetensors file (a model saved "
                             "by python -m mythos.experiments, DIR/models/NAME.safetensors)")
        try:
            cfg = json.loads(meta.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{MODELS_ENV}: {item!r} has no readable {meta.name} with a "
                             f"'config' beside it ({type(exc).__name__}: {exc})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{MODELS_ENV}: {meta} 'config' must be a dict of MythosConfig "
                             f"fields, got {type(cfg).__name__}")
        paths.append(p)
    return paths


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
    logits = [m.logits(m.hidden_states(ids, n_loops, cache, 0)[:, -1])]
    toks = [logits[0].argmax(-1)]
    loops, t0 = 0, time.perf_counter()
    for i in range(1, n_new):
        cur = (forced[:, i - 1] if forced is not None else toks[-1])[:, None]
        if exit_args is None:
            h = m.hidden_states(cur, n_loops, cache, P + i - 1)[:, -1]
            loops += n_loops * B
        else:
            h, depth = early_exit.hidden_step(m, cur, cache, P + i - 1, n_loops, *exit_args)
            loops += int(depth.sum())
        logits.append(m.logits(h))
        toks.append(logits[-1].argmax(-1))
    secs = time.perf_counter() - t0
    return (torch.stack(toks, 1), torch.log_softmax(torch.stack(logits, 1).float(), -1), secs,
            loops)


def _frontier(m, ids: torch.Tensor, forced: Optional[torch.Tensor], n_new: int, n_loops: int,
              thresholds: dict, tag: dict, answer: Optional[torch.Tensor] = None) -> list[dict]:
    """Full depth, then every criterion x threshold x fill, decoding ``ids`` with ``forced`` fed
    back (the full-depth greedy tokens when None). ``answer`` [B]: the token the last step
    should predict (rows then carry ``answer_agree`` and ``answer_acc``)."""
    B = ids.shape[0]
    ref_tok, ref_lp, ref_s, _ = _decode(m, ids, forced, n_new, n_loops, None)
    forced = ref_tok if forced is None else forced
    steps = B * (n_new - 1)

    def answer_cols(tok: torch.Tensor) -> dict:
        if answer is None:
            return {}
        return {"answer_agree": float((tok[:, -1] == ref_tok[:, -1]).float().mean()),
                "answer_acc": float((tok[:, -1] == answer).float().mean())}

    rows = [dict(tag, suite="adaptive", mode="full_depth", tokens_per_s=steps / ref_s,
                 mean_loops=float(n_loops), top1_agree=1.0, mean_kl=0.0, B=B, n_loops=n_loops,
                 **answer_cols(ref_tok))]
    for crit, thrs in thresholds.items():
        for thr in thrs:
            for fill in early_exit.FILLS:
                tok, lp, s, loops = _decode(m, ids, forced, n_new, n_loops, (crit, thr, fill))
                kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)[:, 1:].mean()
                rows.append(dict(tag, suite="adaptive", mode="early_exit", criterion=crit,
                                 threshold=thr, fill=fill, tokens_per_s=steps / s,
                                 mean_loops=loops / steps,
                                 top1_agree=float((tok[:, 1:] == ref_tok[:, 1:]).float().mean()),
                                 mean_kl=float(kl), B=B, n_loops=n_loops, **answer_cols(tok)))
                r = rows[-1]
                ans = f"  answer {r['answer_agree']:.3f}" if answer is not None else ""
                print(f"  {tag['model'][-24:]:24s} {crit:6s} {thr:<7g} {fill:9s} "
                      f"{r['tokens_per_s']:7.1f} tok/s  loops {r['mean_loops']:.2f}  "
                      f"top1 {r['top1_agree']:.3f}  KL {r['mean_kl']:.2e}{ans}")
    return rows


def _task_prompts(path: Path, meta: dict, cfg: mythos.MythosConfig, batch: int
                  ) -> tuple[torch.Tensor, dict]:
    """Held-out sequences [batch, L] of the multi-hop pointer task the model at ``path`` was
    trained on (answer last), and the task's description for the rows."""
    from mythos.experiments.common import MultiHopPointer, Size

    size = meta.get("size") if isinstance(meta.get("size"), dict) else None
    if size is not None:        # the run's own task: its nodes, hops and padded layout
        sz = Size(**{k: tuple(v) if isinstance(v, list) else v for k, v in size.items()})
        task, nodes, hops = sz.task(), sz.nodes, sz.train_hops
    else:                       # the size its vocabulary implies (3 + n + n^2), hops 1-2
        nodes, hops = int(round((cfg.vocab_size - 3.75) ** 0.5 - 0.5)), (1, 2)
        task = MultiHopPointer(nodes, hops)
    b = task.batch(0, "eval", 0, 0, batch)
    seq = torch.cat([b.ids, b.targets[:, -1:]], 1)
    return seq, {"model": str(path), "task": task.name, "nodes": int(nodes),
                 "hops": list(hops)}


def trained_rows(path: Path, level: str = "quick") -> list[dict]:
    """The early-exit frontier of the trained model at ``path`` (checked by :func:`model_paths`)
    on held-out sequences of its task, at ``max_loop_iters`` loops: the first half of each
    sequence prefilled, the rest fed back; the last step predicts the answer."""
    from mythos.experiments.common import load_model

    meta = json.loads(path.with_suffix(".json").read_text())
    m = load_model(str(path))
    seq, tag = _task_prompts(path, meta, m.cfg, TRAINED_BATCH[level])
    P = seq.shape[1] // 2
    return _frontier(m, seq[:, :P], seq[:, P:], seq.shape[1] - P, m.cfg.max_loop_iters,
                     LEVELS[level]["thresholds"], tag, answer=seq[:, -1])


def run_adaptive(level: str = "quick", out_dir: Optional[str] = None,
                 models: Optional[str] = None) -> list[dict]:
    """The suite's rows (printed as they come); the plot written where ``out_dir`` says
    (default ``bench/results/cpu``; none at the ``tiny`` level). ``models``: trained models to
    add (default ``$MYTHOS_BENCH_ADAPTIVE_MODELS``, see the module docstring), checked first."""
    paths = model_paths(models)
    L = LEVELS[level]
    m = _model(L["cfg"])
    g = torch.Generator().manual_seed(0)
    B, n_new, n_loops = L["B"], L["new"], L["n_loops"]
    ids = torch.randint(0, m.cfg.vocab_size, (B, L["prompt"]), generator=g)
    rows = _frontier(m, ids, None, n_new, n_loops, L["thresholds"], {"model": "mid"})
    t0 = time.perf_counter()
    plain = m.generate(ids, n_new, n_loops=n_loops, temperature=0)
    plain_s = time.perf_counter() - t0
    rows.append({"suite": "adaptive", "model": "mid", "mode": "plain_generate",
                 "tokens_per_s": B * n_new / plain_s, "B": B, "n_loops": n_loops})
    for d in L["drafts"]:
        for k in (2, 4):
            stats: dict = {}
            t0 = time.perf_counter()
            out = adaptive.generate(m, ids, n_new, n_loops=n_loops, temperature=0, draft_loops=d,
                                    draft_tokens=k, stats=stats)
            s = time.perf_counter() - t0
            rows.append({"suite": "adaptive", "model": "mid", "mode": "speculative",
                         "draft_loops": d, "draft_tokens": k, "tokens_per_s": B * n_new / s,
                         "acceptance": stats["accepted"] / max(stats["drafted"], 1),
                         "identical": bool(torch.equal(out, plain)), "B": B, "n_loops": n_loops})
            print(f"  speculative d={d} k={k}: {rows[-1]['tokens_per_s']:.1f} tok/s (plain "
                  f"{B * n_new / plain_s:.1f}), acceptance {rows[-1]['acceptance']:.2f}")
    for path in paths:
        rows += trained_rows(path, level)
    if level != "tiny":
        plot_adaptive(rows, Path(out_dir or "bench/results/cpu") / "adaptive.png")
    return rows


def plot_adaptive(rows: list[dict], path: Path) -> None:
    """Left: the mid config's tokens/s against top-1 agreement; right (with trained models):
    mean loops against the answer token's agreement with full depth. One marker per fill, one
    colour per criterion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r.get("model", "mid") != "mid"]
    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(12 if trained else 7, 4.5),
                             squeeze=False)
    ax = axes[0, 0]
    colours = {"act": "tab:blue", "kl": "tab:orange", "latent": "tab:green"}
    marks = {"recompute": "o", "latest": "s", "project": "^"}
    for r in rows:
        if r.get("model", "mid") != "mid":
            continue
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
    ax.set_title("mid config (random weights): speed", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if trained:
        ax = axes[0, 1]
        for r in trained:
            if r["mode"] == "early_exit":
                ax.scatter(r["mean_loops"], r["answer_agree"], c=colours[r["criterion"]],
                           marker=marks[r["fill"]], s=30)
            else:
                ax.scatter(r["mean_loops"], 1.0, c="black", marker="*", s=60)
        ax.set_xlabel("mean loops per decoded token")
        ax.set_ylabel("answer token agreement with full depth")
        names = sorted({Path(r["model"]).stem for r in trained})
        ax.set_title(f"trained ({', '.join(names)}): quality", fontsize=9)
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["LEVELS", "MODELS_ENV", "model_paths", "plot_adaptive", "run_adaptive", "trained_rows"]
