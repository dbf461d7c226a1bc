"""The measurement harness: roofline math, JSON rows, ceilings cache, plots, the CLI, and every
op's CPU fallback cases under pytest-benchmark (tiny shapes; they pass with --benchmark-disable)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import ceilings, harness, plot  # noqa: E402
from bench.harness import OpBench, Provider  # noqa: E402

FAKE_CEIL = {"version": ceilings.CACHE_VERSION, "device": "test", "copy_gbps": 2000.0,
             "matmul_tflops": {"float32": 50.0, "bfloat16": 800.0}}

ROW_FIELDS = ("op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms",
              "speedup_vs_eager", "gbps", "tflops", "pct_of_ceiling", "bound", "device", "torch",
              "triton", "commit", "timestamp")

if importlib.util.find_spec("pytest_benchmark") is None:  # plugin absent: run each case once
    @pytest.fixture
    def benchmark():
        return lambda fn, *a, **k: fn(*a, **k)


@pytest.fixture(autouse=True)
def _ceiling_cache(tmp_path, monkeypatch):
    """Never calibrate or touch ~/.cache in tests."""
    monkeypatch.setenv("MYTHOS_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- roofline math


def test_memory_bound_metrics():
    # 1 GB in 1 ms = 1000 GB/s; floor 1e9 / 2000e9 = 0.5 ms -> 50 % of ceiling
    m = harness.metrics(1e9, 1e6, 1.0, FAKE_CEIL, torch.float32)
    assert m["gbps"] == pytest.approx(1000.0)
    assert m["tflops"] == pytest.approx(1e6 / 1e-3 / 1e12)
    assert m["bound"] == "memory"
    assert m["floor_ms"] == pytest.approx(0.5)
    assert m["pct_of_ceiling"] == pytest.approx(50.0)


def test_compute_bound_metrics_use_dtype_rate():
    # 8e12 FLOPs at 800 TFLOP/s (bf16) = 10 ms floor; measured 40 ms -> 25 %
    m = harness.metrics(1e6, 8e12, 40.0, FAKE_CEIL, torch.bfloat16)
    assert m["bound"] == "compute"
    assert m["tflops"] == pytest.approx(200.0)
    assert m["pct_of_ceiling"] == pytest.approx(25.0)
    # fp32 has its own (lower) rate: floor 8e12 / 50e12 = 160 ms > measured -> > 100 %
    assert harness.metrics(1e6, 8e12, 40.0, FAKE_CEIL, torch.float32)["pct_of_ceiling"] == \
        pytest.approx(400.0)


def test_floor_is_the_larger_term():
    t, bound = ceilings.floor_seconds(4e9, 1e12, FAKE_CEIL, "bfloat16")
    assert bound == "memory" and t == pytest.approx(2e-3)
    t, bound = ceilings.floor_seconds(1e3, 1.6e13, FAKE_CEIL, "bfloat16")
    assert bound == "compute" and t == pytest.approx(0.02)
    assert ceilings.floor_seconds(0, 0, FAKE_CEIL, "float32") == (None, None)
    # an unmeasured dtype falls back to fp32's rate
    assert ceilings.matmul_rate(FAKE_CEIL, torch.float16) == 50.0


def test_default_bytes_count_each_tensor_once():
    op = OpBench("t", make_inputs=None, flops=lambda s: 0.0, shapes={}, grad_inputs=("x",))
    inp = {"x": torch.zeros(10, 4), "w": torch.zeros(4), "eps": 1e-6}
    out = torch.zeros(10, 4)
    fwd = 160 + 16 + 160
    bwd = (160 + 16) + 160 + 160          # saved inputs + grad of output + grad of x
    assert harness.default_bytes(op, inp, out, "forward") == fwd
    assert harness.default_bytes(op, inp, out, "backward") == bwd
    assert harness.default_bytes(op, inp, out, "full") == fwd + bwd
    assert op.mode_flops({}, "full") == 0.0


def test_quantiles_and_cpu_timer():
    med, p20, p80 = harness._quantiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (med, p20, p80) == pytest.approx((3.0, 1.8, 4.2))
    calls = []
    med, p20, p80, reps = harness.time_cpu(lambda: calls.append(1), warmup_s=0.0, budget_s=0.0,
                                           min_reps=4)
    assert reps == 4 and len(calls) >= 5 and p20 <= med <= p80


# --------------------------------------------------------------------------- JSON rows


def _toy_op() -> OpBench:
    def make(shape, dtype, device):
        return {"x": torch.randn(shape["N"], shape["D"], dtype=dtype, device=device),
                "w": torch.randn(shape["D"], dtype=dtype, device=device)}

    op = OpBench("toy_scale", make_inputs=make, flops=lambda s: 2.0 * s["N"] * s["D"],
                 shapes={"tiny": [{"N": 8, "D": 16}, {"N": 32, "D": 16}]}, grad_inputs=("x", "w"),
                 group="toy")
    op.provider("eager")(lambda x, w: x * w + 0.0)
    op.provider("reference")(lambda x, w: x * w)
    op.add(harness.compiled_provider(lambda x, w: x * w))      # skipped on CPU quick/tiny
    op.add(Provider("triton", lambda x, w: x * w, cuda_only=True))
    op.add(Provider("broken", lambda x, w: x @ x))              # shape error -> error row
    return op


def test_run_ops_writes_rows(tmp_path):
    out = tmp_path / "r.jsonl"
    rows = harness.run_ops([_toy_op()], level="tiny", device="cpu", out_path=out,
                           ceil=FAKE_CEIL, progress=False, echo=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    ok = [r for r in lines if r["status"] == "ok"]
    # 2 shapes x 3 modes x (eager, reference)
    assert len(ok) == 12
    for r in ok:
        for f in ROW_FIELDS:
            assert f in r, f
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["bound"] in ("memory", "compute")
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["pct_of_ceiling"] == pytest.approx(100 * r["floor_ms"] / r["median_ms"])
        assert r["device_type"] == "cpu" and r["torch"] == torch.__version__
        assert r["shape"]["D"] == 16 and r["dtype"] == "float32"
    eager = [r for r in ok if r["provider"] == "eager"]
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    ref = [r for r in ok if r["provider"] == "reference" and r["mode"] == "forward"]
    assert all(r["max_abs_err_vs_reference"] is None for r in ref)
    errs = [r for r in lines if r["status"] == "error"]
    assert errs and all(r["provider"] == "broken" for r in errs)
    # skipped providers are returned but not written
    skipped = {r["provider"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert skipped["triton"] == harness.CUDA_ONLY_REASON
    assert "torch.compile" in skipped["compile"]
    assert not any(r["status"] == "skipped" for r in lines)


def test_time_budget_skips(tmp_path):
    rows = harness.run_ops([_toy_op()], level="tiny", device="cpu", out_path=None,
                           ceil=FAKE_CEIL, progress=False, echo=False, time_budget_s=0.0,
                           providers=["eager"])
    assert rows and all(r["status"] == "skipped" for r in rows[1:])


def test_dispatch_provider_needs_cuda_and_a_kernel():
    import mythos_kernels as mk

    p = harness.dispatch_provider("rms_norm", mk.rms_norm)
    assert p.cuda_only
    inp = {"x": torch.randn(4, 8), "weight": torch.ones(8), "eps": 1e-6}
    row = harness.measure(harness.OpBench("rms", lambda *a: inp, lambda s: 1.0, {}), p, {},
                          torch.float32, "forward", torch.device("cpu"), inp, None, FAKE_CEIL)
    assert row["status"] == "skipped" and row["reason"] == harness.CUDA_ONLY_REASON


# --------------------------------------------------------------------------- ceilings cache


def test_ceilings_cached_per_device(monkeypatch, tmp_path):
    calls = []

    def fake(device):
        calls.append(device)
        return dict(FAKE_CEIL, device="CPU fake")

    monkeypatch.setattr(ceilings, "calibrate", fake)
    a = ceilings.get_ceilings("cpu", verbose=False)
    b = ceilings.get_ceilings("cpu", verbose=False)
    assert a == b and len(calls) == 1
    data = json.loads(ceilings.cache_path().read_text())
    assert len(data) == 1 and next(iter(data)).startswith("CPU ")
    ceilings.get_ceilings("cpu", refresh=True, verbose=False)
    assert len(calls) == 2


@pytest.mark.slow
def test_calibrate_cpu_runs():
    c = ceilings.calibrate("cpu")
    assert c["copy_gbps"] > 0 and c["matmul_tflops"]["float32"] > 0


# --------------------------------------------------------------------------- plots


def test_plot_writes_pngs(tmp_path):
    out = tmp_path / "r.jsonl"
    harness.run_ops([_toy_op()], level="tiny", device="cpu", out_path=out, ceil=FAKE_CEIL,
                    progress=False, echo=False, providers=["eager", "reference"])
    model_rows = [dict(kind="model", op="model_decode", suite="decode", impl=i, provider=i,
                       batch=1, context=c, shape={"B": 1, "context": c}, status="ok",
                       median_ms=10.0 * c / 64, tokens_per_s=6400.0 / c, config="mid",
                       dtype="float32", n_loops=8, device="cpu")
                  for i in ("mythos", "open-mythos") for c in (64, 256)]
    with out.open("a") as f:
        for r in model_rows:
            f.write(json.dumps(r) + "\n")
    pngs = plot.plot_file([out])
    names = sorted(p.name for p in pngs)
    assert names == ["model.png", "toy_scale.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert plot.main([str(out), "--out", str(tmp_path / "pl")]) == 0
    assert (tmp_path / "pl" / "toy_scale.png").exists()


# --------------------------------------------------------------------------- CLI


def test_cli_list_and_tiny_run(tmp_path, capsys):
    from bench.__main__ import main

    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("rmsnorm", "lti_act_step", "loop_input", "moe_route", "moe_experts"):
        assert name in listed
    ceilings.cache_path().parent.mkdir(parents=True, exist_ok=True)
    key = ceilings._key(torch.device("cpu"))
    ceilings.cache_path().write_text(json.dumps({key: dict(FAKE_CEIL)}))
    assert main(["--level", "tiny", "--ops", "rmsnorm", "--no-model", "--out", str(tmp_path),
                 "--quiet", "--device", "cpu",
                 "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    assert "Triton timings need a CUDA GPU" in out and "rmsnorm" in out
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"eager", "reference"}
    assert (tmp_path / "rmsnorm.png").exists()
    with pytest.raises(SystemExit) as e:
        main(["--ops", "nope", "--no-model", "--out", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.parametrize("args,msg", [
    (["--providers", "bogus", "--no-model"], "unknown provider 'bogus'"),
    (["--ops", "rmsnorm", "--providers", "folded", "--no-model"], "unknown provider 'folded'"),
    (["--modes", "sideways", "--no-model"], "unknown mode 'sideways'"),
    (["--suites", "nope", "--model"], "unknown suite 'nope'"),
    (["--model", "--providers", "eager"], "not with --model"),
    (["--time-budget", "-1"], "--time-budget"),
    (["--time-budget", "nan"], "--time-budget"),
    (["--threads", "0"], "--threads"),
    (["--threads", "two"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--level", "huge"], "--level"),
    (["--ops", "nope"], "unknown op 'nope'"),
])
def test_cli_rejects_what_selects_nothing(tmp_path, capsys, args, msg):
    """A value that selects nothing, or a bad one, is an argparse error (exit 2, the message on
    stderr) before anything is measured or written."""
    from bench.__main__ import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(out), "--quiet",
              *([] if "--device" in args else ["--device", "cpu"])])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_cli_unwritable_out_is_an_argparse_error(tmp_path, capsys):
    """--out under a file, or where nothing can be created, fails before any measurement."""
    import subprocess

    from bench.__main__ import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub", Path("/proc/mythos_bench_out")):
        with pytest.raises(SystemExit) as e:
            main(["--ops", "rmsnorm", "--no-model", "--out", str(out), "--device", "cpu"])
        assert e.value.code == 2 and "--out" in capsys.readouterr().err
    assert a_file.read_text() == "x"
    # the command itself: exit code 2, the message on stderr, no results file
    r = subprocess.run([sys.executable, "-m", "bench", "--providers", "bogus", "--no-model",
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "unknown provider 'bogus'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- CPU fallback cases


def _cases():
    cases = []
    for op in harness.all_ops().values():
        for shape in op.shapes.get("tiny", []):
            for prov in ("reference", "eager"):
                if prov in op.providers:
                    cases.append(pytest.param(op.name, prov, shape,
                                              id=f"{op.name}-{prov}-{harness.shape_str(shape)}"))
    return cases


@pytest.mark.parametrize("op_name,prov_name,shape", _cases())
def test_cpu_fallback_case(benchmark, op_name, prov_name, shape):
    """Each op's CPU providers at its tiny shape, timed by pytest-benchmark; eager (the
    open-mythos op sequence) and reference must agree."""
    op = harness.all_ops()[op_name]
    torch.manual_seed(0)
    inp = op.make_inputs(dict(shape), torch.float32, torch.device("cpu"))
    prov = op.providers[prov_name]
    args = prov.prepare(dict(inp)) if prov.prepare else inp
    with torch.no_grad():
        out = benchmark(lambda: prov.fn(**args))
        ref = op.providers["reference"].fn(**inp)
    outs, refs = list(harness._tensors(out)), list(harness._tensors(ref))
    assert len(outs) >= 1
    for o, r in zip(outs, refs):
        if o.is_floating_point():
            torch.testing.assert_close(o, r.to(o.dtype), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(o, r)


# --------------------------------------------------------------------------- model suite


def test_model_suite_tiny(tmp_path, monkeypatch):
    """mythos vs open-mythos on a tiny config (skips the missing side cleanly)."""
    from conftest import tiny_kwargs

    from bench import model

    if model.load_open_mythos()[0] is None and model.load_mythos()[0] is None:
        pytest.skip("neither mythos nor open-mythos imports")
    # the config, batch, loop count and frozen weights of test_compile's compiled generate (MLA):
    # the same decode-step graph, reused in one process (after a Dynamo reset, from inductor's
    # graph cache) rather than a second one built
    monkeypatch.setattr(model, "N_LOOPS", 2)
    plan = dict(config=tiny_kwargs("mla"), dtype=torch.float32, prefill=[(1, 8)], decode=[(2, 8)],
                generate=[(2, 5, 3)], generate_compiled=[(2, 5, 3)], decode_steps=2,
                warm_steps=1, reps=1, warmup=0)
    out = tmp_path / "m.jsonl"
    rows = model.run_model_suite("tiny", "cpu", out_path=out, plan=plan, progress=False,
                                 echo=False)
    assert rows and all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    compiled = [r for r in rows if r["suite"] == "generate_compiled"]
    if model.load_mythos()[0] is not None:                  # mythos only, one row
        assert [r["impl"] for r in compiled] == ["mythos"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["kind"] == "model" and r["commit"]
    if {r["impl"] for r in rows} == {"mythos", "open-mythos"}:
        assert all(r["speedup_vs_open_mythos"] for r in rows)
    assert len(out.read_text().splitlines()) == len(rows)


def test_cast_keeps_complex_buffers():
    from bench.model import cast_floating_

    m = torch.nn.Linear(4, 4)
    m.register_buffer("freqs", torch.polar(torch.ones(3), torch.arange(3.0)))
    m.register_buffer("idx", torch.arange(3))
    cast_floating_(m, torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16 and m.freqs.dtype == torch.complex64
    assert m.idx.dtype == torch.int64 and m.freqs.imag.abs().sum() > 0
    from bench.model import precision

    assert precision("open-mythos", torch.bfloat16) == "float32 weights + bfloat16 autocast"
    assert precision("mythos", torch.bfloat16) == "bfloat16 weights"
    assert precision("open-mythos", torch.float32) == "float32"


def test_env_does_not_force_interpreter():
    # the harness itself never sets TRITON_INTERPRET
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] in ("0", "1")


def test_time_interleaved_order_and_counts():
    from bench.harness import time_interleaved
    seen = []
    t = time_interleaved({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")}, 3)
    assert seen == ["a", "b"] * 3 and all(len(v) == 3 and min(v) >= 0 for v in t.values())
    seen.clear()
    time_interleaved({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")}, 3,
                     alternate=True)
    assert seen == ["b", "a", "a", "b", "b", "a"]


def test_append_jsonl(tmp_path):
    import json

    from bench.harness import append_jsonl
    path = str(tmp_path / "new" / "rows.jsonl")
    append_jsonl(path, [{"a": 1}, {"b": torch.float32}])     # folder made; non-JSON via str
    append_jsonl(path, [{"c": [1.5]}])
    rows = [json.loads(line) for line in open(path)]
    assert rows == [{"a": 1}, {"b": "torch.float32"}, {"c": [1.5]}]


def test_cli_restores_the_thread_count(tmp_path, monkeypatch):
    """bench's main switches a busy machine to one torch thread; called in-process (as here) it
    must give the caller its thread count back (this once leaked into later tests)."""
    import bench.__main__ as bm

    before = torch.get_num_threads()
    monkeypatch.setattr(bm, "load_avg", lambda: 1e9)                 # a busy machine
    for args in (["--device", "cpu"], ["--threads", "1"]):
        with pytest.raises(SystemExit):
            bm.main(["--ops", "nope", "--no-model", "--out", str(tmp_path), *args])
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_cpu_compare_forward_flops(om, attn_type):
    """bench.suites.forward_flops: mythos's count is open-mythos's less half of the attention
    products (4 B H T^2 d per layer for GQA), and the head adds 2 B T D per vocabulary entry."""
    from conftest import tiny_kwargs

    from bench.suites import forward_flops

    B, T = 2, 5
    counts = {}
    for vocab in (50, 80):
        kw = tiny_kwargs(attn_type, vocab_size=vocab, act_threshold=1e4)  # every loop runs
        torch.manual_seed(0)
        a = om.OpenMythos(om.MythosConfig(**kw)).eval()
        counts[vocab] = forward_flops(a, torch.randint(0, vocab, (B, T)))
    (om_50, my_50), (om_80, my_80) = counts[50], counts[80]
    assert om_80 - om_50 == 2 * B * T * kw["dim"] * 30
    layers = kw["prelude_layers"] + kw["max_loop_iters"] + kw["coda_layers"]
    H = kw["n_heads"]
    if attn_type == "gqa":
        attn = layers * 2 * B * H * T * T * 2 * (kw["dim"] // H)
    else:  # scores over [nope | rope], then the values
        q_dim = kw["qk_nope_head_dim"] + kw["qk_rope_head_dim"]
        attn = layers * 2 * B * H * T * T * (q_dim + kw["v_head_dim"])
    assert om_50 - my_50 == attn / 2
    assert om_80 - my_80 == attn / 2


def test_named_suites_tiny(tmp_path, om, capsys):
    """``--suites compare,linear_split,moe_forms`` run only when named, each appending its rows
    (compare: the forward and generate rows with both implementations' times) to its own file."""
    from bench.__main__ import main

    assert main(["--model", "--level", "tiny", "--suites", "compare,linear_split,moe_forms",
                 "--out", str(tmp_path), "--no-plot", "--quiet", "--device", "cpu"]) == 0
    assert not (tmp_path / "results.jsonl").exists()        # no model suite was named
    rows = {n: [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in ("compare", "linear_split", "moe_forms")}
    assert [r["suite"] for r in rows["compare"]] == ["forward", "generate"]
    for r in rows["compare"]:
        assert r["speedup_median"] > 0 and r["open_mythos_s"] and r["mythos_s"]
        assert r["config"] == "tiny-gqa" and r["device_type"] == "cpu" and "commit" in r
    fwd = rows["compare"][0]
    assert 0 < fwd["mythos_gflop"] < fwd["open_mythos_gflop"]
    assert {(r["rows"], r["N"]) for r in rows["linear_split"]} == {(1, 160), (8, 160)}
    assert all(r["linear_us"] > 0 and r["split_us"] > 0 for r in rows["linear_split"])
    assert [r["mode"] for r in rows["moe_forms"]] == ["inference", "train"] * 2
    assert all(r["cpu_over_best"] > 0 and r["nonempty"] <= r["E"] for r in rows["moe_forms"])


def test_unknown_named_suite_raises(tmp_path):
    from bench.suites import run_named_suites

    with pytest.raises(ValueError, match="named suites are"):
        run_named_suites(["nope"], "tiny", tmp_path)


def test_train_losses_and_checkpointing_hook(om):
    """The train suite's mythos variants: the same loss as open-mythos on the same weights, with
    and without the fused head and per-iteration checkpointing (the switch is wired)."""
    from bench import train as bt
    from bench.model import CPU_CONFIGS, build_models

    assert bt._train_forward() is not None
    models, _ = build_models(CPU_CONFIGS["tiny-gqa"], torch.device("cpu"), torch.float32)
    bt._trainable(models)
    ids, targets = bt._batch(CPU_CONFIGS["tiny-gqa"]["vocab_size"], 2, 9, torch.device("cpu"))
    ref = bt._loss_fn("open-mythos", models["open-mythos"], ids, targets, 3)
    grads = None
    for variant in ("mythos", "mythos+fused-ce"):
        for ckpt in (False, True):
            model = models["mythos"]
            loss = bt._loss_fn(variant, model, ids, targets, 3, checkpoint=ckpt)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            g = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            if grads is None:
                grads = g
            for a, b in zip(g, grads):
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_train_step_rows_report_mfu_on_cpu(om):
    """Every ok step row carries the model FLOPs utilization against the device's measured
    matmul peak (the CPU's too), consistent with its own step time."""
    from bench import ceilings
    from bench import train as bt

    plan = dict(bt.PLANS[("tiny", "cpu")], config="mid", B=1, T=8, n_loops=1, reps=1)
    rows = bt.run_step_suite(plan, torch.device("cpu"), variants=("open-mythos", "mythos"))
    peak = ceilings.matmul_rate(ceilings.get_ceilings("cpu", verbose=False), torch.float32) * 1e12
    assert [r["impl"] for r in rows] == ["open-mythos", "mythos"]
    for r in rows:
        assert r["status"] == "ok"
        assert r["mfu_pct"] == pytest.approx(100 * r["model_flops"] / r["step_s"] / peak)
        assert 0 < r["mfu_pct"] < 100


def test_train_memory_child_with_checkpointing():
    from bench import train as bt

    plan = dict(bt.PLANS[("tiny", "cpu")])
    res = bt.measure_peak("mythos+fused-ce", plan, dict(B=1, T=8, n_loops=2), torch.device("cpu"),
                          checkpointing=True, timeout_s=600)
    assert res["peak_bytes"] > 0 and res["param_bytes"] > 0 and res["step_s"] > 0
