"""What travels between the trunk and an expert actor in one token exchange.

Hidden states travel as host-memory bytes, in one of two forms chosen by size:

- small (≤ ExpertParallelConfig.inband_max_bytes, 1 MiB by default: every decode step): one
  raw `bytes` object, a 9-byte header (layer, dtype, row width) then the rows. Ray passes
  `bytes` through its serializer untouched (~1 µs), where a numpy array or a dataclass goes
  through pickle and msgpack (60-120 µs per message measured with Ray's serialization context
  here), and that fixed cost is paid four times per exchange (call and reply, each side) on
  every layer of every decode step.
- large (prefill): an `ExpertCall` holding a numpy byte view. Ray moves numpy arrays as
  out-of-band pickle-5 buffers (one copy into the shared-memory channel or object store, a
  zero-copy view on the reader), while Compiled Graphs' CPU torch-tensor path copies again on
  read (about 5x slower in one measurement here: 8 actors, 16k x 512 fp32 per exchange). A
  byte view also carries bf16, which numpy lacks.

Shape legend: n tokens of one replica, D model dim.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

# Readers get read-only views of the channel buffer; torch warns when wrapping them. Expert
# code only reads its input, so the warning is noise (filtered once per expert process).
READONLY_WARNING = "The given NumPy array is not writable"

# Default of ExpertParallelConfig.inband_max_bytes: up to this many bytes a message is copied
# into one `bytes` object (a 1 MiB copy is ~50 µs, the serializer overhead it saves); above,
# the zero-copy numpy form wins.
INBAND_MAX_BYTES = 1 << 20
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
_HEADER = struct.Struct("<iBI")  # layer index, dtype code, bytes per row


@dataclass(frozen=True)
class ExpertCall:
    """One replica's share of one layer's exchange: rows x_nD of `dtype` as raw bytes."""

    layer_idx: int
    x_bytes: np.ndarray  # (n, D * itemsize) uint8
    dtype: torch.dtype


def pack(x_nD: torch.Tensor) -> np.ndarray:
    """x_nD → (n, D·itemsize) uint8 host view (a copy only when not already contiguous CPU)."""
    return x_nD.detach().to("cpu").contiguous().view(torch.uint8).numpy()


def unpack(x_bytes: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `pack`, zero-copy: a (n, D) tensor viewing the same memory."""
    return torch.from_numpy(x_bytes).view(dtype)


def encode_call(layer_idx: int, rows: np.ndarray, dtype: torch.dtype, inband_max_bytes: int) -> bytes | ExpertCall:
    """One replica's message for `rows` ((n, D·itemsize) uint8, as from `pack`): raw bytes up
    to `inband_max_bytes`, else an ExpertCall. The expert replies in the same form."""
    code = _CODE.get(dtype)
    if code is not None and rows.nbytes <= inband_max_bytes:
        return _HEADER.pack(layer_idx, code, rows.shape[1]) + rows.tobytes()
    return ExpertCall(layer_idx, rows, dtype)


def decode_call(msg: bytes | ExpertCall) -> tuple[int, torch.Tensor]:
    """(layer index, x_nD) of a message from `encode_call`; x_nD views the message's memory."""
    if isinstance(msg, ExpertCall):
        return msg.layer_idx, unpack(msg.x_bytes, msg.dtype)
    layer_idx, code, row_bytes = _HEADER.unpack_from(msg)
    rows = np.frombuffer(msg, dtype=np.uint8, offset=_HEADER.size).reshape(-1, row_bytes)
    return layer_idx, unpack(rows, _DTYPES[code])


def encode_reply(y_nD: torch.Tensor, inband: bool) -> bytes | np.ndarray:
    """An expert's output rows, in the form of the call they answer (`inband`: it was bytes)."""
    rows = pack(y_nD)
    return rows.tobytes() if inband else rows


def write_into(dst_nD: torch.Tensor, reply: bytes | np.ndarray) -> None:
    """Copy a reply (from `encode_reply`, or a `pack`ed array) into a contiguous CPU tensor of
    the same dtype and shape."""
    src = np.frombuffer(reply, dtype=np.uint8) if isinstance(reply, (bytes, bytearray)) else reply
    dst = dst_nD.view(torch.uint8).numpy()
    if src.size != dst.size:
        raise ValueError(f"expert reply has {src.size} bytes where {dst.size} were expected")
    dst.reshape(-1)[...] = src.reshape(-1)
