"""Audio response formats of the speech/music API, as OpenAI clients expect them.

All formats carry mono audio at 24 kHz (OpenAI's TTS rate; the model decodes at 16 kHz and the
server resamples). Encoders: wav, pcm (raw s16le), flac, mp3 and opus (Ogg) are all written by
libsndfile through `soundfile` (libsndfile >= 1.1 encodes MP3 with LAME and Opus with libopus;
Debian's libsndfile1 1.2 has both) — no ffmpeg needed. Streaming (audio leaving while it is
generated) is for wav (one header with unknown sizes, then PCM) and pcm; the others are
written once the audio is complete.

`speed` time-stretches the decoded audio with its pitch kept (a phase vocoder on torch.stft).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

SAMPLE_RATE = 24000
FORMATS = ("wav", "flac", "pcm", "mp3", "opus")
STREAMABLE = ("wav", "pcm")
CONTENT_TYPES = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
}
_SF = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}


def available_formats() -> tuple[str, ...]:
    """The formats this libsndfile can write (mp3/opus need libsndfile >= 1.1 with LAME/opus)."""
    have = sf.available_formats()
    out = ["wav", "pcm", "flac"] if "FLAC" in have else ["wav", "pcm"]
    if "MP3" in have and "MPEG_LAYER_III" in sf.available_subtypes("MP3"):
        out.append("mp3")
    if "OGG" in have and "OPUS" in sf.available_subtypes("OGG"):
        out.append("opus")
    return tuple(out)


def pcm16(wav: np.ndarray) -> bytes:
    """float [-1, 1] → little-endian int16 bytes (the scale write_wav uses)."""
    x = np.round(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0) * 32768.0)
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def wav_stream_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length: RIFF and data sizes 0xFFFFFFFF
    (what streaming TTS servers send; players read until the connection ends)."""
    byte_rate = sample_rate * 2
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, 2, 16)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


def encode(wav: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A whole clip in `fmt`."""
    if fmt == "pcm":
        return pcm16(wav)
    if fmt not in _SF:
        raise ValueError(f"unknown response_format {fmt!r}: use one of {FORMATS}")
    container, subtype = _SF[fmt]
    buf = io.BytesIO()
    data = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)
    if fmt == "wav":
        # Quantise ourselves, as audio/io.write_wav does (one scale both ways).
        data = np.frombuffer(pcm16(wav), dtype="<i2")
    sf.write(buf, data, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def change_speed(wav: np.ndarray, speed: float, *, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """Play `speed` times faster (0.25-4.0) with the pitch kept: a phase vocoder (STFT frames
    read at `speed` × the hop, magnitudes interpolated, phases advanced by each bin's measured
    frequency), output length len(wav) / speed."""
    if speed == 1.0 or len(wav) == 0:
        return wav
    import torch

    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    n = x.numel()
    length = int(round(n / speed))
    window = torch.hann_window(n_fft)
    spec_FT = torch.stft(
        torch.nn.functional.pad(x, (0, max(0, n_fft - n))),
        n_fft,
        hop,
        window=window,
        pad_mode="constant",
        return_complex=True,
    )
    F, T = spec_FT.shape
    spec_FT = torch.nn.functional.pad(spec_FT, (0, 2))  # frames past the end read as silence
    t_S = (torch.arange(length // hop + 2) * speed).clamp(max=T)  # fractional read positions
    j_S = t_S.long()
    frac_S = (t_S - j_S)[None]
    a_FS, b_FS = spec_FT[:, j_S], spec_FT[:, j_S + 1]
    mag_FS = (1 - frac_S) * a_FS.abs() + frac_S * b_FS.abs()
    advance_F1 = torch.linspace(0, torch.pi * hop, F)[:, None]  # expected phase advance per hop
    dphi_FS = b_FS.angle() - a_FS.angle() - advance_F1
    dphi_FS = dphi_FS - 2 * torch.pi * torch.round(dphi_FS / (2 * torch.pi))
    step_FS = advance_F1 + dphi_FS  # each bin's measured phase advance per output hop
    phase_FS = spec_FT[:, :1].angle() + torch.cumsum(step_FS, dim=1) - step_FS
    y = torch.istft(torch.polar(mag_FS, phase_FS), n_fft, hop, window=window)
    y = torch.nn.functional.pad(y, (0, max(0, length - y.numel())))[:length]
    return y.numpy().astype(np.float32)
