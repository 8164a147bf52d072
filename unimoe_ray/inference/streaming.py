"""Streaming DAC decode: codec frames arriving one decode step at a time → audio chunks.

DAC's decoder is convolutional and non-causal: output sample n depends on frames within a
receptive field on both sides (about ±10 frames for the 16 kHz DAC layout, `context_frames`).
A chunk [t0, t1) is therefore decoded from frames [t0 − ctx, t1 + ctx) and cropped, so it
equals the same span of a whole-signal decode up to float rounding (no clicks at the joins);
the resampler to the output rate (24 kHz for OpenAI clients) gets one more frame of margin on
each side for its filter, and chunk edges fall on whole output samples (hop · out/in = 480).

Latency: the delay pattern completes frame t at decode step t + max_delay (18), and a chunk
also waits for its right context, so the first chunk leaves after max_delay + first_chunk +
ctx steps; later chunks are larger (fewer decoder calls). `finish()` flushes the tail, which
needs no right context (the whole-signal decode pads the end the same way).

Shape legend: K codebooks, T frames, N samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.audio.io import resample


def context_frames(codec: DACCodec) -> int:
    """Frames each side that a DAC decoder's output sample depends on (its receptive-field
    half-width, rounded up, + 1), from the decoder's own convolutions."""
    half = 0.0  # in frames
    samples_per_frame = 1
    for m in codec.model.decoder.modules():
        if isinstance(m, nn.ConvTranspose1d):
            half += math.ceil(m.kernel_size[0] / m.stride[0]) / 2 / samples_per_frame
            samples_per_frame *= m.stride[0]
        elif isinstance(m, nn.Conv1d):
            half += (m.kernel_size[0] - 1) * m.dilation[0] / 2 / samples_per_frame
    return math.ceil(half) + 1


class StreamingDecoder:
    """Push frames (K, T) as they complete; get float32 chunks at `out_rate` back.

    Concatenated chunks equal `decode_whole(all frames)` within float rounding."""

    def __init__(
        self,
        codec: DACCodec,
        *,
        out_rate: int = 24000,
        first_chunk: int = 5,
        chunk: int = 25,
        context: int | None = None,
    ) -> None:
        if first_chunk < 1 or chunk < 1:
            raise ValueError("first_chunk and chunk must be >= 1 frame")
        hop, sr = codec.hop_length, codec.sample_rate
        if (hop * out_rate) % sr:
            raise ValueError(f"out_rate {out_rate}: one frame ({hop} samples at {sr} Hz) must be whole samples")
        self.codec = codec
        self.out_rate = out_rate
        self.first_chunk, self.chunk = first_chunk, chunk
        self.ctx = context_frames(codec) if context is None else context
        self.out_hop = hop * out_rate // sr
        self._frames: list[torch.Tensor] = []
        self._n = 0  # frames received
        self._done = 0  # frames already turned into audio

    def renders_after(self, new_frames: int) -> bool:
        """Whether pushing `new_frames` more frames completes a chunk (then `push` decodes; else
        it only stores the frames: cheap enough to call on an event loop)."""
        return self._done + self._next_size() + self.ctx + 1 <= self._n + new_frames

    def _next_size(self) -> int:
        """Frames in the next chunk: the first is short (latency), later ones larger."""
        return self.first_chunk if self._done == 0 else self.chunk

    def push(self, frames_KT: torch.Tensor) -> list[np.ndarray]:
        if frames_KT.shape[1]:
            self._frames.append(frames_KT.cpu())
            self._n += frames_KT.shape[1]
        chunks = []
        while self.renders_after(0):
            chunks.append(self._render(self._done, self._done + self._next_size(), final=False))
        return chunks

    def finish(self) -> np.ndarray:
        """The rest of the audio (possibly empty)."""
        if self._done >= self._n:
            return np.zeros(0, dtype=np.float32)
        return self._render(self._done, self._n, final=True)

    def _render(self, t0: int, t1: int, *, final: bool) -> np.ndarray:
        codes_KT = torch.cat(self._frames, dim=1) if len(self._frames) > 1 else self._frames[0]
        self._frames = [codes_KT]
        margin = 1  # frames of resampler margin on each side (filter tails ≪ one frame)
        a = max(0, t0 - self.ctx - margin)
        b = self._n if final else t1 + self.ctx + margin
        wav = self.codec.decode(codes_KT[:, a:b])
        # Keep [t0 − margin, t1 + margin) for the resampler, then crop to [t0, t1).
        hop = self.codec.hop_length
        lo = max(0, t0 - margin)
        hi = self._n if final else t1 + margin
        piece = wav[(lo - a) * hop : (hi - a) * hop]
        out = resample(piece, self.codec.sample_rate, self.out_rate)
        start = (t0 - lo) * self.out_hop
        self._done = t1
        return np.ascontiguousarray(out[start : start + (t1 - t0) * self.out_hop], dtype=np.float32)


def decode_whole(codec: DACCodec, codes_KT: torch.Tensor, out_rate: int = 24000) -> np.ndarray:
    """The non-streamed reference: decode all frames, resample the whole signal."""
    wav = codec.decode(codes_KT)
    return resample(wav, codec.sample_rate, out_rate).astype(np.float32)
