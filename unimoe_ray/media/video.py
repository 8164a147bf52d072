"""Video frames -> Qwen2.5-VL vision-tower patches. numpy only (decord imported lazily).

Shared by preprocessing (V2M rows), training batches and serving, so all three feed the vision
tower identically; it sits in the core (not in the Ray data layer) because all three import it.

Layout (transformers' Qwen2-VL image/video processors): frames are resized so H and W are
multiples of patch_size * merge_size (28), rescaled to [0, 1] and normalised with the OpenAI
CLIP mean/std; the frame count is padded to a multiple of temporal_patch_size (2) by repeating
the last frame. Patches are ordered (t, h-block, w-block, h-in-block, w-in-block), so each run
of merge_size**2 = 4 consecutive patches is one 2x2 block the vision merger folds into one
token; each patch flattens as (C, temporal, py, px) = 3*2*14*14 = 1176 values.

Shards store the sampled uint8 frames (already at the resized H, W) rather than patches:
exact, 4x smaller than float32, and `frames_to_patches` is cheap at load time.

Shape legend: T frames, H height, W width, C channels (3, RGB), N patches, P patch values.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# OpenAI CLIP normalisation, as Qwen2-VL's processors use (transformers OPENAI_CLIP_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable or without frames."""


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 224 * 224
) -> tuple[int, int]:
    """Qwen2-VL's target frame size: both sides multiples of `factor`, the pixel count within
    [min_pixels, max_pixels], the aspect ratio as close as possible (same rule as
    transformers' `smart_resize`)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio above 200: {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(
    num_frames: int, video_fps: float, fps: float, start_s: float = 0.0, end_s: float | None = None
) -> np.ndarray:
    """Indices of the frames shown at times start_s, start_s + 1/fps, ... < end_s.

    Returns:
        int64 (T,), increasing; empty when the window starts after the last frame.
    """
    duration_s = num_frames / video_fps
    end_s = duration_s if end_s is None else min(end_s, duration_s)
    times_T = np.arange(start_s, end_s, 1.0 / fps)
    idx_T = np.floor(times_T * video_fps + 1e-6).astype(np.int64)
    return np.unique(np.clip(idx_T, 0, max(num_frames - 1, 0)))


def read_video_frames(
    path: str | Path,
    *,
    fps: float = 2.0,
    start_s: float = 0.0,
    end_s: float | None = None,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    factor: int = 28,
) -> np.ndarray:
    """Decode a window of a video at `fps`, resized by `smart_resize` (decord does the resize).

    Returns:
        uint8 (T, H, W, 3) RGB, H and W multiples of `factor`; T = 0 when the video ends
        before start_s.

    Raises:
        VideoError: the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"cannot read video {path}: file does not exist")
    import decord  # lazy: the serving path and unit tests import this module without it

    try:
        probe = decord.VideoReader(str(path), num_threads=1)
        height, width = probe[0].shape[:2]
        video_fps, total = float(probe.get_avg_fps()), len(probe)
        del probe
        new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
        reader = decord.VideoReader(str(path), width=new_w, height=new_h, num_threads=1)
        idx_T = sample_frame_indices(total, video_fps, fps, start_s, end_s)
        if idx_T.size == 0:
            return np.zeros((0, new_h, new_w, 3), np.uint8)
        return reader.get_batch(idx_T.tolist()).asnumpy()
    except Exception as err:  # decord raises bare DECORDError/RuntimeError on bad containers
        raise VideoError(f"cannot read video {path}: {err}") from err


def frames_to_patches(
    frames_THWC: np.ndarray,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB frames -> the vision tower's flattened patches.

    Args:
        frames_THWC: uint8 (T, H, W, 3); H, W multiples of patch_size * merge_size.

    Returns:
        pixel_values: float32 (N, 3 * temporal_patch_size * patch_size**2), N = t * h * w.
        grid_thw: int64 (3,) = (t, h, w) = (ceil(T / temporal), H / patch, W / patch).

    Example (one 28x28 frame): T pads to 2, grid (1, 2, 2), pixel_values (4, 1176).
    """
    frames_THWC = np.asarray(frames_THWC)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {frames_THWC.shape}")
    n_t, height, width, channels = frames_THWC.shape
    block = patch_size * merge_size
    if n_t == 0 or height % block or width % block:
        raise ValueError(
            f"frames must be non-empty with H, W multiples of {block}, got {frames_THWC.shape}; "
            "resize with smart_resize first"
        )
    mean_C = np.asarray(mean, np.float32)
    std_C = np.asarray(std, np.float32)
    x_TCHW = ((frames_THWC.astype(np.float32) / 255.0 - mean_C) / std_C).transpose(0, 3, 1, 2)
    if pad := -n_t % temporal_patch_size:  # repeat the last frame, as the HF processors do
        x_TCHW = np.concatenate([x_TCHW, np.repeat(x_TCHW[-1:], pad, axis=0)])
    grid_t = x_TCHW.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    x = x_TCHW.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    # -> (t, h-block, w-block, h-in-block, w-in-block, C, temporal, py, px)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values_NP = np.ascontiguousarray(
        x.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
    )
    return pixel_values_NP, np.array([grid_t, grid_h, grid_w], dtype=np.int64)
