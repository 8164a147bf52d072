"""Video files → vision-tower inputs with the released sampling (1 fps, 1 frame, pixel bounds)."""

import numpy as np
import pytest

from unimoe_ray.data.mini_corpus import write_mp4
from unimoe_ray.inference.video import VideoSampling, load_video
from unimoe_ray.media.video import VideoError
from unimoe_ray.presets import get_preset


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = np.zeros((4, 64, 96, 3), np.uint8)  # 2 s at 2 fps
    frames[:, :, :48] = (200, 40, 40)
    write_mp4(path, frames, fps=2)
    return path


def test_released_defaults_take_one_frame_within_three_28px_blocks_times_two(clip):
    vision = get_preset("tiny").vision
    pixels, grid = load_video(clip, vision)
    # max_pixels = max(min(64·28², 3·28²/1·2), 1.05·28²) = 4704 → 64x96 resizes to 56x84.
    assert grid.tolist() == [1, 56 // 14, 84 // 14]
    assert pixels.shape == (1 * 4 * 6, 3 * 2 * 14 * 14)


def test_more_frames_shrink_each_frame(clip):
    vision = get_preset("tiny").vision
    pixels, grid = load_video(clip, vision, VideoSampling(fps=2.0, max_frames=None))
    # 4 frames: max_pixels = 3·28²/4·2 = 1176 → 28x28, two temporal patches.
    assert grid.tolist() == [2, 2, 2] and pixels.shape[0] == 8


def test_bad_videos_name_the_file(tmp_path):
    vision = get_preset("tiny").vision
    with pytest.raises(VideoError, match="does not exist"):
        load_video(tmp_path / "none.mp4", vision)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoError, match="junk.mp4"):
        load_video(tmp_path / "junk.mp4", vision)
    with pytest.raises(ValueError, match="fps"):
        VideoSampling(fps=0)
