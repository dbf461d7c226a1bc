"""GPU probe: per-call time vs GPU time vs host time of single kernel calls.

For the recurrent step (plain and fused with the next loop input) and the MLA absorbed decode:
``*_bench`` = ``triton.testing.do_bench`` per call (L2 flushed; includes host time the GPU waits
for), ``*_graph`` = the call replayed from a CUDA graph (GPU time only), ``*_host_us`` = host time
per call at a tiny shape (GPU work negligible); plus a cProfile of the Python path and the CUDA
kernels of one MLA decode call. Writes a JSON of the figures. (Its first run also compared dense
and folded shared experts; the ``moe_shared`` bench op does that now.)

    python tools/host_overhead_probe.py OUT.json        (needs a CUDA GPU)

Its first run (H100, at commit 10fd2cd) is ``bench/results/nvidia-h100-80gb-hbm3/host_overhead_probe.json``.
"""

import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mythos_kernels as mk  # noqa: E402
from bench.harness import time_cuda_graph  # noqa: E402
from bench.ops_mla import _eager_prepare as mla_prep  # noqa: E402
from bench.ops_mla import _inputs as mla_inputs  # noqa: E402
from bench.ops_mla import _shape as mla_shape  # noqa: E402
from bench.ops_mla import mla_decode_eager  # noqa: E402
from bench.ops_recurrent import _eager_prepare, _step_inputs, lti_act_step_eager  # noqa: E402

dev = "cuda"
torch.manual_seed(0)
R = {}


def graph_ms(fn):
    return time_cuda_graph([fn], rep_ms=200)


def host_us(fn, n=300):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def prof(fn, n=200, top=14):
    for _ in range(3):
        fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    print(s.getvalue()[:4000])


def line(name, **kw):
    R[name] = kw
    print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()}, flush=True)


with torch.no_grad():
    # ---------------- recurrent step
    for N, D in ((16384, 2048), (65536, 2048), (16384, 4096)):
        inp = _step_inputs({"N": N, "D": D}, torch.bfloat16, dev)
        small = _step_inputs({"N": 64, "D": D}, torch.bfloat16, dev)
        nw = torch.ones(D, device=dev, dtype=torch.bfloat16)

        def tri(i=inp):
            with mk.use_backend("triton"):
                return mk.lti_act_step(**i)

        def trif(i=inp):
            with mk.use_backend("triton"):
                return mk.lti_act_step(**i, next_loop=(3, nw, 1e-6, D // 8))

        ein = _eager_prepare(inp)
        esm = _eager_prepare(small)

        def eag(i=ein):
            return lti_act_step_eager(**i)

        line(
            f"step N={N} D={D}",
            tri_bench=do_bench(tri),
            tri_graph=graph_ms(tri),
            trif_bench=do_bench(trif),
            trif_graph=graph_ms(trif),
            eager_bench=do_bench(eag),
            eager_graph=graph_ms(eag),
            tri_host_us=host_us(lambda: tri(small)),
            trif_host_us=host_us(lambda: trif(small)),
            eager_host_us=host_us(lambda: eag(esm)),
        )
    small = _step_inputs({"N": 64, "D": 2048}, torch.bfloat16, dev)

    def tri_s():
        with mk.use_backend("triton"):
            return mk.lti_act_step(**small)

    prof(tri_s)
    # ---------------- MLA decode
    for B, S in ((1, 4096), (64, 4096), (1, 32768), (64, 32768)):
        inp = mla_inputs(mla_shape(B, S), torch.bfloat16, dev)

        def mtri(i=inp):
            with mk.use_backend("triton"):
                return mk.mla_decode(**i)

        e_in = mla_prep(inp)
        line(
            f"mla B={B} S={S}",
            tri_bench=do_bench(mtri),
            tri_graph=graph_ms(mtri),
            tri_host_us=host_us(mtri),
            eager_bench=do_bench(lambda: mla_decode_eager(**e_in)),
            eager_graph=graph_ms(lambda: mla_decode_eager(**e_in)),
        )
    inp = mla_inputs(mla_shape(1, 4096), torch.bfloat16, dev)

    def mtri():
        with mk.use_backend("triton"):
            return mk.mla_decode(**inp)

    prof(mtri)
    from torch.profiler import ProfilerActivity, profile

    for B in (1, 64):
        inp = mla_inputs(mla_shape(B, 4096), torch.bfloat16, dev)
        for _ in range(3):
            mtri()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                with mk.use_backend("triton"):
                    mk.mla_decode(**inp)
            torch.cuda.synchronize()
        print(f"MLA B={B} S=4096 kernels\n", p.key_averages().table(sort_by="cuda_time_total", row_limit=12))

with open(sys.argv[1] if len(sys.argv) > 1 else "host_overhead_probe.json", "w") as f:
    json.dump(R, f, indent=1)
