"""mythos vs open-mythos 0.5.0 on the CPU across configurations besides the mid one (tiny, small,
GQA, a few large experts, wide): forward B=2, T=64 and a decode step (B=1) at context 64 to 256,
medians of interleaved repetitions in one process. Prints one line per config with the forward's
relative error; appends one JSON row per config to bench/results/cpu/config_sweep.jsonl.

    python tools/cpu_config_sweep.py [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mythos  # noqa: E402
from bench._openmythos import load_open_mythos  # noqa: E402
from bench.devinfo import run_info  # noqa: E402
from bench.harness import append_jsonl, cpu_results, time_interleaved  # noqa: E402
from bench.model import CPU_CONFIGS  # noqa: E402


class _Decoder:
    """One-token decode steps over a growing cache (B=1), restarted from a prefill of ``ids``
    before the cache would pass ``max_seq_len``; each call runs ``steps`` steps."""

    def __init__(self, model, ids: torch.Tensor, steps: int = 4):
        self.model, self.ids, self.steps = model, ids, steps
        self.limit = model.cfg.max_seq_len if hasattr(model, "cfg") else 256
        self._restart()

    def _restart(self) -> None:
        self.cache: dict = {}
        self.model(self.ids, kv_cache=self.cache)
        self.pos = self.ids.shape[1]

    def __call__(self) -> None:
        if self.pos + self.steps > min(self.limit, 4 * self.ids.shape[1]):
            self._restart()
        tok = self.ids[:, -1:]
        for _ in range(self.steps):
            self.model(tok, kv_cache=self.cache, start_pos=self.pos)
            self.pos += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=cpu_results("config_sweep.jsonl"))
    args = ap.parse_args(argv)
    om, _why = load_open_mythos()
    if om is None:
        print("open-mythos 0.5.0 is not installed: pip install --no-deps open-mythos==0.5.0")
        return 1
    info = run_info(torch.device("cpu"))
    rows = []
    for name, kw in CPU_CONFIGS.items():
        torch.manual_seed(0)
        a = om.OpenMythos(om.MythosConfig(**kw)).eval()
        b = mythos.OpenMythos(mythos.MythosConfig(**kw)).eval()
        b.load_state_dict(a.state_dict())
        ids = torch.randint(0, kw["vocab_size"], (2, 64))
        with torch.no_grad():
            a(ids), b(ids)
            t = time_interleaved({"a": lambda: a(ids), "b": lambda: b(ids)}, args.reps,
                                 alternate=True)
            fa, fb = statistics.median(t["a"]), statistics.median(t["b"])
            dec_a, dec_b = _Decoder(a, ids[:1]), _Decoder(b, ids[:1])
            t = time_interleaved({"a": dec_a, "b": dec_b}, 4 * args.reps, alternate=True)
            da = statistics.median(t["a"]) / dec_a.steps
            db = statistics.median(t["b"]) / dec_b.steps
            ra, rb = a(ids), b(ids)
            err = ((ra - rb).norm() / ra.norm()).item()
        row = {"config": name, "forward_B2_T64": {"open_mythos_s": fa, "mythos_s": fb,
                                                  "speedup": fa / fb},
               "decode_step_B1_ctx64": {"open_mythos_s": da, "mythos_s": db, "speedup": da / db},
               "rel_err": err}
        row.update(info)
        rows.append(row)
        print(f"{name:14s} forward [2, 64] open-mythos {fa * 1e3:7.1f} ms  mythos {fb * 1e3:7.1f} "
              f"ms ({fa / fb:.2f}x) | decode step {da * 1e3:6.1f} / {db * 1e3:6.1f} ms "
              f"({da / db:.2f}x) | rel err {err:.1e}", flush=True)
    append_jsonl(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
