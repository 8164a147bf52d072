"""Synthetic signals for runs without recorded audio (the demo, the Serve default voice,
tests): numpy only."""

from __future__ import annotations

import numpy as np


def reference_voice(seconds: float = 1.0, sample_rate: int = 16000) -> np.ndarray:
    """A synthetic 'voice': a 140 Hz tone with a 5 Hz vibrato and two harmonics, enough to
    exercise voice cloning (DAC-encode, prompt, decode) without a recording.

    Returns:
        float32 (N,), N = seconds * sample_rate, peak below 0.45.
    """
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 10 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    return (0.3 * np.sin(phase) + 0.1 * np.sin(2 * phase) + 0.05 * np.sin(3 * phase)).astype(np.float32)
