"""Device ceilings for "% of ceiling": measured copy bandwidth and matmul rate, cached per device.

A short calibration measures, once per device name (and CPU thread count):

* ``copy_gbps``     -- device-to-device copy ``dst.copy_(src)``, counted as read + write bytes;
* ``matmul_tflops`` -- square matmul rate per dtype (fp32 always; bf16/fp16 on CUDA), 2·n³ FLOPs;
  on a CPU the faster of MKL (``torch.mm``) and oneDNN (the op mythos's CPU products use), which
  differ by host (on AVX-512 hosts oneDNN's fp32 GEMM can be several times MKL's).

Results are cached in ``$MYTHOS_CACHE_DIR/ceilings.json`` (default ``~/.cache/mythos``) keyed by
device name, so every later run reuses them; ``python -m bench --recalibrate`` measures again.

The floor of an op is ``max(bytes / copy_bw, flops / matmul_rate[dtype])``; % of ceiling is
``100 * floor / measured_time``. The larger term names the bound ("memory" or "compute").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from mythos_kernels._env import env_str

from .devinfo import cpu_id, device_name

CACHE_VERSION = 2   # 2: the CPU rate is the faster of MKL and oneDNN; keyed by CPU id


def cache_path() -> Path:
    base = env_str("MYTHOS_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mythos"))
    return Path(base) / "ceilings.json"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _time(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return _median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _median(times)


def _best(fn, device, reps: int, rounds: int = 3) -> float:
    """Fastest of a few medians: a ceiling is the best the device does, not its average."""
    return min(_time(fn, device, reps) for _ in range(rounds))


def calibrate(device: torch.device | str = "cpu") -> dict:
    """Measure copy bandwidth and matmul rates on ``device`` (seconds on a GPU, ~2-5 s on a CPU)."""
    device = torch.device(device)
    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    # copy: 1 GiB per buffer on a GPU (far beyond L2), 64 MiB on a CPU (beyond LLC on small VMs)
    n = (256 << 20) if cuda else (16 << 20)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), device, reps=10 if cuda else 5)
    copy_gbps = 2 * n * 4 / t / 1e9
    src = dst = None  # free before the matmuls
    mm = {}
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if cuda else [])
    for dt in dtypes:
        size = 8192 if cuda else 1024
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        t = _best(lambda a=a, b=b: torch.mm(a, b), device, reps=10 if cuda else 3, rounds=2)
        if not cuda and dt == torch.float32:
            from mythos_kernels.cpu.linear import onednn_available, onednn_linear

            if onednn_available():
                bt = b.t().contiguous()       # oneDNN's linear takes the weight as [N, K]
                with torch.no_grad():
                    t = min(t, _best(lambda a=a, bt=bt: onednn_linear(a, bt), device, reps=3,
                                     rounds=2))
        mm[str(dt).replace("torch.", "")] = 2 * size ** 3 / t / 1e12
    if not cuda:
        # CPU bf16 matmul is often emulated and far slower: use fp32's rate as the compute ceiling
        # for every dtype on a CPU (a floor that is too low only makes the % look better, so say so)
        mm.setdefault("bfloat16", mm["float32"])
        mm.setdefault("float16", mm["float32"])
    if cuda:
        props = torch.cuda.get_device_properties(device)
        extra = {"l2_bytes": int(getattr(props, "L2_cache_size", 0) or 0),
                 "sms": props.multi_processor_count}
    else:
        extra = {"threads": torch.get_num_threads()}
    return {
        "version": CACHE_VERSION,
        "device": device_name(device),
        "copy_gbps": copy_gbps,
        "matmul_tflops": mm,
        "fp32_matmul_tf32": bool(cuda and torch.backends.cuda.matmul.allow_tf32),
        "calibrated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "calibration_s": round(time.perf_counter() - t_start, 2),
        "torch": torch.__version__,
        **extra,
    }


def _key(device: torch.device) -> str:
    name = device_name(device)
    if device.type == "cpu":
        cid = cpu_id()
        name += (f" ({cid})" if cid else "") + f" x{torch.get_num_threads()}t"
    return name


def get_ceilings(device: torch.device | str = "cpu", refresh: bool = False,
                 verbose: bool = True) -> dict:
    """Cached ceilings for ``device``; calibrate (and store) on first use or when ``refresh``."""
    device = torch.device(device)
    path = cache_path()
    key = _key(device)
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except Exception:
            data = {}
    entry = data.get(key)
    if entry is None or refresh or entry.get("version") != CACHE_VERSION:
        if verbose:
            print(f"[bench] calibrating ceilings for {key} (once; cached in {path}) ...",
                  file=__import__("sys").stderr, flush=True)
        entry = calibrate(device)
        data[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass
    return entry


def matmul_rate(ceil: dict, dtype: torch.dtype | str) -> float:
    """TFLOP/s ceiling for ``dtype`` (fp32's rate when that dtype was not measured)."""
    name = str(dtype).replace("torch.", "")
    rates = ceil["matmul_tflops"]
    return float(rates.get(name, rates.get("float32")))


def floor_seconds(nbytes: float | None, flops: float | None, ceil: dict,
                  dtype: torch.dtype | str) -> tuple[float | None, str | None]:
    """``(floor_s, bound)``: the larger of bytes/bandwidth and FLOPs/peak, and which one it was."""
    t_mem = nbytes / (ceil["copy_gbps"] * 1e9) if nbytes else 0.0
    t_cmp = flops / (matmul_rate(ceil, dtype) * 1e12) if flops else 0.0
    if not t_mem and not t_cmp:
        return None, None
    return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")
