"""A video file → the vision tower's inputs, as the released video-to-music entry point
samples it (`UniMoE_Audio_mod.py` `video_text_to_music`, `examples/inference.py`): frames at
`fps` (1) up to `max_frames` (1), resized so H·W ≤ max(min(64·28², total_pixels / frames · 2),
1.05 · min_pixels) with total_pixels = 3·28² and min_pixels = 28², sides multiples of 28;
then patched for the Qwen2.5-VL tower (unimoe_ray.media.video, shared with preprocessing).

Frames are decoded and resized by decord (the released code decodes with moviepy and resizes
with torchvision's bicubic filter: pixel values differ slightly, sizes are the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unimoe_ray.config import VisionConfig
from unimoe_ray.media.video import VideoError, frames_to_patches, sample_frame_indices, smart_resize


@dataclass(frozen=True, kw_only=True)
class VideoSampling:
    """The released defaults of the video-to-music entry point."""

    fps: float = 1.0
    max_frames: int | None = 1
    total_pixels: int = 3 * 28 * 28
    min_pixels: int = 1 * 28 * 28
    max_pixels_cap: int = 64 * 28 * 28  # VIDEO_MAX_PIXELS
    frame_factor: int = 2  # FRAME_FACTOR

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f"video fps={self.fps}: must be > 0")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"video max_frames={self.max_frames}: must be >= 1 (or None for all)")

    def max_pixels(self, num_frames: int) -> int:
        bound = min(self.max_pixels_cap, self.total_pixels / num_frames * self.frame_factor)
        return int(max(bound, int(self.min_pixels * 1.05)))


def load_video(
    path: str | Path, vision: VisionConfig, sampling: VideoSampling = VideoSampling()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `path` and return (pixel_values (N, C·t·p·p) float32, grid_thw (3,) long).

    Raises VideoError naming the file when it is missing, unreadable or has no frames."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"cannot read video {path}: file does not exist")
    import decord  # lazy: only this entry point needs it

    try:
        probe = decord.VideoReader(str(path), num_threads=1)
        total, video_fps = len(probe), float(probe.get_avg_fps())
        height, width = probe[0].shape[:2]
        del probe
    except Exception as err:  # decord raises bare DECORDError/RuntimeError on bad containers
        raise VideoError(f"cannot read video {path}: {err} (is it a video file?)") from err
    idx_T = sample_frame_indices(total, video_fps, sampling.fps)
    if sampling.max_frames is not None:
        idx_T = idx_T[: sampling.max_frames]
    if idx_T.size == 0:
        raise VideoError(f"video {path} has no frames to sample")
    factor = vision.patch_size * vision.spatial_merge_size
    new_h, new_w = smart_resize(
        height, width, factor, min_pixels=sampling.min_pixels, max_pixels=sampling.max_pixels(len(idx_T))
    )
    try:
        reader = decord.VideoReader(str(path), width=new_w, height=new_h, num_threads=1)
        frames_THWC = reader.get_batch(idx_T.tolist()).asnumpy()
    except Exception as err:
        raise VideoError(f"cannot decode frames of {path}: {err}") from err
    pixel_values, grid_thw = frames_to_patches(
        np.asarray(frames_THWC),
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    return torch.from_numpy(pixel_values), torch.from_numpy(grid_thw)
