"""What every result row carries: device name, versions, git commit, timestamp."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from mythos_kernels._env import env_str

REPO = Path(__file__).resolve().parent.parent


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo, keys lower-cased ({} where unreadable)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip() and fields:
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return (_cpuinfo().get("model name") or platform.processor() or platform.machine()
            or "cpu")


def cpu_id() -> str | None:
    """``"family F model M"`` from /proc/cpuinfo (the model name alone, e.g. "AMD EPYC", does not
    tell one host generation from another), or None where it is not there."""
    info = _cpuinfo()
    if "cpu family" not in info:
        return None
    return f"family {info['cpu family']} model {info.get('model', '?')}"


def device_name(device: torch.device | str) -> str:
    """Human name: ``torch.cuda.get_device_name`` on CUDA, ``"CPU <model>"`` on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}"


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(device: torch.device | str) -> str:
    """Folder name under ``bench/results/``: the GPU's slug, or ``"cpu"``."""
    device = torch.device(device)
    return slug(device_name(device)) if device.type == "cuda" else "cpu"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """``HEAD`` short hash (``+dirty`` when the tree has changes); ``$MYTHOS_COMMIT`` overrides."""
    env = env_str("MYTHOS_COMMIT", "")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                            capture_output=True, text=True, timeout=10)
        if st.returncode == 0 and st.stdout.strip():
            commit += "+dirty"
        return commit
    except Exception:
        return "unknown"


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_info(device: torch.device | str) -> dict:
    """The fields stamped on every result row."""
    device = torch.device(device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "timestamp": timestamp(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        # which host generation and vector ISA the CPU rows ran on (timings differ by host)
        "cpu_id": cpu_id() if device.type == "cpu" else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None,
        "host": platform.node(),
        "load_avg": load_avg(),
    }


def load_avg() -> float | None:
    """1-minute load average (a busy shared CPU makes CPU timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
