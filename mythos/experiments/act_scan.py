"""``act-scan``: one model per ACT threshold (depth sampled per step around L, ACT on, a small
ponder term so halting is learned), each evaluated with ACT at ``max_loop_iters`` loops: accuracy
and mean halting depth, overall and per hop count."""

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

THRESHOLDS = (0.8, 0.9, 0.95, 0.99, 0.999)
PONDER_WEIGHT = 0.01    # weight of the mean expected halting depth in the loss


def run(out: str, size: Size, device: str = "auto", progress: bool = True) -> dict:
    """Writes ``out/results.json``, ``out/act_scan.png`` and ``out/models/act<thr>-seed<k>.*``."""
    L = size.train_loops
    res = {"experiment": "act-scan", "train_loops": L, "thresholds": list(THRESHOLDS),
           "ponder_weight": PONDER_WEIGHT, "train_hops": list(size.train_hops),
           "eval_hops": list(size.eval_hops), "size": asdict(size), "runs": {},
           "chance": 1.0 / size.nodes}
    for thr in THRESHOLDS:
        cfg = model_config(size, act_threshold=thr)
        task = size.task(size.eval_hops)
        n_eval = cfg.max_loop_iters
        res["eval_loops"] = n_eval
        per_seed = []
        for seed in size.seeds:
            model, curves = train_model(cfg, size, seed, n_loops=L, loop_sampling="poisson-lognormal",
                                        act=True, ponder_weight=PONDER_WEIGHT, device=device,
                                        desc=f"act {thr} seed {seed}", progress=progress)
            hop = {h: evaluate(model, task, n_loops=n_eval, act=True, seed=1000 + seed, hops=h,
                               batches=size.eval_batches, batch_size=size.eval_batch_size)
                   for h in size.eval_hops}
            inr = [hop[h] for h in size.train_hops if h in hop]
            per_seed.append({"seed": seed, "accuracy": sum(r["accuracy"] for r in inr) / len(inr),
                             "halt_depth": sum(r["halt_depth"] for r in inr) / len(inr),
                             "hop_accuracy": [hop[h]["accuracy"] for h in size.eval_hops],
                             "hop_halt_depth": [hop[h]["halt_depth"] for h in size.eval_hops],
                             "curves": curves})
            save_model(model, os.path.join(out, "models", f"act{thr}-seed{seed}.safetensors"),
                       {"config": config_dict(cfg), "act_threshold": thr, "seed": seed, "train_loops": L,
                        "loop_sampling": "poisson-lognormal", "act": True, "ponder_weight": PONDER_WEIGHT,
                        "n_params": n_params(model)}, size)
        (acc,), (acc_s,) = mean_std([[s["accuracy"]] for s in per_seed])
        (dep,), (dep_s,) = mean_std([[s["halt_depth"]] for s in per_seed])
        res["runs"][str(thr)] = {
            "act_threshold": thr, "accuracy": acc, "accuracy_std": acc_s, "halt_depth": dep,
            "halt_depth_std": dep_s, "hops": list(size.eval_hops),
            "hop_accuracy": mean_std([s["hop_accuracy"] for s in per_seed])[0],
            "hop_halt_depth": mean_std([s["hop_halt_depth"] for s in per_seed])[0],
            "seeds": list(size.seeds), "per_seed": per_seed}
    res["accuracy"] = [res["runs"][str(t)]["accuracy"] for t in THRESHOLDS]
    res["halt_depth"] = [res["runs"][str(t)]["halt_depth"] for t in THRESHOLDS]
    write_json(os.path.join(out, "results.json"), res)
    plot(res, os.path.join(out, "act_scan.png"))
    return res


def plot(res: dict, path: str) -> str:
    """Accuracy and mean halting depth against the threshold; halting depth against hop count."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(res["thresholds"])))
    runs = [res["runs"][str(t)] for t in res["thresholds"]]
    a.errorbar(xs, [r["accuracy"] for r in runs], yerr=[r["accuracy_std"] for r in runs], marker="o",
               capsize=2, color="C0", label="accuracy")
    a.set(xticks=xs, xticklabels=[str(t) for t in res["thresholds"]], xlabel="act_threshold",
          ylabel="accuracy (training hop range)", ylim=(0, 1.02), title="ACT threshold scan")
    a2 = a.twinx()
    a2.errorbar(xs, [r["halt_depth"] for r in runs], yerr=[r["halt_depth_std"] for r in runs], marker="s",
                capsize=2, color="C1", label="mean halting depth")
    a2.set_ylabel("mean halting depth (loops)")
    a.legend(loc="lower left", fontsize=7)
    a2.legend(loc="lower right", fontsize=7)
    for t, r in zip(res["thresholds"], runs):
        b.plot(r["hops"], r["hop_halt_depth"], marker="o", ms=3, label=f"threshold {t}")
    b.set(xlabel="hops", ylabel="mean halting depth", title=f"halting depth vs hops (up to {res['eval_loops']} loops)")
    b.legend(fontsize=7)
    return finish_figure(fig, path, (a, b), (a,), res.get("chance"))


def summary(res: dict) -> str:
    lines = ["act_threshold: accuracy, mean halting depth"]
    for t in res["thresholds"]:
        r = res["runs"][str(t)]
        lines.append(f"  {t:<6} {r['accuracy']:.3f}±{r['accuracy_std']:.3f}  depth {r['halt_depth']:.2f}")
    return "\n".join(lines)
