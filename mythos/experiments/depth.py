"""``depth``: train with L loops, run with 1..4L. Three regimes (fixed depth L; depth sampled
per step around L; sampled depth with ACT off), each evaluated at every loop count from 1 to 4L
and every hop count of ``eval_hops`` (inside and beyond the training range)."""

from __future__ import annotations

import os
from dataclasses import asdict

from .common import (
    Size,
    config_dict,
    evaluate,
    finish_figure,
    mean_std,
    model_config,
    n_params,
    pyplot,
    save_model,
    train_model,
    write_json,
)

# name -> (loop sampling, ACT)
REGIMES = {"fixed": ("fixed", True), "sampled": ("poisson-lognormal", True),
           "sampled-noact": ("poisson-lognormal", False)}


def run(out: str, size: Size, device: str = "auto", progress: bool = True) -> dict:
    """Train and evaluate every regime for every seed; writes ``out/results.json``,
    ``out/depth.png`` and ``out/models/<regime>-seed<k>.safetensors``."""
    L = size.train_loops
    cfg = model_config(size)
    task = size.task(size.eval_hops)
    loops = list(range(1, 4 * L + 1))
    in_range = [h for h in size.eval_hops if h in size.train_hops]
    res = {"experiment": "depth", "train_loops": L, "max_loop_iters": cfg.max_loop_iters,
           "n_loops": loops, "train_hops": list(size.train_hops), "eval_hops": list(size.eval_hops),
           "size": asdict(size), "config": config_dict(cfg), "regimes": {},
           "chance": 1.0 / size.nodes}
    for name, (sampling, act) in REGIMES.items():
        per_seed = []
        for seed in size.seeds:
            model, curves = train_model(cfg, size, seed, n_loops=L, loop_sampling=sampling, act=act,
                                        device=device, desc=f"{name} seed {seed}", progress=progress)
            grid = {h: [evaluate(model, task, n_loops=n, act=act, seed=1000 + seed, hops=h,
                                 batches=size.eval_batches, batch_size=size.eval_batch_size)
                        for n in loops] for h in size.eval_hops}
            acc = [sum(grid[h][i]["accuracy"] for h in in_range) / len(in_range) for i in range(len(loops))]
            loss = [sum(grid[h][i]["loss"] for h in in_range) / len(in_range) for i in range(len(loops))]
            halt = [sum(grid[h][i]["halt_depth"] for h in in_range) / len(in_range) for i in range(len(loops))]
            per_seed.append({"seed": seed, "accuracy": acc, "loss": loss, "halt_depth": halt,
                             "hop_accuracy": {str(h): [g["accuracy"] for g in grid[h]] for h in size.eval_hops},
                             "curves": curves})
            save_model(model, os.path.join(out, "models", f"{name}-seed{seed}.safetensors"),
                       {"config": config_dict(cfg), "regime": name, "seed": seed, "train_loops": L,
                        "act": act, "loop_sampling": sampling, "n_params": n_params(model)}, size)
        acc_m, acc_s = mean_std([s["accuracy"] for s in per_seed])
        loss_m, loss_s = mean_std([s["loss"] for s in per_seed])
        halt_m, _ = mean_std([s["halt_depth"] for s in per_seed])
        at_L = {str(h): mean_std([[s["hop_accuracy"][str(h)][L - 1]] for s in per_seed]) for h in size.eval_hops}
        res["regimes"][name] = {
            "n_loops": loops, "accuracy": acc_m, "accuracy_std": acc_s, "loss": loss_m, "loss_std": loss_s,
            "halt_depth": halt_m, "hops": list(size.eval_hops),
            "hop_accuracy_at_train_loops": [at_L[str(h)][0][0] for h in size.eval_hops],
            "hop_accuracy_at_train_loops_std": [at_L[str(h)][1][0] for h in size.eval_hops],
            "loop_sampling": sampling, "act": act, "seeds": list(size.seeds),
            "n_params": n_params(model), "per_seed": per_seed}
    write_json(os.path.join(out, "results.json"), res)
    plot(res, os.path.join(out, "depth.png"))
    return res


def plot(res: dict, path: str) -> str:
    """Accuracy against n_loops (training depth marked, mean and seed spread) and accuracy against
    hop count at the training depth, one line per regime."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in res["regimes"].items():
        m, s = r["accuracy"], r["accuracy_std"]
        a.plot(r["n_loops"], m, marker="o", ms=3, label=name)
        a.fill_between(r["n_loops"], [x - y for x, y in zip(m, s)], [x + y for x, y in zip(m, s)], alpha=0.2)
        b.errorbar(r["hops"], r["hop_accuracy_at_train_loops"], yerr=r["hop_accuracy_at_train_loops_std"],
                   marker="o", ms=3, capsize=2, label=name)
    a.axvline(res["train_loops"], color="k", ls="--", lw=1, label=f"trained at {res['train_loops']}")
    a.axvline(res["max_loop_iters"], color="gray", ls=":", lw=1, label="max_loop_iters (LoRA clamps after)")
    a.set(xlabel="n_loops at evaluation", ylabel="accuracy (training hop range)", title="accuracy vs depth")
    b.axvspan(min(res["train_hops"]) - 0.5, max(res["train_hops"]) + 0.5, color="k", alpha=0.07,
              label="trained hops")
    b.set(xlabel="hops", ylabel=f"accuracy at n_loops={res['train_loops']}", title="accuracy vs hop count")
    if res.get("chance"):
        for ax in (a, b):
            ax.axhline(res["chance"], color="r", ls=":", lw=1, label="chance")
    for ax in (a, b):
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    return finish_figure(fig, path, (a, b), (), None)


def summary(res: dict) -> str:
    """One line per regime: accuracy at 1, L, 2L and 4L loops."""
    L = res["train_loops"]
    lines = [f"accuracy (hops {res['train_hops']}) at n_loops 1 / {L} / {2 * L} / {4 * L}:"]
    for name, r in res["regimes"].items():
        a, s = r["accuracy"], r["accuracy_std"]
        lines.append(f"  {name:14s} " + " / ".join(f"{a[n - 1]:.3f}±{s[n - 1]:.3f}" for n in (1, L, 2 * L, 4 * L)))
    return "\n".join(lines)
