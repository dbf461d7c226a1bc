"""``vs-dense``: the looped model against non-looped ones on the same task and token budget.

* ``looped``: prelude, one recurrent (MoE) block run L times (fixed depth, ACT on), coda.
* ``same-params``: the same architecture (the same parameter count, exactly) trained and run
  with one loop: every block distinct, no reuse.
* ``same-compute``: one loop, with the L - 1 extra block applications of the looped model
  turned into distinct dense prelude/coda blocks, so as many blocks run per token as in the
  looped model (more parameters).

Parameters are counted as ``sum(p.numel())``; compute is matched in blocks run per token (the
extra blocks are dense where the looped one is MoE: their FLOPs per token are reported too).
"""

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


def block_flops(cfg) -> dict:
    """Matmul multiply-adds per token of one dense block and one MoE block (attention
    projections + FFN; attention scores excluded, the same in both)."""
    d, hd = cfg.dim, cfg.dim // cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    dense_ffn = 3 * d * (d * 4 // 3)
    moe_ffn = 3 * d * cfg.expert_dim * (cfg.n_experts_per_tok + cfg.n_shared_experts) + d * cfg.n_experts
    return {"dense": attn + dense_ffn, "moe": attn + moe_ffn}


def variants(size: Size) -> dict:
    """name -> (config, training/evaluation loops, blocks run per token, matmul MACs per token)."""
    L = size.train_loops
    base = model_config(size)
    extra = L - 1
    wide = model_config(size, prelude_layers=1 + (extra + 1) // 2, coda_layers=1 + extra // 2)
    fl = block_flops(base)
    return {
        "looped": (base, L, 2 + L, 2 * fl["dense"] + L * fl["moe"]),
        "same-params": (base, 1, 3, 2 * fl["dense"] + fl["moe"]),
        "same-compute": (wide, 1, 2 + L, (2 + extra) * fl["dense"] + fl["moe"]),
    }


def run(out: str, size: Size, device: str = "auto", progress: bool = True) -> dict:
    """Writes ``out/results.json``, ``out/vs_dense.png`` and ``out/models/<variant>-seed<k>.*``."""
    res = {"experiment": "vs-dense", "train_loops": size.train_loops, "train_hops": list(size.train_hops),
           "eval_hops": list(size.eval_hops), "size": asdict(size),
           "tokens": size.steps * size.batch_size * size.seq_len, "models": {},
           "chance": 1.0 / size.nodes}
    for name, (cfg, loops, blocks, macs) in variants(size).items():
        task = size.task(size.eval_hops)
        per_seed = []
        for seed in size.seeds:
            model, curves = train_model(cfg, size, seed, n_loops=loops, device=device,
                                        desc=f"{name} seed {seed}", progress=progress)
            hop = [evaluate(model, task, n_loops=loops, act=True, seed=1000 + seed, hops=h,
                            batches=size.eval_batches, batch_size=size.eval_batch_size) for h in size.eval_hops]
            inr = [r for h, r in zip(size.eval_hops, hop) if h in size.train_hops]
            per_seed.append({"seed": seed, "accuracy": sum(r["accuracy"] for r in inr) / len(inr),
                             "loss": sum(r["loss"] for r in inr) / len(inr),
                             "hop_accuracy": [r["accuracy"] for r in hop], "curves": curves})
            params = n_params(model)
            save_model(model, os.path.join(out, "models", f"{name}-seed{seed}.safetensors"),
                       {"config": config_dict(cfg), "variant": name, "seed": seed, "n_loops": loops,
                        "n_params": params}, size)
        (acc,), (acc_s,) = mean_std([[s["accuracy"]] for s in per_seed])
        (loss,), (loss_s,) = mean_std([[s["loss"]] for s in per_seed])
        res["models"][name] = {
            "n_params": params, "n_loops": loops, "blocks_per_token": blocks, "matmul_macs_per_token": macs,
            "accuracy": acc, "accuracy_std": acc_s, "loss": loss, "loss_std": loss_s, "hops": list(size.eval_hops),
            "hop_accuracy": mean_std([s["hop_accuracy"] for s in per_seed])[0],
            "hop_accuracy_std": mean_std([s["hop_accuracy"] for s in per_seed])[1],
            "config": config_dict(cfg), "seeds": list(size.seeds), "per_seed": per_seed}
    write_json(os.path.join(out, "results.json"), res)
    plot(res, os.path.join(out, "vs_dense.png"))
    return res


def plot(res: dict, path: str) -> str:
    """Accuracy per model (bars, seed spread) and accuracy against hop count."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(res["models"])
    ms = [res["models"][n] for n in names]
    a.bar(range(len(names)), [m["accuracy"] for m in ms], yerr=[m["accuracy_std"] for m in ms], capsize=3,
          color=["C0", "C1", "C2"][:len(names)])
    a.set(xticks=range(len(names)), ylim=(0, 1.02), ylabel="accuracy (training hop range)",
          title=f"same task, {res['tokens']} training tokens",
          xticklabels=[f"{n}\n{m['n_params'] / 1e3:.0f}k params, {m['blocks_per_token']} blocks"
                       for n, m in zip(names, ms)])
    for n, m in zip(names, ms):
        b.errorbar(m["hops"], m["hop_accuracy"], yerr=m["hop_accuracy_std"], marker="o", ms=3, capsize=2, label=n)
    b.axvspan(min(res["train_hops"]) - 0.5, max(res["train_hops"]) + 0.5, color="k", alpha=0.07,
              label="trained hops")
    b.set(xlabel="hops", ylabel="accuracy", ylim=(0, 1.02), title="accuracy vs hop count")
    b.legend(fontsize=7)
    return finish_figure(fig, path, (a, b), (a, b), res.get("chance"))


def summary(res: dict) -> str:
    lines = ["model: params, blocks/token, accuracy"]
    for n, m in res["models"].items():
        lines.append(f"  {n:13s} {m['n_params']:>8d} {m['blocks_per_token']:>3d}  "
                     f"{m['accuracy']:.3f}±{m['accuracy_std']:.3f}")
    return "\n".join(lines)
