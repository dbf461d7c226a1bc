"""Interleaved A/B of the CPU inference switches on the mid config: each switch turns one CPU
form off (its plain fallback runs instead) and the model is timed with it on and off in
alternating order, in one process. Appends one JSON row per (switch, suite) to
bench/results/cpu/ab.jsonl.

    python tools/cpu_ab.py [--switches all] [--suites decode,forward] [--steps 64] [--reps 8]
                           [--block 1]

Suites: ``decode`` (per-step times of the decode step through the modules, head included),
``forward`` (B=2, T=256), ``generate`` (prompt 64 + 32 new tokens, B=1: through the decode plan
where it serves, so the suite for the ``decode_plan`` switch).

A switch that does not apply to a suite (e.g. the few-row paths in a 512-token forward) measures
this machine's noise floor for that suite.

Switches (what "off" runs): every registered CPU variant by its name
(``mythos_kernels.cpu_variants()``, switched with ``set_cpu_variant``), e.g. ``dense_split``
(few-row products without the two-core split), ``onednn``, ``lm_head_cpu``, ``vecmat_head``,
``head_kept``, ``weight_copies``, ``packed_swiglu``, ``mla_cpu``, ``rmsnorm`` and the MoE's
``moe_experts_cpu``, ``moe_pairs``, ``moe_split``, ``moe_seg_pairs``, ``moe_scratch``,
``moe_grouped_mm``; and the two switches of the model side, set through their environment
variables (``ENV_SWITCHES``):
  decode_plan       generate's planned decode step (mythos.decode) -> the steps through the modules
  fast_multinomial  generate's sampling draw (mythos.sampling) -> torch.multinomial (same tokens)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mythos  # noqa: E402
import mythos_kernels as K  # noqa: E402
from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, cpu_results, time_interleaved  # noqa: E402
from bench.model import MID  # noqa: E402
from mythos.cache import MythosCache  # noqa: E402

ENV_SWITCHES = {"decode_plan": "MYTHOS_CPU_DECODE_PLAN",
                "fast_multinomial": "MYTHOS_CPU_FAST_MULTINOMIAL"}   # read on each use


VARIANTS = [name for name, _, _, _ in K.cpu_variants()]   # switched by name, through the table


class Switch:
    """One switch: a registered CPU variant, or a model-side environment switch, by name."""

    def __init__(self, name: str):
        if name not in VARIANTS and name not in ENV_SWITCHES:
            raise ValueError(f"no switch {name!r}; known: {VARIANTS + list(ENV_SWITCHES)}")
        self.name = name

    def set(self, on: bool) -> None:
        if self.name in VARIANTS:
            K.set_cpu_variant(self.name, on)
        else:
            os.environ[ENV_SWITCHES[self.name]] = "1" if on else "0"


def ab_decode(model, sw: Switch, prompt: int = 64, steps: int = 32) -> dict[bool, list[float]]:
    """Per-step times (head included) after a ``prompt``-token prefill, on and off alternating."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt + steps))
    caches = {v: MythosCache(prompt + steps) for v in (True, False)}
    res: dict[bool, list[float]] = {True: [], False: []}
    with torch.no_grad():
        for v in (True, False):
            sw.set(v)
            model.logits(model.hidden_states(ids[:, :prompt], None, caches[v], 0)[:, -1])
        for p in range(prompt, prompt + steps):
            for v in ((True, False) if p % 2 else (False, True)):
                sw.set(v)
                t0 = time.perf_counter()
                with K.weights_unchanged():    # as forward(): copies checked once a step
                    model.logits(model.hidden_states(ids[:, p:p + 1], None, caches[v], p)[:, -1])
                res[v].append(time.perf_counter() - t0)
    return res


def ab_forward(model, sw: Switch, reps: int = 8, block: int = 1) -> dict[bool, list[float]]:
    """Forward B=2, T=256 times, on and off alternating; with ``block`` > 1, in runs of
    ``block`` forwards per variant whose first is not kept (a switch that changes how memory is
    allocated, e.g. kept buffers, leaves the allocator in a state that favours or penalizes the
    next forward of the other variant: alternating single forwards measures the mix)."""
    ids = torch.randint(0, model.cfg.vocab_size, (2, 256))

    def run(on: bool):
        sw.set(on)
        model(ids)

    with torch.no_grad():
        model(ids)
        if block <= 1:
            t = time_interleaved({"on": lambda: run(True), "off": lambda: run(False)}, reps,
                                 alternate=True)
            return {True: t["on"], False: t["off"]}
        res: dict[bool, list[float]] = {True: [], False: []}
        i = 0
        while len(res[True]) < reps or len(res[False]) < reps:
            on = i % 2 == 0
            i += 1
            run(on)                                            # the block's first: not kept
            for _ in range(block - 1):
                t0 = time.perf_counter()
                run(on)
                res[on].append(time.perf_counter() - t0)
    return {v: res[v][:reps] for v in (True, False)}


def ab_generate(model, sw: Switch, reps: int = 8) -> dict[bool, list[float]]:
    """``generate`` (prompt 64, 32 new tokens, 8 loops, B=1) times, on and off alternating."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, 64))

    def run(on: bool):
        sw.set(on)
        torch.manual_seed(0)
        model.generate(ids, 32, n_loops=8)

    run(True), run(False)
    t = time_interleaved({"on": lambda: run(True), "off": lambda: run(False)}, reps,
                         alternate=True)
    return {True: t["on"], False: t["off"]}


SUITES = {"decode": lambda m, sw, a: ab_decode(m, sw, steps=a.steps),
          "forward": lambda m, sw, a: ab_forward(m, sw, reps=a.reps, block=a.block),
          "generate": lambda m, sw, a: ab_generate(m, sw, reps=a.reps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", default="all")
    ap.add_argument("--suites", default="decode,forward")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per variant")
    ap.add_argument("--reps", type=int, default=8,
                    help="forward / generate repetitions per variant")
    ap.add_argument("--block", type=int, default=1,
                    help="forward: consecutive forwards per variant (the first of each not kept)")
    ap.add_argument("--out", default=cpu_results("ab.jsonl"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    known = VARIANTS + list(ENV_SWITCHES)
    names = known if args.switches == "all" else args.switches.split(",")
    bad = [n for n in names if n not in known]
    if bad:
        ap.error(f"unknown switch(es) {bad}; known: {known}")
    suites = args.suites.split(",")
    if any(s not in SUITES for s in suites):
        ap.error(f"unknown suite(s) in {suites}; known: {list(SUITES)}")
    torch.manual_seed(0)
    model = mythos.OpenMythos(mythos.MythosConfig(**MID)).eval()
    info = run_info(torch.device("cpu"))
    rows = []
    for name in names:
        sw = Switch(name)
        for suite in suites:
            res = SUITES[suite](model, sw, args)
            sw.set(True)
            on, off = statistics.median(res[True]) * 1e3, statistics.median(res[False]) * 1e3
            row = {"switch": name, "suite": suite, "on_ms": round(on, 3), "off_ms": round(off, 3),
                   "saves_ms": round(off - on, 3), "speedup": round(off / on, 4),
                   "block": args.block if suite == "forward" else 1,
                   "reps": args.reps if suite != "decode" else args.steps,
                   "on_s": res[True], "off_s": res[False]}
            row.update(info)
            rows.append(row)
            print(f"{name:12s} {suite:8s} on {on:8.2f} ms  off {off:8.2f} ms  "
                  f"saves {off - on:6.2f} ms ({off / on:.3f}x)", flush=True)
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
