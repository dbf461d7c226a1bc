"""GPU probe: per-call time vs GPU time vs host time of single calls, and the shared-expert layout.

For the recurrent step (plain and fused with the next loop input) and the MLA absorbed decode:
``*_bench`` = ``triton.testing.do_bench`` per call (L2 flushed; includes host time the GPU waits
for), ``*_graph`` = the call replayed from a CUDA graph (GPU time only), ``*_host_us`` = host time
per call at a tiny shape (GPU work negligible); plus a cProfile of the Python path and the CUDA
kernels of one MLA decode call. Then routed + shared experts: dense shared SwiGLUs vs folded into
the grouped GEMM (the ``moe_shared`` bench op does this properly). Writes a JSON of the figures.

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
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mythos_kernels as mk  # noqa: E402
from bench.ops_mla import _eager_prepare as mla_prep  # noqa: E402
from bench.ops_mla import _inputs as mla_inputs  # noqa: E402
from bench.ops_mla import _shape as mla_shape  # noqa: E402
from bench.ops_mla import mla_decode_eager  # noqa: E402
from bench.ops_recurrent import _eager_prepare, _step_inputs, lti_act_step_eager  # noqa: E402

dev = "cuda"
torch.manual_seed(0)
R = {}


def graph_ms(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(lambda: g.replay(), warmup=25, rep=200)


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

# ---------------- shared experts: dense vs folded
D = Fh = 2048
k = 4
E = 64
ns = 2
dt = torch.bfloat16


def mk_shared():
    g = [(torch.randn(k * Fh, D, device=dev) * D**-0.5).to(dt) for _ in range(ns)]
    u = [(torch.randn(k * Fh, D, device=dev) * D**-0.5).to(dt) for _ in range(ns)]
    d = [(torch.randn(D, k * Fh, device=dev) * (k * Fh) ** -0.5).to(dt) for _ in range(ns)]
    return g, u, d


G, U, Dw = mk_shared()
w13s = torch.stack(
    [
        torch.cat([G[s][j * Fh : (j + 1) * Fh].t(), U[s][j * Fh : (j + 1) * Fh].t()], 1)
        for s in range(ns)
        for j in range(k)
    ]
).contiguous()
w2s = torch.stack([Dw[s][:, j * Fh : (j + 1) * Fh].t() for s in range(ns) for j in range(k)]).contiguous()
W13cat = torch.cat(
    [torch.cat([G[s] for s in range(ns)]), torch.cat([U[s] for s in range(ns)])]
).contiguous()  # [2*ns*kF, D]
Wdcat = torch.cat([Dw[s] for s in range(ns)], 1).contiguous()  # [D, ns*kF]
w13 = (torch.randn(E, D, 2 * Fh, device=dev) * D**-0.5).to(dt)
w2 = (torch.randn(E, Fh, D, device=dev) * Fh**-0.5).to(dt)
w13all = torch.cat([w13, w13s]).contiguous()
w2all = torch.cat([w2, w2s]).contiguous()
params = [w13, w2, w13all, w2all, W13cat, Wdcat] + G + U + Dw


def dense(x):
    out = None
    for s in range(ns):
        y = F.linear(F.silu(F.linear(x, G[s])) * F.linear(x, U[s]), Dw[s])
        out = y if out is None else out + y
    return out


def dense_cat(x):
    h = F.linear(x, W13cat)
    H = h.shape[1] // 2
    return F.linear(F.silu(h[:, :H]) * h[:, H:], Wdcat)


for N in (1, 16, 64, 512, 4096, 16384):
    x = torch.randn(N, D, device=dev, dtype=dt)
    w, idx = mk.moe_route_reference(torch.randn(N, E, device=dev), torch.zeros(E, device=dev), k)
    w = w.to(dt)
    ones = torch.ones(N, ns * k, device=dev, dtype=dt)
    sidx = (E + torch.arange(ns * k, device=dev)).expand(N, -1)
    wall = torch.cat([w, ones], 1).contiguous()
    iall = torch.cat([idx, sidx], 1).contiguous()

    def routed_dense():
        return mk.moe_experts_triton(x, w, idx, w13, w2) + dense(x)

    def routed_densecat():
        return mk.moe_experts_triton(x, w, idx, w13, w2) + dense_cat(x)

    def folded():
        return mk.moe_experts_triton(x, wall, iall, w13all, w2all)

    with torch.no_grad():
        ref = routed_dense().float()
        errf = (folded().float() - ref).abs().max().item()
        errc = (routed_densecat().float() - ref).abs().max().item()
        kw = dict(
            routed_only=do_bench(lambda: mk.moe_experts_triton(x, w, idx, w13, w2)),
            dense_only=do_bench(lambda: dense(x)),
            densecat_only=do_bench(lambda: dense_cat(x)),
            routed_dense=do_bench(routed_dense),
            routed_densecat=do_bench(routed_densecat),
            folded=do_bench(folded),
            err_folded=errf,
            err_cat=errc,
        )
    if N >= 4096:
        for p in params:
            p.requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        gy = torch.randn(N, D, device=dev, dtype=dt)

        def rd(xx):
            return mk.moe_experts_triton(xx, w, idx, w13, w2) + dense(xx)

        def rdc(xx):
            return mk.moe_experts_triton(xx, w, idx, w13, w2) + dense_cat(xx)

        def fo(xx):
            return mk.moe_experts_triton(xx, wall, iall, w13all, w2all)

        for name, f in (("routed_dense", rd), ("routed_densecat", rdc), ("folded", fo)):

            def run(f=f):
                for p in params + [xg]:
                    p.grad = None
                f(xg).backward(gy)

            kw[name + "_fb"] = do_bench(run)
        for p in params:
            p.requires_grad_(False)
    line(f"shared N={N}", **kw)
json.dump(R, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe.json", "w"), indent=1)
