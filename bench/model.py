"""Model-level suites: mythos vs open-mythos 0.5.0, same weights, over batch size and context.

* ``prefill``  -- ``model(ids [B, T], n_loops)`` (full logits, as the API returns);
                  tokens/s = B*T/t.
* ``decode``   -- fill a KV cache with a ``context``-token prompt, then time single-token steps
                  ``model(tok [B, 1], n_loops, kv_cache, start_pos)`` (greedy); tokens/s = B/t_step.
                  Rows over several contexts show how the step cost grows with the cache.
* ``generate`` -- ``model.generate(prompt, max_new_tokens, n_loops)`` end to end (prefill + sampled
                  decode); tokens/s = B*new/t.
* ``generate_compiled`` -- mythos only, ``generate(..., compiled=True)`` (the decode step
                  through torch.compile; the warm-up call compiles, outside the timing), its
                  speedup against open-mythos's ``generate`` row of the same shape. ``full``
                  plans only (compiling takes tens of seconds).

Both models are built from one config, open-mythos's weights are loaded into mythos
(``load_state_dict``). ``act_threshold`` is set so high that every loop runs in both models (no ACT
early exit), so both do the same work. Precision for a bf16 run (``precision`` in each row):
mythos casts its floating-point weights to bf16 (complex RoPE tables are left alone:
``Module.to(bfloat16)`` would drop their imaginary part); open-mythos cannot run with bf16 weights
(its fp32 causal mask and fp32 ACT weights promote activations to fp32, and the next bf16 matmul
raises), so it keeps fp32 weights under ``torch.autocast(bf16)``.

Filling the cache: mythos prefills in chunks (its attention masks chunks against the cache
correctly); open-mythos prefills in one call, and where that runs out of memory (B=32 at long
context on a GPU) it prefills row 0 and copies its cache to every row (``cache_fill`` says so).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._openmythos import load_open_mythos
from .devinfo import run_info
from .harness import Progress

N_LOOPS = 8

# The CPU comparison config (dim 512, 64 experts top-4, MLA), every loop runs.
MID = dict(vocab_size=32000, dim=512, n_heads=8, attn_type="mla", kv_lora_rank=128,
           q_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64,
           n_experts=64, n_experts_per_tok=4, expert_dim=128, n_shared_experts=2,
           prelude_layers=1, coda_layers=1, max_loop_iters=8, act_threshold=100.0,
           max_seq_len=1024)
# other CPU configurations (the ``compare`` suite's tiny level uses tiny-gqa)
CPU_CONFIGS = {
    "tiny-gqa": dict(vocab_size=300, dim=64, n_heads=4, n_kv_heads=2, attn_type="gqa",
                     n_experts=8, n_experts_per_tok=2, expert_dim=32, n_shared_experts=1,
                     max_loop_iters=4, max_seq_len=256),
    "small-mla": dict(vocab_size=1000, dim=256, n_heads=4, max_seq_len=512, max_loop_iters=4,
                      kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32,
                      v_head_dim=32, n_experts=16, n_experts_per_tok=2, expert_dim=64,
                      n_shared_experts=1),
    "mid-gqa": dict(MID, attn_type="gqa", n_kv_heads=2),
    "mid-8-experts": dict(MID, n_experts=8, n_experts_per_tok=2, expert_dim=512,
                          n_shared_experts=1),
    "wide-768": dict(MID, dim=768, n_heads=12, vocab_size=8000, n_experts=16, expert_dim=256),
}
# open-mythos's mythos_1b dims (D = F = 2048, 64 experts top-4) for GPU runs, every loop runs.
GPU_1B = dict(vocab_size=32000, dim=2048, n_heads=16, n_kv_heads=4, attn_type="mla",
              kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=32, qk_nope_head_dim=64,
              v_head_dim=64, n_experts=64, n_shared_experts=2, n_experts_per_tok=4,
              expert_dim=2048, prelude_layers=2, coda_layers=2, max_loop_iters=16,
              act_threshold=100.0, lora_rank=8, rope_theta=500000.0, max_seq_len=8192 + 64)
CONFIGS = {"mid": MID, "1b": GPU_1B}

# suite plans per (level, device type):
#   prefill (B, T); decode (B, context); generate (B, prompt, new)
PLANS: dict[tuple[str, str], dict[str, Any]] = {
    ("quick", "cpu"): dict(config="mid", dtype=torch.float32, prefill=[(2, 256)],
                           decode=[(1, 64), (1, 256), (4, 64)], generate=[(1, 64, 32)],
                           decode_steps=8, warm_steps=2, reps=2, warmup=1),
    ("full", "cpu"): dict(config="mid", dtype=torch.float32,
                          prefill=[(1, 256), (2, 256), (2, 512)],
                          decode=[(1, 64), (1, 256), (1, 512), (4, 64), (4, 256)],
                          generate=[(1, 64, 32), (4, 64, 32)], generate_compiled=[(1, 64, 32)],
                          decode_steps=8, warm_steps=2, reps=3, warmup=1),
    ("quick", "cuda"): dict(config="1b", dtype=torch.bfloat16, prefill=[(1, 512), (8, 512)],
                            decode=[(1, 512), (32, 512), (1, 2048), (32, 2048)],
                            generate=[(1, 64, 32)], decode_steps=16, warm_steps=3, reps=3,
                            warmup=1),
    ("full", "cuda"): dict(config="1b", dtype=torch.bfloat16,
                           prefill=[(b, t) for b in (1, 8) for t in (512, 2048, 8192)],
                           decode=[(b, c) for b in (1, 32) for c in (512, 1024, 2048, 4096, 8192)],
                           generate=[(1, 64, 32), (32, 64, 32)],
                           generate_compiled=[(1, 64, 32), (32, 64, 32)],
                           decode_steps=16, warm_steps=3, reps=3, warmup=1),
}
PLANS[("tiny", "cpu")] = dict(config="mid", dtype=torch.float32, prefill=[(1, 16)],
                              decode=[(1, 16)], generate=[(1, 8, 4)], decode_steps=2,
                              warm_steps=1, reps=1, warmup=0)
PLANS[("tiny", "cuda")] = PLANS[("tiny", "cpu")]

IMPLS = ("open-mythos", "mythos")
SUITES = ("prefill", "decode", "generate", "generate_compiled")
# how each implementation runs a low-precision dtype (see the module docstring)
LOW_PRECISION = {"open-mythos": "autocast", "mythos": "weights"}


# --------------------------------------------------------------------------- building


def load_mythos():
    """``(module, reason)``: the ``mythos`` package or None and why it could not be imported."""
    try:
        import mythos

        return mythos, "mythos"
    except Exception as exc:
        return None, f"mythos not importable ({type(exc).__name__}: {exc})"


def cast_floating_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating-point parameters and buffers to ``dtype``; leave complex and int alone."""
    for mod in model.modules():
        for p in list(mod._parameters.values()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)
    return model


def precision(impl: str, dtype: torch.dtype) -> str:
    """``"fp32"``, ``"<dtype> weights"`` or ``"fp32 weights + <dtype> autocast"``."""
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float32:
        return "float32"
    if LOW_PRECISION.get(impl) == "autocast":
        return f"float32 weights + {name} autocast"
    return f"{name} weights"


def precision_ctx(impl: str, dtype: torch.dtype, device: torch.device):
    """The context a call of ``impl`` runs in (autocast for open-mythos at low precision)."""
    import contextlib

    if dtype != torch.float32 and LOW_PRECISION.get(impl) == "autocast":
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def build_models(cfg_kwargs: dict, device: torch.device, dtype: torch.dtype,
                 impls: tuple[str, ...] = IMPLS) -> tuple[dict[str, Any], dict[str, str]]:
    """``({impl: model}, {impl: reason it is missing or its source})``, same weights in both;
    weights cast per :func:`precision`."""
    models: dict[str, Any] = {}
    notes: dict[str, str] = {}
    om, om_src = load_open_mythos()
    my, my_src = load_mythos()
    notes["open-mythos"], notes["mythos"] = om_src, my_src
    torch.manual_seed(0)
    sd = None
    with torch.device(device):
        if om is not None:
            m = om.OpenMythos(om.MythosConfig(**cfg_kwargs)).eval()
            sd = m.state_dict()
            if "open-mythos" in impls:
                models["open-mythos"] = m
        if my is not None and "mythos" in impls:
            try:
                mm = my.OpenMythos(my.MythosConfig(**cfg_kwargs)).eval()
                if sd is not None:
                    mm.load_state_dict(sd)
                    notes["mythos"] = "mythos (open-mythos weights loaded)"
                else:
                    notes["mythos"] = "mythos (own init: open-mythos missing)"
                models["mythos"] = mm
            except Exception as exc:
                notes["mythos"] = f"mythos failed to build: {type(exc).__name__}: {exc}"
    for impl, m in models.items():
        if LOW_PRECISION.get(impl) != "autocast":
            cast_floating_(m, dtype)
        for p in m.parameters():
            p.requires_grad_(False)
    return models, notes


# --------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times_s: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_s, dtype=torch.float64) * 1e3
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2]


def _timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _new_cache(impl: str, capacity: int) -> dict:
    if impl == "mythos":
        my, _ = load_mythos()
        if my is not None and hasattr(my, "MythosCache"):
            return my.MythosCache(capacity)
    return {}


def _replicate(obj: Any, B: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.expand(B, *obj.shape[1:]).contiguous() if obj.shape[0] == 1 else obj
    if isinstance(obj, dict):
        return {k: _replicate(v, B) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replicate(v, B) for v in obj)
    raise TypeError(f"cannot replicate a {type(obj).__name__} cache")


def fill_cache(impl: str, model, ids: torch.Tensor, capacity: int, device: torch.device
               ) -> tuple[dict, str]:
    """A KV cache holding ``ids`` [B, T]; returns ``(cache, how)``."""
    B, T = ids.shape
    if impl == "mythos":
        cache = _new_cache(impl, capacity)
        chunk = max(1, min(T, 16384 // B))
        for s in range(0, T, chunk):
            model(ids[:, s:s + chunk], n_loops=N_LOOPS, kv_cache=cache, start_pos=s)
        return cache, "prefill" if chunk >= T else f"chunked-prefill({chunk})"
    try:
        cache: dict = {}
        model(ids, n_loops=N_LOOPS, kv_cache=cache, start_pos=0)
        return cache, "prefill"
    except Exception as exc:
        if not _is_oom(exc) or B == 1:
            raise
    cache = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    c1: dict = {}
    model(ids[:1], n_loops=N_LOOPS, kv_cache=c1, start_pos=0)
    return _replicate(c1, B), "replicated-row0"


# --------------------------------------------------------------------------- suites


def measure_prefill(model, B: int, T: int, vocab: int, device, reps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g, device="cpu").to(device)
    times = _timed(lambda: model(ids, n_loops=N_LOOPS), device, reps, warmup)
    med, p20, p80 = _stats(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": len(times),
            "tokens_per_s": B * T / (med / 1e3)}


def measure_decode(impl: str, model, B: int, ctx: int, vocab: int, device, steps: int,
                   warm: int) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (B, ctx), generator=g, device="cpu").to(device)
    cache, how = fill_cache(impl, model, ids, ctx + steps + warm, device)
    tok = torch.randint(0, vocab, (B, 1), generator=g, device="cpu").to(device)
    pos = ctx
    times = []
    for i in range(warm + steps):
        _sync(device)
        t0 = time.perf_counter()
        logits = model(tok, n_loops=N_LOOPS, kv_cache=cache, start_pos=pos)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
        pos += 1
    med, p20, p80 = _stats(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": len(times),
            "tokens_per_s": B / (med / 1e3), "cache_fill": how}


def measure_generate(model, B: int, prompt: int, new: int, vocab: int, device, reps: int,
                     warmup: int, compiled: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (B, prompt), generator=g, device="cpu").to(device)
    kw = {"compiled": True} if compiled else {}

    def run():
        torch.manual_seed(0)
        model.generate(ids, max_new_tokens=new, n_loops=N_LOOPS, **kw)

    times = _timed(run, device, reps, warmup)
    med, p20, p80 = _stats(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": len(times),
            "tokens_per_s": B * new / (med / 1e3)}


def run_model_suite(level: str = "quick", device: torch.device | str = "cpu",
                    out_path: Path | str | None = None, impls: tuple[str, ...] = IMPLS,
                    suites: tuple[str, ...] = SUITES,
                    progress: bool = True, echo: bool = True,
                    time_budget_s: float | None = None, plan: dict | None = None) -> list[dict]:
    """Run the model-level suites; append rows to ``out_path``; print a table when ``echo``."""
    device = torch.device(device)
    plan = plan or PLANS[(level, "cuda" if device.type == "cuda" else "cpu")]
    cfg = CONFIGS[plan["config"]] if isinstance(plan["config"], str) else plan["config"]
    cfg_name = plan["config"] if isinstance(plan["config"], str) else "custom"
    dtype = plan["dtype"]
    info = run_info(device)
    t_build = time.perf_counter()
    models, notes = build_models(cfg, device, dtype, impls)
    build_s = time.perf_counter() - t_build
    if echo:
        print(f"\n== model ({cfg_name} config, {str(dtype).replace('torch.', '')}, "
              f"n_loops={N_LOOPS}, every loop runs; built in {build_s:.1f}s)")
        for impl in impls:
            print(f"  {impl}: {notes.get(impl)}"
                  + (f" [{precision(impl, dtype)}]" if impl in models else "  -> skipped"))
    jobs = []
    for suite in suites:
        for spec in plan.get(suite, []):
            for impl in impls:
                if impl in models and (suite != "generate_compiled" or impl == "mythos"):
                    jobs.append((suite, spec, impl))
    prog = Progress(len(jobs), enabled=progress, prefix="model")
    out_file = None
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        out_file = open(out_path, "a")
    rows: list[dict] = []
    t0 = time.perf_counter()
    vocab = cfg["vocab_size"]
    try:
        for suite, spec, impl in jobs:
            model = models[impl]
            row: dict[str, Any] = {"kind": "model", "op": f"model_{suite}", "suite": suite,
                                   "provider": impl, "impl": impl, "config": cfg_name,
                                   "dtype": str(dtype).replace("torch.", ""), "n_loops": N_LOOPS,
                                   "level": level, "impl_source": notes.get(impl),
                                   "precision": precision(impl, dtype)}
            if suite == "prefill":
                B, T = spec
                row.update(batch=B, context=T, shape={"B": B, "T": T})
            elif suite == "decode":
                B, T = spec
                row.update(batch=B, context=T, shape={"B": B, "context": T},
                           decode_steps=plan["decode_steps"])
            else:
                B, T, new = spec
                row.update(batch=B, context=T, new_tokens=new,
                           shape={"B": B, "prompt": T, "new": new})
            prog.step(f"{suite} {impl} " + ",".join(f"{k}={v}" for k, v in row["shape"].items()))
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                row.update(status="skipped", reason="time budget exhausted")
            else:
                try:
                    with torch.no_grad(), precision_ctx(impl, dtype, device):
                        if suite == "prefill":
                            res = measure_prefill(model, B, T, vocab, device, plan["reps"],
                                                  plan["warmup"])
                        elif suite == "decode":
                            res = measure_decode(impl, model, B, T, vocab, device,
                                                 plan["decode_steps"], plan["warm_steps"])
                        else:   # the compiled suite's warm-up call compiles: never timed
                            compiled = suite == "generate_compiled"
                            res = measure_generate(model, B, T, spec[2], vocab, device,
                                                   max(1, plan["reps"] - 1),
                                                   max(plan["warmup"], int(compiled)), compiled)
                    row.update(status="ok", **res)
                except Exception as exc:
                    row.update(status="error", reason=("OOM" if _is_oom(exc) else
                                                       f"{type(exc).__name__}: {exc}")[:300])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row.update(info)
            rows.append(row)
        _add_speedups(rows)
        if out_file is not None:
            for r in rows:
                if r["status"] in ("ok", "error"):
                    out_file.write(json.dumps(r, default=str) + "\n")
    finally:
        if out_file is not None:
            out_file.close()
    if echo:
        print_model_table(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """Each row's speedup against open-mythos's row of the same suite and shape (the compiled
    generate suite against open-mythos's plain ``generate``)."""
    base = {(r["suite"], json.dumps(r["shape"], sort_keys=True)): r for r in rows
            if r["impl"] == "open-mythos" and r.get("status") == "ok"}
    for r in rows:
        suite = "generate" if r["suite"] == "generate_compiled" else r["suite"]
        b = base.get((suite, json.dumps(r["shape"], sort_keys=True)))
        if r.get("status") == "ok":
            r["speedup_vs_open_mythos"] = (b["median_ms"] / r["median_ms"]) if b else None


def print_model_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    cols = ["suite", "impl", "batch", "context", "new", "median ms", "[p20, p80]", "tokens/s",
            "vs open-mythos", "note"]
    body = []
    for r in rows:
        if r.get("status") == "ok":
            sp = r.get("speedup_vs_open_mythos")
            body.append([r["suite"], r["impl"], r["batch"], r["context"], r.get("new_tokens", "-"),
                         f"{r['median_ms']:.1f}", f"[{r['p20_ms']:.1f}, {r['p80_ms']:.1f}]",
                         f"{r['tokens_per_s']:.1f}", f"{sp:.2f}x" if sp else "-",
                         r.get("cache_fill", "") if r.get("cache_fill") != "prefill" else ""])
        else:
            body.append([r["suite"], r["impl"], r["batch"], r["context"], r.get("new_tokens", "-"),
                         r["status"].upper(), "", "", "", r.get("reason", "")[:70]])
    if not body:
        print("  (no model measurements)", file=file)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *body)]
    line = "  ".join(str(c).ljust(w) for c, w in zip(cols, widths))
    print(line, file=file)
    print("-" * len(line), file=file)
    for b in body:
        print("  ".join(str(x).ljust(w) for x, w in zip(b, widths)), file=file)
    print("  decode tokens/s = batch / median step time after the cache holds `context` tokens;"
          " generate includes the prompt's prefill.", file=file)
