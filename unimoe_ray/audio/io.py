"""WAV reading, writing and resampling.

Audio here is always a 1-D float32 numpy array in [-1, 1] of N samples plus its sample rate.
soundfile reads and writes files; julius resamples (torchaudio's compiled library is not
usable on our CPU installs, docs/DESIGN.md §5).
"""

from __future__ import annotations

from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch

# 16-bit PCM full scale. Reading divides by it, so writing multiplies by it too.
_PCM16_SCALE = 32768


class AudioError(ValueError):
    """An audio file that cannot be used: missing, unreadable or empty."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32.

    Args:
        path: any format libsndfile reads (wav, flac, ogg, mp3, ...).

    Returns:
        (wav, sample_rate): wav is float32 of shape (N,), channels averaged to mono.

    Raises:
        AudioError: the file is missing, not decodable, or holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        cause = "is a directory" if path.is_dir() else "does not exist"
        raise AudioError(f"cannot read audio {path}: file {cause}")
    try:
        wav_NC, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as err:
        raise AudioError(f"cannot read audio {path}: unreadable or corrupt ({err})") from err
    if wav_NC.shape[0] == 0:
        raise AudioError(f"cannot read audio {path}: file is empty (0 samples)")
    return wav_NC.mean(axis=1, dtype=np.float32), int(sample_rate)


def resample(wav: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Resample a 1-D signal with a windowed-sinc filter (julius.resample_frac).

    Args:
        wav: float array of shape (N,).
        sr_from, sr_to: sample rates in Hz.

    Returns:
        float32 array of shape (floor(N * sr_to / sr_from),); the input itself when the rates
        are equal.
    """
    if sr_from == sr_to:
        return np.asarray(wav, dtype=np.float32)
    wav_N = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    return julius.resample_frac(wav_N, int(sr_from), int(sr_to)).numpy()


def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int = 16000) -> None:
    """Write a mono 16-bit PCM WAV file.

    Args:
        path: destination; its folder must exist.
        wav: float array of shape (N,); values outside [-1, 1] are clipped.
        sample_rate: in Hz.
    """
    wav_N = np.asarray(wav, dtype=np.float32)
    if wav_N.ndim != 1:
        raise ValueError(f"write_wav expects a 1-D mono signal, got shape {wav_N.shape}")
    # Quantise here instead of letting libsndfile do it: it writes floats scaled by 32767 but
    # reads them back divided by 32768, so every write/read round trip would shrink the signal.
    # With one scale both ways a round trip is exact to half a quantisation step.
    pcm_N = np.round(np.clip(wav_N, -1.0, 1.0) * _PCM16_SCALE)
    pcm_N = np.clip(pcm_N, -_PCM16_SCALE, _PCM16_SCALE - 1).astype(np.int16)
    sf.write(path, pcm_N, int(sample_rate), subtype="PCM_16", format="WAV")
