"""Inference weights in huge pages (Linux transparent huge pages), on CPU.

A decode step streams every touched weight from memory once and does little arithmetic on it,
so its time is bytes ÷ the bandwidth the core actually gets. With 4 KiB pages a step of the
`small` model touches ~130k pages, far more than the TLB holds: every page costs a page-table
walk, and the GEMV kernels stall on them. Weights in 2 MiB pages need 512x fewer translations.
torch's CPU allocator asks for huge pages only when THP_MEM_ALLOC_ENABLE=1 is set before its
first allocation, and then for activations too; this module instead moves a loaded model's
weights into 2 MiB-aligned anonymous mappings advised MADV_HUGEPAGE, which the kernel backs
with huge pages where transparent huge pages are "always" or "madvise" (the common default).
Measured on the 2-core Xeon of benchmarks/README.md (issue 12): 8 layers of expert weights
read by x·Wᵀ at 2 tokens went 59 → 35 ms on one thread.

Tensors that share a storage (gate and up fused into one buffer, views) keep sharing it: a
storage moves whole and every tensor on it becomes the same view of the new one. Parameters
keep their identity (`.data` is swapped). Off Linux, without THP, or with UNIMOE_HUGEPAGES=0,
nothing moves.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from pathlib import Path

import torch
from torch import nn

ENV = "UNIMOE_HUGEPAGES"
HUGE_PAGE = 2 << 20
# Storages smaller than this stay where they are (norm weights, biases: no TLB pressure).
MIN_BYTES = 64 << 10
# One mapping per this many bytes of storages: the old copies are freed chunk by chunk, so the
# move needs at most this much memory on top of the model.
CHUNK_BYTES = 256 << 20
_ALIGN = 64
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Storage pointers of the live mappings made here: their tensors are not moved again.
_MAPPINGS: set[int] = set()


def mode() -> str:
    """ "[always]", "[madvise]" or "[never]" as the kernel reports it; "" where unknown."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return ""
    return next((w for w in text.split() if w.startswith("[")), "")


def available() -> bool:
    """Whether moving weights can give them huge pages here (Linux with THP not off; the
    UNIMOE_HUGEPAGES switch not 0)."""
    flag = os.environ.get(ENV, "1").strip().lower()
    if flag not in ("0", "1", "", "on", "off", "true", "false"):
        raise ValueError(f"{ENV}={flag!r}: use 1 (weights in huge pages where the OS has them) or 0 (off)")
    if flag in ("0", "off", "false"):
        return False
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and mode() != "[never]"


def empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` at a 2 MiB boundary, advised for huge pages. The mapping
    lives as long as any tensor on it."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP: ordinary pages, still aligned
        pass
    buf = torch.frombuffer(m, dtype=torch.uint8)
    _MAPPINGS.add(buf.data_ptr())
    weakref.finalize(m, _MAPPINGS.discard, buf.data_ptr())
    start = (-buf.data_ptr()) % HUGE_PAGE
    return buf[start : start + nbytes]


def _slots(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """(owner dict, name, tensor) of every CPU parameter and buffer, each once."""
    seen: set[int] = set()
    out = []
    for m in module.modules():
        for owner in (m._parameters, m._buffers):
            for name, t in owner.items():
                if t is None or t.device.type != "cpu" or id(t) in seen:
                    continue
                seen.add(id(t))
                out.append((owner, name, t))
    return out


def move_to_hugepages(module: nn.Module) -> int:
    """Move `module`'s CPU weights (storages of at least MIN_BYTES) into huge-page mappings, in
    place; storages already moved stay. Returns the bytes moved (0 where huge pages are not
    available)."""
    if not available():
        return 0
    for m in module.modules():
        if getattr(m, "_packed", None) is not None:
            m._packed = None  # kernel-form views of the old storages (rebuilt on the next call)
    by_storage: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}
    storages: dict[int, torch.UntypedStorage] = {}
    for owner, name, t in _slots(module):
        st = t.untyped_storage()
        if st.nbytes() < MIN_BYTES or st.data_ptr() in _MAPPINGS:
            continue
        by_storage.setdefault(st.data_ptr(), []).append((owner, name, t))
        storages[st.data_ptr()] = st
    keys = list(by_storage)
    moved = 0
    with torch.no_grad():
        while keys:
            chunk, size = [], 0
            while keys and (not chunk or size + storages[keys[0]].nbytes() <= CHUNK_BYTES):
                key = keys.pop(0)
                chunk.append((key, size))
                size += -(-storages[key].nbytes() // _ALIGN) * _ALIGN
            arena = empty(size)
            for key, offset in chunk:
                old = storages.pop(key)
                nbytes = old.nbytes()
                region = arena[offset : offset + nbytes]
                region.copy_(torch.empty(0, dtype=torch.uint8).set_(old, 0, (nbytes,), (1,)))
                new_storage = region.untyped_storage()
                base = region.storage_offset()  # bytes from the mapping's start
                for owner, name, t in by_storage.pop(key):
                    elem = t.element_size()
                    view = torch.empty(0, dtype=t.dtype).set_(
                        new_storage, base // elem + t.storage_offset(), t.shape, t.stride()
                    )
                    if isinstance(t, nn.Parameter):
                        t.data = view
                    else:
                        owner[name] = view
                moved += nbytes
                del old
    return moved


def huge_bytes() -> int:
    """AnonHugePages of this machine in bytes (/proc/meminfo), for reports; -1 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1
