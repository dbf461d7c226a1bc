"""Training under ``torch.autocast("cuda", torch.bfloat16)`` on a GPU: does it run, is it right,
and what does it cost against bf16 weights?

Under CUDA autocast (on the CPU: CPU autocast, with the kernels through the interpreter) the
weights stay fp32 and autocast's own ops (linear, matmul, SDPA) run in bf16; mythos's fused ops
take one dtype (the routed experts' GEMMs autocast's, since c5f9881). This tool measures what
that means for a training step (forward + backward of a cross-entropy loss) of one model, case by
case:

* ``fp32 reference``   -- fp32, no autocast, ``MYTHOS_BACKEND=reference``: the truth for errors;
* ``fp32 triton``      -- fp32, no autocast, kernels;
* ``autocast reference`` / ``autocast triton`` -- fp32 weights under bf16 autocast;
* ``bf16 weights triton`` -- the same weights cast to bf16, no autocast (the kernels' bf16 speed);
* ``open-mythos autocast`` -- open-mythos 0.5.0 with the same weights under bf16 autocast
  (when installed), whose error against the truth is the yardstick for mythos's.

Per case: the loss, the relative error of the logits and of every gradient against the truth (the
largest over parameters, and the gradient-norm-weighted total), the dtype of the hidden state
entering the recurrent block, which implementation served each op (the dispatch record), and the
median step time over interleaved repetitions. One JSON row per case appended to
``bench/results/<device>/autocast_check.jsonl``; exit status 1 when an autocast case fails to run,
gives a non-finite loss, or errs more than 3x open-mythos's own autocast error (or, without
open-mythos, more than the bf16-weights case).

    python tools/gpu_autocast_check.py [--config 1b|mid] [--B 2] [--T 512] [--loops 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mythos  # noqa: E402
import mythos_kernels as K  # noqa: E402
from bench._openmythos import load_open_mythos  # noqa: E402
from bench.devinfo import default_device, device_slug, run_info  # noqa: E402
from bench.harness import append_jsonl  # noqa: E402
from bench.model import CONFIGS, CPU_CONFIGS, _sync  # noqa: E402


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None, help="1b (GPU default), mid (CPU default) or a "
                    "bench.model.CPU_CONFIGS name")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--loops", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-open-mythos", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = default_device()
    cfg_name = args.config or ("1b" if dev.type == "cuda" else "mid")
    kw = dict(CONFIGS.get(cfg_name) or CPU_CONFIGS[cfg_name])
    out_path = args.out or os.path.join(ROOT, "bench", "results", device_slug(dev),
                                        "autocast_check.jsonl")

    torch.manual_seed(0)
    with torch.device(dev):
        model = mythos.OpenMythos(mythos.MythosConfig(**kw)).train()
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    om_model = None
    om = None if args.no_open_mythos else load_open_mythos()[0]
    if om is not None:
        with torch.device(dev):
            om_model = om.OpenMythos(om.MythosConfig(**kw)).train()
        om_model.load_state_dict(mythos.to_open_mythos_state_dict(model))
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, kw["vocab_size"], (args.B, args.T), generator=gen).to(dev)
    tgt = torch.randint(0, kw["vocab_size"], (args.B, args.T), generator=gen).to(dev)

    seen_dtype: dict[str, torch.dtype] = {}

    def hook(_mod, inputs):
        seen_dtype["h"] = inputs[0].dtype

    handles = [m.recurrent.register_forward_pre_hook(hook) for m in (model, model_bf16)]

    def step(m, backend: str | None, autocast: bool):
        m.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev.type, torch.bfloat16) if autocast else torch.autocast(
            dev.type, enabled=False)
        bctx = K.use_backend(backend) if backend else contextlib.nullcontext()
        with bctx, ctx:
            logits = m(ids, n_loops=args.loops)
            loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        return loss.detach(), logits.detach()

    cases = {
        "fp32 reference": (model, "reference", False),
        "fp32 triton": (model, "triton", False),
        "autocast reference": (model, "reference", True),
        "autocast triton": (model, "triton", True),
        "bf16 weights triton": (model_bf16, "triton", False),
    }
    if om_model is not None:
        cases["open-mythos autocast"] = (om_model, None, True)

    results: dict[str, dict] = {}
    truth_grads = None
    truth_logits = None
    for name, (m, backend, ac) in cases.items():
        row = dict(run_info(dev), bench="autocast_check", case=name, config=cfg_name, B=args.B,
                   T=args.T, n_loops=args.loops)
        K.reset_dispatch_counts()
        seen_dtype.clear()
        try:
            loss, logits = step(m, backend, ac)
            _sync(dev)
        except Exception as exc:  # noqa: BLE001 - recorded as the case's result
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            results[name] = row
            print(f"{name:24s} FAILED {row['error']}", flush=True)
            continue
        counts = {f"{op}:{impl}": n for (op, impl), n in sorted(K.dispatch_counts().items())}
        grads = _grads(m, name)
        if name == "fp32 reference":
            truth_grads, truth_logits = grads, logits.float()
        row.update(ok=bool(torch.isfinite(loss)), loss=float(loss), dispatch=counts,
                   hidden_dtype=str(seen_dtype.get("h")))
        if truth_grads is not None:
            errs = {n: _rel(truth_grads[n], g) for n, g in grads.items() if n in truth_grads}
            num = sum(((grads[n].double() - truth_grads[n].double()).norm() ** 2).item()
                      for n in errs)
            den = sum((truth_grads[n].double().norm() ** 2).item() for n in errs)
            worst = max(errs, key=errs.get) if errs else None
            row.update(logits_rel_err=_rel(truth_logits, logits.float()),
                       grad_rel_err_total=(num / max(den, 1e-300)) ** 0.5,
                       grad_rel_err_max=errs.get(worst), grad_worst_param=worst,
                       n_grads_compared=len(errs), n_grads=len(grads))
        results[name] = row
        del grads
    for h in handles:
        h.remove()

    # interleaved timing of the cases that ran
    ok = [n for n, r in results.items() if r.get("ok")]
    times = {n: [] for n in ok}
    for _ in range(args.reps):
        for n in ok:
            m, backend, ac = cases[n]
            _sync(dev)
            t0 = time.perf_counter()
            step(m, backend, ac)
            _sync(dev)
            times[n].append(time.perf_counter() - t0)
    for n in ok:
        results[n]["step_ms_median"] = 1e3 * statistics.median(times[n])
        results[n]["step_ms_all"] = [round(1e3 * t, 3) for t in times[n]]
        if dev.type == "cuda":
            results[n]["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30

    append_jsonl(out_path, list(results.values()))
    print(f"{'case':24s} {'ok':>3s} {'loss':>9s} {'logits err':>10s} {'grad err':>9s} "
          f"{'worst':>9s} {'h dtype':>15s} {'step ms':>9s}")
    for n, r in results.items():
        print(f"{n:24s} {r.get('ok')!s:>3s} {r.get('loss', float('nan')):9.4f} "
              f"{r.get('logits_rel_err', float('nan')):10.2e} "
              f"{r.get('grad_rel_err_total', float('nan')):9.2e} "
              f"{r.get('grad_rel_err_max', float('nan')):9.2e} {r.get('hidden_dtype', '-'):>15s} "
              f"{r.get('step_ms_median', float('nan')):9.1f}")
        if "dispatch" in r:
            print("    ", r["dispatch"])
    print(f"rows appended to {out_path}")

    status = 0
    yard_case = "open-mythos autocast" if "open-mythos autocast" in results else \
        "bf16 weights triton"
    yard = results.get(yard_case, {})
    for n in ("autocast reference", "autocast triton"):
        r = results[n]
        if not r.get("ok"):
            print(f"FAIL: {n} did not run or gave a non-finite loss", file=sys.stderr)
            status = 1
            continue
        for key in ("logits_rel_err", "grad_rel_err_total"):
            if yard.get(key) is not None and r[key] > 3 * yard[key]:
                print(f"FAIL: {n} {key} {r[key]:.2e} > 3x {yard_case}'s {yard[key]:.2e}",
                      file=sys.stderr)
                status = 1
    return status


def _grads(m, case: str) -> dict[str, torch.Tensor]:
    """Gradients by mythos's parameter names, fp32 copies (open-mythos's per-expert weights
    stacked first; an expert no token reached has no gradient there: zeros, as mythos's stacked
    weights get)."""
    if case.startswith("open-mythos"):
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
                 for n, p in m.named_parameters()}
        grads = mythos.from_open_mythos_state_dict(grads)
    else:
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    return {n: g.detach().float().clone() for n, g in grads.items()}


if __name__ == "__main__":
    raise SystemExit(main())
