"""tools/kernel_report.py on throwaway kernels: compiles for sm_90 / sm_80 with no GPU, reports
registers / spills / shared memory / HGMMA, and fails loudly on a kernel that does not compile.

The report runs in a subprocess with TRITON_INTERPRET removed (the test suite itself may run
under the interpreter, where ``@triton.jit`` yields interpreter objects that cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "kernel_report.py"
sys.path.insert(0, str(REPO / "tools"))

pytest.importorskip("triton")

import kernel_report  # noqa: E402

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl
    from mythos_kernels import KernelConfig, register_kernel


    @triton.jit
    def _tiny_add(x_ptr, y_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(o_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m),
                 mask=m)


    @triton.jit
    def _tiny_dot(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
        rm = tl.arange(0, BM)
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(tl.bfloat16))


    @triton.jit
    def _tiny_broken(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)          # BLOCK=3: not a power of two -> compile error
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


    ADD_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "o_ptr": "*fp32", "n": "i32"}
    register_kernel("tiny_add", _tiny_add, [
        KernelConfig("fp32-B1024", ADD_SIG, {"BLOCK": 1024}, num_warps=4),
        KernelConfig("fp32-B1024-again", dict(ADD_SIG), {"BLOCK": 1024}, num_warps=4),
        KernelConfig("fp32-B1024-w8", ADD_SIG, {"BLOCK": 1024}, num_warps=8)])
    register_kernel("tiny_dot", _tiny_dot, [
        KernelConfig("bf16-64x64x32", {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16",
                                       "K": "i32"}, {"BM": 64, "BN": 64, "BK": 32},
                     num_warps=4, num_stages=2, expect_hgmma=True)])
    register_kernel("tiny_broken", _tiny_broken, [
        KernelConfig("B3", {"x_ptr": "*fp32"}, {"BLOCK": 3})])
''')


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    mod = tmp_path / "tiny_kernels.py"
    if not mod.exists():
        mod.write_text(KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(TOOL), "--module", str(mod), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kr")
    r = _run(tmp, "--kernel", "tiny_add", "--kernel", "tiny_dot", "--json", "--progress")
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def good_rows(good_run):
    return [r for r in json.loads(good_run.stdout) if r["config"] in ("fp32-B1024", "bf16-64x64x32")]


def test_identical_configs_compile_once(good_run):
    """A config equal to an earlier one but for its name gets its own rows, built once; one
    that differs in a launch setting (num_warps) is compiled on its own."""
    rows = json.loads(good_run.stdout)
    assert len(rows) == 8  # (3 + 1 configs) x (sm_90, sm_80), in registry order
    assert [(r["kernel"], r["config"]) for r in rows[:6:2]] == [
        ("tiny_add", "fp32-B1024"), ("tiny_add", "fp32-B1024-again"), ("tiny_add", "fp32-B1024-w8")]
    # progress lines, one per compile (workers' lines may interleave: matched, not split)
    compiled = re.findall(r"\[kernel_report\] (\S+) (\S+) sm_(\d+)", good_run.stderr)
    assert sorted(compiled) == sorted((k, c, a) for k, c in [
        ("tiny_add", "fp32-B1024"), ("tiny_add", "fp32-B1024-w8"), ("tiny_dot", "bf16-64x64x32")]
        for a in ("90", "80"))
    by = {(r["config"], r["arch"]): r for r in rows}
    for arch in ("sm_90", "sm_80"):
        first, again, w8 = (by[(c, arch)] for c in ("fp32-B1024", "fp32-B1024-again", "fp32-B1024-w8"))
        assert again["same_build_as"] == "tiny_add [fp32-B1024]"
        assert first["same_build_as"] is None and w8["same_build_as"] is None
        assert {k: v for k, v in again.items() if k not in ("config", "same_build_as")} == \
            {k: v for k, v in first.items() if k not in ("config", "same_build_as")}
        assert w8["num_warps"] == 8 and first["num_warps"] == 4


def test_json_rows(good_rows):
    assert len(good_rows) == 4  # 2 kernels x 1 config x (sm_90, sm_80)
    for row in good_rows:
        for key in kernel_report.KEYS:
            assert key in row, key
        assert row["error"] is None
        assert isinstance(row["registers"], int) and 0 < row["registers"] <= 255
        assert row["spill_bytes"] >= 0 and row["shared_bytes"] >= 0
    by = {(r["kernel"], r["arch"]): r for r in good_rows}
    assert set(by) == {("tiny_add", "sm_90"), ("tiny_add", "sm_80"),
                       ("tiny_dot", "sm_90"), ("tiny_dot", "sm_80")}
    assert by[("tiny_add", "sm_90")]["config"] == "fp32-B1024"
    assert by[("tiny_add", "sm_90")]["hgmma"] is False
    assert by[("tiny_add", "sm_90")]["spill_bytes"] == 0
    assert by[("tiny_add", "sm_90")]["shared_bytes"] == 0
    # a bf16 tl.dot uses wgmma on Hopper and not on Ampere, and stages tiles in shared memory
    assert by[("tiny_dot", "sm_90")]["hgmma"] is True
    assert by[("tiny_dot", "sm_80")]["hgmma"] is False
    assert by[("tiny_dot", "sm_80")]["shared_bytes"] > 0


def test_table_and_strict(tmp_path):
    r = _run(tmp_path, "--kernel", "tiny_add", "--arch", "80", "--strict")
    assert r.returncode == 0, r.stderr
    assert "tiny_add" in r.stdout and "sm_80" in r.stdout and "regs" in r.stdout


def test_compile_failure_exits_nonzero(tmp_path):
    r = _run(tmp_path, "--kernel", "tiny_broken", "--arch", "90", "--json")
    assert r.returncode == 1
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["error"] and rows[0]["registers"] is None
    assert "compile failed" in r.stderr


UNREGISTERED = textwrap.dedent('''
    import triton
    import triton.language as tl
    from mythos_kernels import KernelConfig, register_kernel


    @triton.jit
    def _helper(x):
        return x * 2


    @triton.jit
    def _registered(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))


    @triton.jit
    def _forgotten(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


    register_kernel("tiny_registered", _registered,
                    [KernelConfig("B64", {"x_ptr": "*fp32"}, {"BLOCK": 64})])
''')


def test_unregistered_kernel_is_flagged(tmp_path):
    mod = tmp_path / "unregistered.py"
    mod.write_text(UNREGISTERED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(TOOL), "--module", str(mod), "--kernel", "tiny_registered",
           "--arch", "80"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr           # a warning only without --strict
    assert "_forgotten is a @triton.jit kernel that is not registered" in r.stderr
    assert "_helper" not in r.stderr              # called by a registered kernel
    r = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1 and "_forgotten: not registered" in r.stderr


def test_unknown_kernel_is_usage_error(tmp_path):
    r = _run(tmp_path, "--kernel", "no_such_kernel")
    assert r.returncode == 2 and "unknown kernel" in r.stderr


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function other:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function mm:
  REG:255 STACK:352 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert kernel_report.parse_resource_usage(text, "mm") == {
        "registers": 255, "stack": 352, "static_shared": 1024, "local": 0}
    assert kernel_report.parse_resource_usage(text)["registers"] == 12
    log = "ptxas info    : Used 40 registers, 16 bytes stack frame, 8 bytes spill stores, " \
          "4 bytes spill loads"
    assert kernel_report.parse_ptxas_log(log) == {"stack_frame": 16, "spill_stores": 8,
                                                 "spill_loads": 4}


def test_problems_flags_spills_and_missing_hgmma():
    rows = [dict(kernel="k", config="c", arch="sm_90", error=None, spill_bytes=64,
                 spill_stores=64, expect_hgmma=True, hgmma=False),
            dict(kernel="k", config="c", arch="sm_80", error=None, spill_bytes=0,
                 spill_stores=0, expect_hgmma=True, hgmma=False)]
    assert kernel_report.problems(rows, strict=False) == []
    msgs = kernel_report.problems(rows, strict=True)
    assert len(msgs) == 2 and "spills" in msgs[0] and "HGMMA" in msgs[1]
