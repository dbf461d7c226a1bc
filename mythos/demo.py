"""Demo: build a small model, check the dispatched path against the reference path (and against
open-mythos 0.5.0 when installed), then generate, printing timings.

    python -m mythos.demo [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

import mythos_kernels as K

from . import MythosConfig, OpenMythos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cfg = MythosConfig(vocab_size=1000, dim=256, n_heads=4, max_seq_len=512, max_loop_iters=4,
                       prelude_layers=1, coda_layers=1, kv_lora_rank=64, q_lora_rank=128,
                       qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_experts=16,
                       n_experts_per_tok=2, expert_dim=64, n_shared_experts=1)
    torch.manual_seed(0)
    model = OpenMythos(cfg).to(dev).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device=dev)
    with torch.no_grad():
        K.reset_dispatch_counts()
        out = model(ids)
        served = sorted({f"{op}:{impl}" for op, impl in K.dispatch_counts()})
        t_auto = _time(lambda: model(ids), dev)
        with K.use_backend("reference"):
            ref = model(ids)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"device {dev}; backend {K.get_backend()}; forward [2, 64] in {t_auto * 1e3:.1f} ms "
          f"(median of 5 after the first call)")
    print(f"ops served: {', '.join(served)}")
    print(f"dispatched vs reference path: relative error {err:.2e}")
    try:
        from bench._openmythos import load_open_mythos

        om = load_open_mythos()[0]
    except Exception:  # bench is not importable, or open-mythos is missing
        om = None
    if om is not None:
        a = om.OpenMythos(om.MythosConfig(**cfg.__dict__)).to(dev).eval()
        a.load_state_dict(_to_om(model))
        with torch.no_grad():
            r = a(ids)
            t_om = _time(lambda: a(ids), dev)
        print(f"open-mythos 0.5.0: forward in {t_om * 1e3:.1f} ms; relative error vs mythos "
              f"{((out - r).norm() / r.norm()).item():.2e}")
    else:
        print("open-mythos 0.5.0 not installed: skipping the comparison")
    t0 = time.perf_counter()
    gen = model.generate(ids[:1, :16], max_new_tokens=32, n_loops=4, top_k=1)
    dt = time.perf_counter() - t0
    print(f"generate: 32 tokens in {dt:.2f} s ({32 / dt:.1f} tokens/s); tokens {gen[0, 16:24].tolist()}")
    return 0 if err < 1e-3 else 1


def _time(fn, dev: torch.device, reps: int = 5) -> float:
    """Median seconds of ``reps`` calls of ``fn`` (the caller has made one warm-up call)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[reps // 2]


def _to_om(model):
    from .checkpoint import to_open_mythos_state_dict

    return to_open_mythos_state_dict(model)


if __name__ == "__main__":
    raise SystemExit(main())
