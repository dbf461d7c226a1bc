"""The ``train`` suite: one optimizer step of mythos against open-mythos 0.5.0, side by side.

* ``step``   -- forward (``n_loops`` = 8, every loop runs: ``act_threshold`` = 100 in both
                models), the loss, backward, ``AdamW.step``; the variants run interleaved in one
                process, same weights (open-mythos's state dict loaded into mythos through
                :mod:`mythos.checkpoint`'s load hooks), the same AdamW (torch's fused kernel).
                Rows: seconds per step split into fwd / bwd / optim, tokens/s, the model
                FLOPs utilization against the measured matmul peak of the device (on a CPU at
                the run's thread count; :mod:`bench.ceilings`). Variants: ``open-mythos``
                (its logits + ``F.cross_entropy``), ``mythos`` (the training forward
                ``mythos.train.train_forward``, then the full logits + ``F.cross_entropy``)
                and ``mythos+fused-ce`` (the same forward, then ``mythos.train.lm_loss`` on its
                output: final norm -> ``mythos_kernels.linear_cross_entropy``, the logits never
                whole, the tied weight's two gradients in one buffer); the two mythos
                variants step one model, each with its own AdamW.
* ``memory`` -- the peak memory of one step (forward, loss, backward, AdamW) above the built
                model, each variant in a fresh child process: CPU ``ru_maxrss`` at the end minus
                the child's RSS after building the model and optimizer (torch's CPU allocations
                are invisible to tracemalloc; glibc's mmap threshold fixed at
                :data:`MMAP_THRESHOLD` so that the RSS follows the live tensors); CUDA
                ``max_memory_allocated`` minus the memory allocated before the step. The
                step's own grads and AdamW state (3 x the parameters' bytes, the same for every
                variant) are reported apart (``grads_adam_bytes``) and taken off in
                ``activation_peak_bytes``.

Activation checkpointing: :data:`CHECKPOINTING` names the training forward ``"module:function"``
the mythos variants run, called as ``fn(model, ids, n_loops, act=True, checkpoint=...)`` and
returning an object with the coda output ``.h``; the ``+ckpt`` memory rows pass
``checkpoint=True`` (each recurrent iteration recomputed in backward). While it is None the
mythos variants run ``model.hidden_states`` and the ``+ckpt`` rows are reported as skipped.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import ceilings as _ceil
from .devinfo import REPO, run_info
from .model import CONFIGS, build_models, precision_ctx

# the training forward of the mythos variants: fn(model, ids, n_loops, act=, checkpoint=) -> .h
CHECKPOINTING: str | None = "mythos.train.recurrence:train_forward"

VARIANTS = ("open-mythos", "mythos", "mythos+fused-ce")
# glibc's mmap threshold in the CPU memory children: fixed, so that freed activations are
# unmapped (with the default dynamic threshold freed blocks stay in the heap and ru_maxrss
# counts them as if still live)
MMAP_THRESHOLD = 128 * 1024
PLANS: dict[tuple[str, str], dict[str, Any]] = {
    ("tiny", "cpu"): dict(config="mid", dtype=torch.float32, B=1, T=16, n_loops=2, reps=1,
                          mem=None),
    ("quick", "cpu"): dict(config="mid", dtype=torch.float32, B=2, T=128, n_loops=8, reps=3,
                           mem=dict(B=4, T=256, n_loops=16)),
    ("full", "cpu"): dict(config="mid", dtype=torch.float32, B=2, T=128, n_loops=8, reps=5,
                          mem=dict(B=4, T=256, n_loops=16)),
    # mythos_1b dims, 16k tokens per step
    ("quick", "cuda"): dict(config="1b", dtype=torch.bfloat16, B=8, T=2048, n_loops=8, reps=3,
                            mem=dict(B=4, T=2048, n_loops=16)),
    ("full", "cuda"): dict(config="1b", dtype=torch.bfloat16, B=8, T=2048, n_loops=8, reps=5,
                           mem=dict(B=4, T=2048, n_loops=16)),
}
PLANS[("tiny", "cuda")] = PLANS[("tiny", "cpu")]


# --------------------------------------------------------------------------- one step


def _train_forward() -> Callable[..., Any] | None:
    """The function :data:`CHECKPOINTING` names, or None."""
    if CHECKPOINTING is None:
        return None
    mod, fn = CHECKPOINTING.split(":")
    return getattr(importlib.import_module(mod), fn)


def _loss_fn(variant: str, model, ids: torch.Tensor, targets: torch.Tensor, n_loops: int,
             checkpoint: bool = False) -> torch.Tensor:
    """The training loss of one variant (next-token targets, -100 ignored)."""
    if variant == "open-mythos":
        logits = model(ids, n_loops=n_loops)                                 # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    fwd = _train_forward()
    if fwd is None:
        if checkpoint:
            raise ValueError("checkpoint=True needs bench.train.CHECKPOINTING set")
        out = h = model.hidden_states(ids, n_loops, None, 0)                       # [B, T, D]
    else:
        out = fwd(model, ids, n_loops, act=True, checkpoint=checkpoint)
        h = out.h                                                            # [B, T, D]
    if variant == "mythos+fused-ce":
        from mythos.train import lm_loss

        return lm_loss(model, out, targets, fused=True)   # the ForwardOut: its tied-weight sink
    logits = model.logits(h)                                                # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(variant: str, model, opt, ids, targets, n_loops, dtype, device,
              checkpoint: bool = False) -> Callable[[], dict[str, float]]:
    """A callable running one optimizer step, returning its phases' seconds."""
    impl = "open-mythos" if variant == "open-mythos" else "mythos"

    def step() -> dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        with precision_ctx(impl, dtype, device):
            loss = _loss_fn(variant, model, ids, targets, n_loops, checkpoint)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        return {"fwd": t1 - t0, "bwd": t2 - t1, "optim": t3 - t2, "step": t3 - t0,
                "loss": float(loss.detach())}

    return step


def _batch(vocab: int, B: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, vocab, (B, T + 1), generator=g)
    return seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)


def _adamw(model) -> torch.optim.Optimizer:
    """The optimizer of every variant: AdamW with torch's fused kernel (CPU and CUDA), as
    :func:`mythos.train.make_optimizer` builds it."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def _trainable(models: dict) -> None:
    for m in models.values():
        m.train()
        for p in m.parameters():
            p.requires_grad_(True)


def step_flops(cfg: dict, B: int, T: int, n_loops: int) -> float:
    """Model FLOPs of one step: 6 x the active parameters' products per token (forward 2,
    backward 4), each block counted once per application (prelude + n_loops + coda), plus the
    causal attention scores and values (6 * T/2 * H * (d_qk + d_v) per token and layer)."""
    D, V = cfg["dim"], cfg["vocab_size"]
    H = cfg["n_heads"]
    Fh, k, ns = cfg["expert_dim"], cfg["n_experts_per_tok"], cfg.get("n_shared_experts", 0)
    if cfg.get("attn_type", "mla") == "mla":
        r, qr = cfg["kv_lora_rank"], cfg["q_lora_rank"]
        dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        attn = D * qr + qr * H * (dn + dr) + D * (r + dr) + r * H * (dn + dv) + H * dv * D
        attn_qk, attn_v = H * (dn + dr), H * dv
    else:
        hd = D // H
        kv = cfg.get("n_kv_heads", H)
        attn = D * H * hd * 2 + 2 * D * kv * hd
        attn_qk = attn_v = H * hd
    moe = 3 * D * Fh * (k + ns * k)          # routed top-k + shared (hidden k*F each)
    layers = cfg.get("prelude_layers", 1) + cfg.get("coda_layers", 1) + n_loops
    per_token = layers * (attn + moe) + D * V                                  # + tied head
    attn_scores = layers * (T / 2) * (attn_qk + attn_v)                      # causal half
    return 6.0 * B * T * (per_token + attn_scores)


def run_step_suite(plan: dict, device: torch.device, variants=VARIANTS) -> list[dict]:
    """Time the variants interleaved; one row per variant."""
    cfg = CONFIGS[plan["config"]]
    dtype, B, T, n_loops = plan["dtype"], plan["B"], plan["T"], plan["n_loops"]
    models, notes = build_models(cfg, device, dtype)
    _trainable(models)
    ids, targets = _batch(cfg["vocab_size"], B, T, device)
    steps: dict[str, Callable[[], dict[str, float]]] = {}
    for v in variants:
        impl = "open-mythos" if v == "open-mythos" else "mythos"
        if impl not in models:
            continue
        model = models[impl]
        opt = _adamw(model)
        steps[v] = make_step(v, model, opt, ids, targets, n_loops, dtype, device)
    failed: dict[str, str] = {}
    for v, fn in list(steps.items()):  # warm-up: one step each (allocates grads and AdamW state)
        try:
            fn()
        except Exception as exc:       # an OOM of one variant must not lose the others
            failed[v] = ("OOM" if "out of memory" in str(exc).lower()
                         else f"{type(exc).__name__}: {exc}")[:300]
            del steps[v]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times: dict[str, list[dict[str, float]]] = {v: [] for v in steps}
    names = list(steps)
    for i in range(plan["reps"]):
        for v in (names[::-1] if i % 2 else names):
            times[v].append(steps[v]())
    flops = step_flops(cfg, B, T, n_loops)
    # the measured matmul rate of this device (on a CPU at this thread count; bf16 there takes
    # fp32's rate, bench.ceilings)
    peak = _ceil.matmul_rate(_ceil.get_ceilings(device), dtype) * 1e12
    info = run_info(device)
    rows = []
    for v, ts in times.items():
        med = {k: float(torch.tensor([t[k] for t in ts]).median()) for k in ("fwd", "bwd",
                                                                             "optim", "step")}
        rows.append({"kind": "model", "op": "model_train", "suite": "train", "provider": v,
                     "impl": v, "config": plan["config"], "dtype": str(dtype).replace("torch.", ""),
                     "n_loops": n_loops, "batch": B, "context": T, "shape": {"B": B, "T": T},
                     "status": "ok", "median_ms": med["step"] * 1e3,
                     "fwd_s": med["fwd"], "bwd_s": med["bwd"], "optim_s": med["optim"],
                     "step_s": med["step"], "reps": len(ts), "tokens_per_s": B * T / med["step"],
                     "model_flops": flops,
                     "mfu_pct": 100.0 * flops / med["step"] / peak,
                     "loss": ts[-1]["loss"], "impl_source": notes.get(
                         "open-mythos" if v == "open-mythos" else "mythos"), **info})
    base = next((r for r in rows if r["impl"] == "open-mythos"), None)
    for r in rows:
        r["speedup_vs_open_mythos"] = base["step_s"] / r["step_s"] if base else None
    for v, why in failed.items():
        rows.append({"kind": "model", "op": "model_train", "suite": "train", "provider": v,
                     "impl": v, "config": plan["config"], "batch": B, "context": T,
                     "shape": {"B": B, "T": T}, "n_loops": n_loops, "status": "error",
                     "reason": why, **info})
    return rows


# --------------------------------------------------------------------------- peak memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs`` 5), so
    the peak read after a step is the step's, not the model build's; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """``VmHWM`` (peak RSS since the last :func:`_reset_peak_rss`) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def child_peak(spec: dict) -> dict:
    """In a fresh process: build one variant, then one step; peak bytes above the built model."""
    global CHECKPOINTING
    CHECKPOINTING = spec.get("train_forward", CHECKPOINTING)
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    cfg = CONFIGS[spec["config"]]
    variant = spec["variant"]
    impl = "open-mythos" if variant == "open-mythos" else "mythos"
    models, _ = build_models(cfg, device, dtype, impls=(impl,))
    model = models[impl]
    _trainable(models)
    opt = _adamw(model)
    ids, targets = _batch(cfg["vocab_size"], spec["B"], spec["T"], device)
    step = make_step(variant, model, opt, ids, targets, spec["n_loops"], dtype, device,
                     checkpoint=bool(spec.get("checkpointing")))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        res = step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        reset = _reset_peak_rss()            # else ru_maxrss may be the build's transient peak
        base = _rss_bytes()
        res = step()
        top = _peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = top - base
    return {"peak_bytes": int(peak), "param_bytes": int(param_bytes), "step_s": res["step"]}


def measure_peak(variant: str, plan: dict, mem: dict, device: torch.device,
                 checkpointing: bool = False, timeout_s: float = 1800) -> dict:
    """Run :func:`child_peak` in a fresh Python process and parse its JSON line."""
    spec = dict(variant=variant, device=device.type, dtype=str(plan["dtype"]).split(".")[-1],
                config=plan["config"], checkpointing=checkpointing, train_forward=CHECKPOINTING,
                **mem)
    code = ("import json, sys; from bench.train import child_peak; "
            "print('PEAK ' + json.dumps(child_peak(json.loads(sys.argv[1]))))")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    if device.type == "cpu":   # every block over 128 KiB mmapped: freed tensors leave the RSS
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK "):
            return json.loads(line[5:])
    raise RuntimeError(f"memory child failed (rc {proc.returncode}): {proc.stderr[-400:]}")


def run_memory_suite(plan: dict, device: torch.device, variants=VARIANTS,
                     checkpointing: tuple[bool, ...] = (False, True)) -> list[dict]:
    """Peak memory rows: each variant, with and without checkpointing."""
    mem = plan["mem"]
    info = run_info(device)
    rows = []
    for variant in variants:
        for ckpt in checkpointing:
            name = variant + ("+ckpt" if ckpt else "")
            row = {"kind": "model", "op": "model_train_memory", "suite": "train_memory",
                   "provider": name, "impl": name, "config": plan["config"],
                   "dtype": str(plan["dtype"]).replace("torch.", ""), "n_loops": mem["n_loops"],
                   "batch": mem["B"], "context": mem["T"],
                   "shape": {"B": mem["B"], "T": mem["T"]},
                   "method": "cuda max_memory_allocated" if device.type == "cuda"
                   else "child VmHWM of the step (reset after the build) - rss after build "
                   f"(MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD})", **info}
            if ckpt and (variant == "open-mythos" or CHECKPOINTING is None):
                why = ("open-mythos has no activation checkpointing" if variant == "open-mythos"
                       else "no checkpointing hook wired (bench.train.CHECKPOINTING)")
                rows.append({**row, "status": "skipped", "reason": why})
                continue
            try:
                res = measure_peak(variant, plan, mem, device, ckpt)
                act = res["peak_bytes"] - 3 * res["param_bytes"]
                row.update(status="ok", peak_bytes=res["peak_bytes"],
                           grads_adam_bytes=3 * res["param_bytes"], activation_peak_bytes=act,
                           param_bytes=res["param_bytes"], step_s=res["step_s"])
            except Exception as exc:
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
    base = next((r for r in rows if r["impl"] == "open-mythos" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["peak_vs_open_mythos"] = r["peak_bytes"] / base["peak_bytes"]
            r["activation_peak_vs_open_mythos"] = (r["activation_peak_bytes"]
                                                   / base["activation_peak_bytes"])
    return rows


# --------------------------------------------------------------------------- driver


def _append(out_path: Path | str | None, rows: list[dict]) -> None:
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a") as f:
            for r in rows:
                if r["status"] in ("ok", "error"):
                    f.write(json.dumps(r, default=str) + "\n")


def run_train_suite(level: str = "quick", device: torch.device | str = "cpu",
                    out_path: Path | str | None = None, echo: bool = True,
                    memory: bool = True, plan: dict | None = None) -> list[dict]:
    """The step timings and (at quick / full level) the memory rows; appended to ``out_path``."""
    device = torch.device(device)
    plan = plan or PLANS[(level, "cuda" if device.type == "cuda" else "cpu")]
    if echo:
        print(f"\n== train ({plan['config']} config, {str(plan['dtype']).replace('torch.', '')}, "
              f"B={plan['B']}, T={plan['T']}, n_loops={plan['n_loops']}, every loop runs, "
              f"{plan['reps']} interleaved reps)")
    rows = run_step_suite(plan, device)
    _append(out_path, rows)         # written at once: the memory children take much longer
    if echo:
        for r in rows:
            if r["status"] != "ok":
                print(f"  {r['impl']:17s} {r['status']}: {r.get('reason')}")
                continue
            mfu = f"  MFU {r['mfu_pct']:.1f}%" if r.get("mfu_pct") is not None else ""
            sp = r.get("speedup_vs_open_mythos")
            vs = f"  {sp:.2f}x vs open-mythos" if sp else ""
            print(f"  {r['impl']:17s} step {r['step_s']:.3f}s (fwd {r['fwd_s']:.3f}, bwd "
                  f"{r['bwd_s']:.3f}, optim {r['optim_s']:.3f})  {r['tokens_per_s']:.0f} tok/s"
                  f"{mfu}{vs}")
    if memory and plan.get("mem"):
        mrows = run_memory_suite(plan, device)
        _append(out_path, mrows)
        rows += mrows
        if echo:
            m = plan["mem"]
            print(f"  peak memory of one step, B={m['B']}, T={m['T']}, n_loops={m['n_loops']}:")
            for r in mrows:
                if r["status"] == "ok":
                    print(f"  {r['impl']:22s} peak {r['peak_bytes'] / 1e9:.2f} GB above the model"
                          f" (activations ~{r['activation_peak_bytes'] / 1e9:.2f} GB, "
                          f"{r.get('activation_peak_vs_open_mythos', float('nan')):.2f}x "
                          "open-mythos's)")
                else:
                    print(f"  {r['impl']:22s} {r['status']}: {r.get('reason', '')}")
    return rows

