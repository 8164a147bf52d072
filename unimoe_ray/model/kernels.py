"""Expert GEMM kernels: the ways this project knows to run one SwiGLU expert,
down(silu(gate·x) * up·x), without autograd, each computing the same function.

Why several: which formulation is fastest at a few tokens depends on the BLAS and the CPU. On 2
AVX2 cores of an AMD EPYC, MKL read expert weights 1.5-2x faster as W·xᵀ (weights as the left
operand) than as nn.Linear's x·Wᵀ, and wanted the token columns in multiples of 8; on 2 AVX-512
cores of an Intel Xeon with the same torch build, W·xᵀ is ~2.5x *slower* than x·Wᵀ at 1-3
tokens (benchmarks/README.md, issue 12). Constants tuned on one box lost 2x on the other. So the
candidates (CANDIDATES) live here, the choice per expert shape and token count in
`model/kernel_plans.py`, the measurement that makes it in `model/autotune.py`, and the machine
fingerprint and cache it is kept under in `model/kernel_cache.py`.

Shape legend: n tokens, c token columns after padding, D model dim, F expert FFN dim.
"""

from __future__ import annotations

import functools
import itertools
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Above this many tokens the x·Wᵀ kernels go through in row blocks with one reused gate/up
# buffer: GEMMs of ~1k rows already run at full speed, and the buffers stay in the heap and
# the cache where whole-expert (n × F) temporaries are fresh mmap'd pages every call.
BLOCK_TOKENS = 1024


# ---------------------------------------------------------------- weights in kernel form


@dataclass(frozen=True)
class PlanKey:
    """What a kernel choice is made per: the weights' device type, dtype and shape."""

    device: str
    dtype: str
    dim: int
    hidden: int

    def __str__(self) -> str:
        return f"{self.device}|{self.dtype}|{self.dim}x{self.hidden}"


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """One SwiGLU expert's weights as the kernels take them.

    dtype: the stored weight dtype, "fp32" | "bf16" | "fp16" | "int8" (activations in and out stay in
    the caller's dtype). gate_FD, up_FD, down_DF: the matrices (int8: the quantised values).
    gate_up_2FD: gate rows then up rows as one matrix when they are adjacent in memory (one
    GEMM computes both), else None. int8 only: per-output-channel scales (w ≈ q · scale),
    scale_gate_up_2F and scale_down_D, fp32, and the same in bf16 for the bf16-activation kernel.
    """

    dtype: str
    gate_FD: torch.Tensor
    up_FD: torch.Tensor
    down_DF: torch.Tensor
    gate_up_2FD: torch.Tensor | None = None
    scale_gate_up_2F: torch.Tensor | None = None
    scale_down_D: torch.Tensor | None = None
    scale_gate_up_bf16_2F: torch.Tensor | None = None
    scale_down_bf16_D: torch.Tensor | None = None

    @property
    def hidden(self) -> int:
        return self.gate_FD.shape[0]

    @property
    def dim(self) -> int:
        return self.gate_FD.shape[1]

    @functools.cached_property
    def key(self) -> PlanKey:
        # Cached: swiglu looks the plan up on every expert call (a frozen dataclass still has
        # the instance __dict__ that cached_property writes to).
        return PlanKey(self.gate_FD.device.type, self.dtype, self.dim, self.hidden)

    @functools.cached_property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(gate_DF, up_DF, gate_up_D2F, down_FD): the x·Wᵀ kernels' right operands, views made
        once (a `.t()` per GEMM per call was ~3 small ops per expert per step)."""
        gu = self.gate_up_2FD
        return self.gate_FD.t(), self.up_FD.t(), None if gu is None else gu.t(), self.down_DF.t()

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads from memory: the weights and their scales."""
        total = sum(t.numel() * t.element_size() for t in (self.gate_FD, self.up_FD, self.down_DF))
        for s in (self.scale_gate_up_2F, self.scale_down_D):
            total += 0 if s is None else s.numel() * s.element_size()
        return total


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}
    if dtype not in names:
        raise ValueError(
            f"expert weights in {dtype} have no kernels: use float32, bfloat16, float16 or int8 "
            "(unimoe_ray.model.quantize.convert_experts)"
        )
    return names[dtype]


def follows_in_memory(tensors) -> bool:
    """Whether each tensor is contiguous and starts where the previous one ends (same dtype,
    device and trailing shape): then one view spans them all (`adjacent_rows`,
    `stacked_views`, attention's fused q/k/v)."""
    first = tensors[0]
    end = first.data_ptr()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.shape[1:] != first.shape[1:]
            or t.data_ptr() != end
        ):
            return False
        end += t.numel() * t.element_size()
    return True


def adjacent_rows(a_FD: torch.Tensor, b_FD: torch.Tensor) -> torch.Tensor | None:
    """[a; b] as one (2F, D) view when b directly follows a in memory, else None."""
    if a_FD.shape != b_FD.shape or not follows_in_memory((a_FD, b_FD)):
        return None
    F_, D = a_FD.shape
    return a_FD.as_strided((2 * F_, D), (D, 1))


def float_weights(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor) -> ExpertWeights:
    return ExpertWeights(
        dtype=dtype_name(gate_FD.dtype),
        gate_FD=gate_FD,
        up_FD=up_FD,
        down_DF=down_DF,
        gate_up_2FD=adjacent_rows(gate_FD, up_FD),
    )


# ---------------------------------------------------------------- scratch buffers


_SCRATCH = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer reused across calls and experts (same name, shape, dtype, device):
    the dequantised weights of one expert at a time, never a fresh allocation per call."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    key = (name, shape, dtype, device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


# ---------------------------------------------------------------- the candidates


def _out(x_nD: torch.Tensor, out_nD: torch.Tensor | None, dim: int) -> torch.Tensor:
    return x_nD.new_empty(x_nD.shape[0], dim) if out_nD is None else out_nD


def _xwt_chain(
    x_nD: torch.Tensor, gate_DF, up_DF, gate_up_D2F, down_FD, out_nD: torch.Tensor | None, *, fused: bool
) -> torch.Tensor:
    """x·Wᵀ GEMMs (nn.Linear's form) in row blocks of about BLOCK_TOKENS; the GEMMs run in the
    weights' dtype (x is cast), the result is written in x's. Takes the weights' transposed
    views (`ExpertWeights.transposed`: made once per expert, not per call)."""
    n, hidden, dim = x_nD.shape[0], gate_DF.shape[1], down_FD.shape[1]
    out_nD = _out(x_nD, out_nD, dim)
    wdt = gate_DF.dtype
    if n <= BLOCK_TOKENS and x_nD.dtype == wdt == out_nD.dtype:
        # One block (every decode step): no buffers to reuse, no views to cut.
        if fused:
            h_n2F = torch.mm(x_nD, gate_up_D2F)
            a_nF = F.silu(h_n2F[:, :hidden], inplace=True).mul_(h_n2F[:, hidden:])
        else:
            a_nF = F.silu(torch.mm(x_nD, gate_DF), inplace=True).mul_(torch.mm(x_nD, up_DF))
        return torch.mm(a_nF, down_FD, out=out_nD)
    num_blocks = max(1, -(-n // BLOCK_TOKENS))
    rows = max(1, -(-n // num_blocks))
    # fused: one (rows, 2F) buffer, gate and up its column halves; else two (rows, F) buffers
    # (a GEMM into a strided `out` would go through a temporary).
    h_b2F = x_nD.new_empty(rows, 2 * hidden if fused else hidden, dtype=wdt)
    u_bF = None if fused else x_nD.new_empty(rows, hidden, dtype=wdt)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        xb = x_nD[start:stop].to(wdt)
        if fused:
            h = torch.mm(xb, gate_up_D2F, out=h_b2F[: stop - start])
            g, u = h[:, :hidden], h[:, hidden:]
        else:
            g = torch.mm(xb, gate_DF, out=h_b2F[: stop - start])
            u = torch.mm(xb, up_DF, out=u_bF[: stop - start])
        a = F.silu(g, inplace=True).mul_(u)
        if wdt == out_nD.dtype:
            torch.mm(a, down_FD, out=out_nD[start:stop])
        else:
            out_nD[start:stop].copy_(torch.mm(a, down_FD))
    return out_nD


def _wxt_chain(
    x_nD: torch.Tensor, gate_FD, up_FD, gate_up_2FD, down_DF, out_nD: torch.Tensor | None, *, pad: int, fused: bool
) -> torch.Tensor:
    """W·xᵀ GEMMs (weights as the left operand, feature-major intermediates) on the token
    columns zero-padded to a multiple of `pad` (pad 1: none); padding columns are dropped."""
    n, hidden, dim = x_nD.shape[0], gate_FD.shape[0], down_DF.shape[0]
    wdt = gate_FD.dtype
    cols = -(-n // pad) * pad
    if cols != n or x_nD.dtype != wdt:
        x_cD = x_nD.new_zeros(cols, x_nD.shape[1], dtype=wdt)
        x_cD[:n] = x_nD
    else:
        x_cD = x_nD
    x_Dc = x_cD.t()
    if fused:
        h_2Fc = torch.mm(gate_up_2FD, x_Dc)
        g_Fc, u_Fc = h_2Fc[:hidden], h_2Fc[hidden:]
    else:
        g_Fc, u_Fc = torch.mm(gate_FD, x_Dc), torch.mm(up_FD, x_Dc)
    # The down GEMM is fast with the activations token-major (their transpose as the right
    # operand): the elementwise product is written transposed.
    a_cF = torch.empty(cols, hidden, dtype=wdt, device=x_nD.device)
    torch.mul(F.silu(g_Fc, inplace=True), u_Fc, out=a_cF.t())
    y_nD = torch.mm(down_DF, a_cF.t()).t()[:n]
    return _out(x_nD, out_nD, dim).copy_(y_nD)


def xwt(x_nD, w: ExpertWeights, out_nD=None):
    gate_DF, up_DF, _, down_FD = w.transposed
    return _xwt_chain(x_nD, gate_DF, up_DF, None, down_FD, out_nD, fused=False)


def xwt_fused(x_nD, w: ExpertWeights, out_nD=None):
    # Weights whose gate and up are no longer adjacent (a copied or reloaded module under a
    # plan measured on fused ones) take the two-GEMM form.
    fused = w.gate_up_2FD is not None
    gate_DF, up_DF, gate_up_D2F, down_FD = w.transposed
    return _xwt_chain(x_nD, gate_DF, up_DF, gate_up_D2F, down_FD, out_nD, fused=fused)


def wxt(x_nD, w: ExpertWeights, out_nD=None):
    return _wxt_chain(x_nD, w.gate_FD, w.up_FD, None, w.down_DF, out_nD, pad=1, fused=False)


def wxt_pad2(x_nD, w: ExpertWeights, out_nD=None):
    # 2 columns: MKL runs a single column as a GEMV on one thread; two use every core.
    return _wxt_chain(x_nD, w.gate_FD, w.up_FD, None, w.down_DF, out_nD, pad=2, fused=False)


def wxt_pad8(x_nD, w: ExpertWeights, out_nD=None):
    # MKL's AVX2 kernels take columns 8 at a time; other counts can run 10-40% slower there.
    return _wxt_chain(x_nD, w.gate_FD, w.up_FD, None, w.down_DF, out_nD, pad=8, fused=False)


def wxt_fused(x_nD, w: ExpertWeights, out_nD=None):
    fused = w.gate_up_2FD is not None
    return _wxt_chain(x_nD, w.gate_FD, w.up_FD, w.gate_up_2FD, w.down_DF, out_nD, pad=2, fused=fused)


def _dequantised(w: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert's weights as fp32, in two per-thread buffers reused by every expert of this
    shape (one expert's worth of fp32, not the model's)."""
    dev = w.gate_FD.device
    gu = scratch("gate_up", (2 * w.hidden, w.dim), torch.float32, dev)
    dn = scratch("down", (w.dim, w.hidden), torch.float32, dev)
    if w.dtype == "int8":
        gu[: w.hidden].copy_(w.gate_FD)
        gu[w.hidden :].copy_(w.up_FD)
        gu.mul_(w.scale_gate_up_2F[:, None])
        torch.mul(w.down_DF, w.scale_down_D[:, None], out=dn)
    else:
        gu[: w.hidden].copy_(w.gate_FD)
        gu[w.hidden :].copy_(w.up_FD)
        dn.copy_(w.down_DF)
    return gu, dn


def upcast(x_nD, w: ExpertWeights, out_nD=None):
    """Dequantise into reused fp32 buffers, then the fp32 x·Wᵀ chain (one fused GEMM)."""
    gu, dn = _dequantised(w)
    return _xwt_chain(x_nD, gu[: w.hidden].t(), gu[w.hidden :].t(), gu.t(), dn.t(), out_nD, fused=True)


def _int8_swiglu(xa_nD: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """torch's int8 weight-only matmul (x · (q·scale)ᵀ, int8 weights dequantised inside the
    kernel) on activations already in their kernel dtype (fp32 or bf16, contiguous); y in it."""
    hidden = w.hidden
    s_gu, s_d = (
        (w.scale_gate_up_2F, w.scale_down_D)
        if xa_nD.dtype == torch.float32
        else (w.scale_gate_up_bf16_2F, w.scale_down_bf16_D)
    )
    h_n2F = torch._weight_int8pack_mm(xa_nD, w.gate_up_2FD, s_gu)
    a_nF = torch.mul(F.silu(h_n2F[:, :hidden], inplace=True), h_n2F[:, hidden:])
    return torch._weight_int8pack_mm(a_nF, w.down_DF, s_d)


def _int8_chain(x_nD, w: ExpertWeights, out_nD, act_dtype: torch.dtype):
    """`_int8_swiglu` with activations in `act_dtype`, the result in x's dtype."""
    y_nD = _int8_swiglu(x_nD.to(act_dtype).contiguous(), w)
    if out_nD is None:
        return y_nD if y_nD.dtype == x_nD.dtype else y_nD.to(x_nD.dtype)
    return out_nD.copy_(y_nD)


def int8_mm(x_nD, w: ExpertWeights, out_nD=None):
    return _int8_chain(x_nD, w, out_nD, torch.float32)


def int8_mm_bf16(x_nD, w: ExpertWeights, out_nD=None):
    return _int8_chain(x_nD, w, out_nD, torch.bfloat16)


# ---------------------------------------------------------------- a layer's experts at once


def int8_layer(ws, x_ND: torch.Tensor, counts, act_dtype: torch.dtype) -> torch.Tensor:
    """A layer's int8 experts (`ws`, one per count) on their rows of x_ND with torch's int8
    weight-only matmul: `_int8_swiglu` per expert, activations cast to `act_dtype` once for the
    layer and the outputs cast back once (each expert's cast would be ~4 small ops more per
    expert per step)."""
    xa_ND = x_ND.to(act_dtype).contiguous()
    ys, start = [], 0
    for w, n in zip(ws, counts):
        if n:
            ys.append(_int8_swiglu(xa_ND[start : start + n], w))
            start += n
    return torch.cat(ys).to(x_ND.dtype)


def stacked_views(ws) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate_up_E2FD, down_EDF) views over these experts' weights when they lie stacked in
    memory in this order (`experts.stack_experts`), else None."""
    if ws[0].dtype not in FLOAT or any(w.gate_up_2FD is None for w in ws):
        return None
    views = []
    for ts in ([w.gate_up_2FD for w in ws], [w.down_DF for w in ws]):
        if any(t.shape != ts[0].shape for t in ts) or not follows_in_memory(ts):
            return None
        views.append(ts[0].as_strided((len(ts), *ts[0].shape), (ts[0].numel(), *ts[0].stride())))
    return views[0], views[1]


def grouped_swiglu(gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, x_ND: torch.Tensor, counts) -> torch.Tensor:
    """Every expert of a layer on its own rows of x_ND (expert 0's counts[0] rows, then expert
    1's, ...), weights stacked (`experts.stack_experts`): two torch._grouped_mm calls in all
    instead of a Python loop of ~8 small ops per active expert — which at decode sizes cost as
    much as the GEMMs. The same GEMMs as `xwt` per expert (bit-equal at the `small` model's
    shapes here; the BLAS may sum in another order at other shapes); y has x's dtype."""
    hidden = down_EDF.shape[2]
    offs_E = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_ND.device)
    h_N2F = torch._grouped_mm(x_ND.to(gate_up_E2FD.dtype), gate_up_E2FD.transpose(1, 2), offs=offs_E)
    a_NF = torch.mul(F.silu(h_N2F[:, :hidden], inplace=True), h_N2F[:, hidden:])
    y_ND = torch._grouped_mm(a_NF, down_EDF.transpose(1, 2), offs=offs_E)
    return y_ND.to(x_ND.dtype)


@dataclass(frozen=True)
class Candidate:
    name: str
    fn: Callable[..., torch.Tensor]
    dtypes: tuple[str, ...]  # weight dtypes it runs
    needs_fused: bool = False  # needs gate_up_2FD (gate and up adjacent in memory)
    doc: str = ""
    k_multiple: int = 1  # both GEMMs' inner dims (D and F) must be multiples of this

    def applies(self, w: ExpertWeights) -> bool:
        return (
            w.dtype in self.dtypes
            and (w.gate_up_2FD is not None or not self.needs_fused)
            and w.dim % self.k_multiple == 0
            and w.hidden % self.k_multiple == 0
        )


FLOAT = ("fp32", "bf16", "fp16")  # weights the float GEMM chains take as they are
CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate("xwt", xwt, FLOAT, doc="x·Wᵀ, gate and up as two GEMMs (nn.Linear's form)"),
        Candidate("xwt_fused", xwt_fused, FLOAT, True, "x·Wᵀ, one GEMM for gate and up"),
        Candidate("wxt", wxt, FLOAT, doc="W·xᵀ, token columns unpadded"),
        Candidate("wxt_pad2", wxt_pad2, FLOAT, doc="W·xᵀ, token columns padded to even"),
        Candidate("wxt_pad8", wxt_pad8, FLOAT, doc="W·xᵀ, token columns padded to a multiple of 8"),
        Candidate("wxt_fused", wxt_fused, FLOAT, True, "W·xᵀ, one GEMM for gate and up, even columns"),
        Candidate("upcast", upcast, ("bf16", "fp16", "int8"), doc="dequantise into a reused fp32 buffer, fp32 x·Wᵀ"),
        # A layer-level candidate: `autotune.measure` times all of a layer's stacked experts in one
        # `grouped_swiglu` call (per expert: the call ÷ experts); where it wins, `LocalExperts` runs
        # the layer that way. An expert called on its own under it runs xwt_fused (same GEMMs).
        Candidate("grouped", xwt_fused, FLOAT, True, "a layer's experts in two torch._grouped_mm calls (x·Wᵀ)"),
        Candidate("int8_mm", int8_mm, ("int8",), True, "torch._weight_int8pack_mm, fp32 activations"),
        # torch 2.13's CPU kernel for bf16 activations crashes or returns wrong values unless the
        # inner dim is a multiple of 16 (probed on AVX-512: K = 8, 24, 40, 56, 72 fail; 16, 32,
        # 48, 64, 80, 96, 688, 1376 pass); fp32 activations take any K.
        Candidate("int8_mm_bf16", int8_mm_bf16, ("int8",), True, "torch._weight_int8pack_mm, bf16 activations", 16),
    )
}

# The formulation each weight dtype runs without a measured choice (UNIMOE_KERNELS=default, or
# no `select` call): nn.Linear's x·Wᵀ; for int8 the dequantise-then-fp32 kernel, which takes
# any shape on any device and is the int8 weights' exact value in fp32 arithmetic (torch's own
# int8 matmul with fp32 activations measured 4-40x slower than it on an AVX-512 Xeon, the
# bf16-activation one rounds activations; `autotune.select` picks either where it is faster).
DEFAULT = {"fp32": "xwt", "bf16": "xwt", "fp16": "xwt", "int8": "upcast"}
