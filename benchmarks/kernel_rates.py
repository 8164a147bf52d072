"""How fast this CPU's torch kernels read expert weights at decode sizes (issue 12): the rates
behind benchmarks/README.md's "why the targets stay out of reach" notes.

Each kernel reads (2F, D) gate+up matrices of distinct experts one after another — `--mb` of
them per weight dtype (past the caches; weights in huge pages, as the model's) — so weights come
from memory; the rate is weight bytes ÷ time (best of `--rounds`), beside one fp32 `sum` over
a whole buffer (the read roofline, whatever the dtype: bytes are bytes). Rows:

- fp32 x·Wᵀ (`torch.mm(x, W.t())`, nn.Linear's form) and W·xᵀ (`torch.mm(W, x.t())`);
- bf16 x·Wᵀ and, where oneDNN is built in, bf16 prepacked (`mkldnn._linear_pointwise`);
- int8 weight-only `torch._weight_int8pack_mm` (fp32 and bf16 activations), `torch._int_mm`
  (int8 activations), oneDNN's prepacked W8A8 `onednn.qlinear_pointwise`, and a plain int8 →
  fp32 `copy_` (the dequantisation a weight-only kernel must do).

    .venv/bin/python benchmarks/kernel_rates.py [--threads 2] [--rows 2] [--mb 512]

Shape legend: F expert FFN dim, D model dim, M activation rows.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from machine import machine_line  # benchmarks/machine.py

from unimoe_ray.model import hugepages


def rate(fn: Callable[[int], object], calls: int, nbytes: int, rounds: int) -> float:
    """GB/s: `nbytes` read by `calls` calls, best round."""
    fn(0)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for e in range(calls):
            fn(e)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2, help="activation rows M (a guided request: 2)")
    ap.add_argument("--mb", type=int, default=512, help="weights per dtype (past the caches)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1376)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    D, F2, M = args.dim, 2 * args.hidden, args.rows
    E32, E16, E8 = (max(2, args.mb * 2**20 // (F2 * D * elem)) for elem in (4, 2, 1))

    holder = torch.nn.Module()
    gen = torch.Generator().manual_seed(0)
    holder.w32 = torch.nn.Parameter(torch.randn(E32, F2, D, generator=gen) * 0.02, requires_grad=False)
    holder.wbf = torch.nn.Parameter((torch.randn(E16, F2, D, generator=gen) * 0.02).bfloat16(), requires_grad=False)
    holder.w8 = torch.nn.Parameter(
        torch.randint(-127, 128, (E8, F2, D), dtype=torch.int8, generator=gen), requires_grad=False
    )
    hugepages.move_to_hugepages(holder)
    w32, wbf, w8 = holder.w32.data, holder.wbf.data, holder.w8.data
    scale = torch.rand(F2, generator=gen) * 0.01 + 1e-3
    x32 = torch.randn(M, D, generator=gen)
    xbf, xi8 = x32.bfloat16(), torch.randint(-127, 128, (M, D), dtype=torch.int8, generator=gen)
    buf = torch.empty(F2, D)

    # (name, experts, calls, fn(e)); the roofline rows read the whole buffer in one call.
    rows: list[tuple[str, int, int, Callable[[int], object]]] = [
        ("fp32 sum (read roofline)", E32, 1, lambda e: w32.sum()),
        ("fp32 x·Wᵀ", E32, E32, lambda e: torch.mm(x32, w32[e].t())),
        ("fp32 W·xᵀ", E32, E32, lambda e: torch.mm(w32[e], x32.t())),
        ("bf16 x·Wᵀ", E16, E16, lambda e: torch.mm(xbf, wbf[e].t())),
        ("bf16 W·xᵀ", E16, E16, lambda e: torch.mm(wbf[e], xbf.t())),
        ("int8 _weight_int8pack_mm, fp32 act", E8, E8, lambda e: torch._weight_int8pack_mm(x32, w8[e], scale)),
        (
            "int8 _weight_int8pack_mm, bf16 act",
            E8,
            E8,
            lambda e: torch._weight_int8pack_mm(xbf, w8[e], scale.bfloat16()),
        ),
        ("int8 _int_mm (int8 act)", E8, E8, lambda e: torch._int_mm(xi8, w8[e].t())),
        ("int8 -> fp32 copy_ (dequantise)", E8, E8, lambda e: buf.copy_(w8[e])),
    ]
    if torch.backends.mkldnn.is_available():
        try:
            packed_bf = [torch.ops.mkldnn._reorder_linear_weight(wbf[e], M) for e in range(E16)]
            rows.append(
                (
                    "bf16 oneDNN prepacked",
                    E16,
                    E16,
                    lambda e: torch.ops.mkldnn._linear_pointwise(xbf, packed_bf[e], None, "none", [], ""),
                )
            )
            packed_i8 = [torch.ops.onednn.qlinear_prepack(w8[e], [M, D]) for e in range(E8)]
            zero = torch.zeros(F2, dtype=torch.long)
            rows.append(
                (
                    "int8 oneDNN qlinear W8A8 (int8 act)",
                    E8,
                    E8,
                    lambda e: torch.ops.onednn.qlinear_pointwise(
                        xi8, 1.0, 0, packed_i8[e], scale, zero, None, 1.0, 0, torch.float32, "none", [], ""
                    ),
                )
            )
        except (RuntimeError, AttributeError) as exc:  # an op this build lacks: say so, time the rest
            print(f"# oneDNN prepacked kernels unavailable: {exc}")
    print(
        f"# ({F2}, {D}) expert weights, {args.mb} MiB per dtype ({E32} fp32 / {E16} bf16 / {E8} int8 "
        f"experts), {M} activation rows, {args.threads} threads, huge pages {hugepages.mode() or 'unknown'}"
    )
    print(f"{'kernel':40s} {'GB/s':>7s} {'µs/expert':>10s}")
    with torch.inference_mode():
        for name, experts, calls, fn in rows:
            w = w32 if name.startswith("fp32") else wbf if name.startswith("bf16") else w8
            nbytes = w.numel() * w.element_size()
            gbs = rate(fn, calls, nbytes, args.rounds)
            per_expert = nbytes / experts / gbs / 1e3
            print(f"{name:40s} {gbs:7.1f} {per_expert:10.1f}", flush=True)
    print(machine_line())


if __name__ == "__main__":
    main()
