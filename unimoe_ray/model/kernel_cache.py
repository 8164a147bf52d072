"""The machine a kernel choice is measured on, and the file the choices are cached in: one
entry per machine (processor, ISA, torch version, thread count; `machine_key`), one per expert
shape inside it (written by `model/autotune.py`).

Environment:
  UNIMOE_KERNEL_CACHE     the cache file (default $XDG_CACHE_HOME/unimoe_ray/kernels.json,
                          without XDG_CACHE_HOME ~/.cache/unimoe_ray/kernels.json).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch

ENV_CACHE = "UNIMOE_KERNEL_CACHE"
CACHE_VERSION = 2  # 2: the layer-level 'grouped' candidate


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ISA flags that change which GEMM kernels a BLAS runs.
_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
)


def _isa_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in _ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine(device: torch.device | str = "cpu") -> dict[str, str | int]:
    """What a kernel choice depends on: processor, ISA, torch version, thread count."""
    device = torch.device(device)
    info: dict[str, str | int] = {"torch": torch.__version__}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(device=props.name, capability=f"sm{props.major}{props.minor}", cuda=str(torch.version.cuda))
    else:
        info.update(
            device=_cpu_model(),
            isa=" ".join([torch.backends.cpu.get_cpu_capability(), *_isa_flags()]),
            threads=torch.get_num_threads(),
        )
    return info


def machine_key(device: torch.device | str = "cpu") -> str:
    return " | ".join(f"{k}={v}" for k, v in machine(device).items())


def cache_path() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unimoe_ray" / "kernels.json"


def read_cache(path: Path) -> dict:
    """{"version", "machines": {machine_key: {str(PlanKey): entry}}}; empty when the file is
    missing, unreadable (with a warning) or of another CACHE_VERSION."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": CACHE_VERSION, "machines": {}}
    except (OSError, ValueError) as e:
        warnings.warn(f"kernel cache {path} unreadable ({e}); measuring again and rewriting it")
        return {"version": CACHE_VERSION, "machines": {}}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("machines"), dict):
        return {"version": CACHE_VERSION, "machines": {}}
    return data


def write_cache(path: Path, mkey: str, entries: dict[str, dict]) -> None:
    """Merge into the file (other processes may have written other shapes meanwhile), atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path)
        data["machines"].setdefault(mkey, {}).update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the kernel cache {path} ({e}); the choice holds for this process only")
