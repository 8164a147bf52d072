"""The machine line every benchmark prints: processor, ISA, torch, threads, load (what the
kernel choice is keyed by: unimoe_ray.model.kernel_cache.machine)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from unimoe_ray.model import kernel_cache

if TYPE_CHECKING:  # torch is imported where the probe is built, not when the line is printed
    import torch


def machine_line() -> str:
    m = kernel_cache.machine("cpu")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"# machine: {m['device']} | ISA {m['isa']} | torch {m['torch']} | {m['threads']} threads | "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (uptime)"
    )


def read_probe(nbytes: int = 1 << 30) -> "torch.Tensor":
    """A float32 buffer of `nbytes` (1 GiB: larger than any last-level cache we met; this VM's
    L3 is 480 MiB) for the read-bandwidth probe (`buf.sum()`), in huge pages like the model's
    weights (unimoe_ray.model.hugepages) so that the roofline is the bandwidth they can get."""
    import torch

    from unimoe_ray.model import hugepages

    if hugepages.available():
        buf = hugepages.empty(nbytes).view(torch.float32)
        buf.fill_(1.0)
        return buf
    return torch.ones(nbytes // 4)
