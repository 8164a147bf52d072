"""The machine line every benchmark prints: processor, ISA, torch, threads, load (what the
kernel choice is keyed by: unimoe_ray.model.kernels.machine)."""

from __future__ import annotations

import os

from unimoe_ray.model import kernels


def machine_line() -> str:
    m = kernels.machine("cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"# machine: {m['device']} | ISA {m['isa']} | torch {m['torch']} | {m['threads']} threads | "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (uptime)"
    )
