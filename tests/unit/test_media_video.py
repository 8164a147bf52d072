"""Frames -> Qwen2.5-VL patch layout (unimoe_ray.media.video), checked against transformers."""

from __future__ import annotations

import numpy as np
import pytest

from unimoe_ray.media.video import CLIP_MEAN, CLIP_STD, frames_to_patches, sample_frame_indices, smart_resize


def _transformers_pil():
    """transformers' PIL Qwen2-VL image processor module, the reference (transformers >= 5.5,
    the dev extra). A missing one fails: a skip would let the comparison silently lapse."""
    try:
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    except ImportError as err:
        pytest.fail(f"the reference Qwen2VLImageProcessorPil needs transformers>=5.5 (pip install -e '.[dev]'): {err}")
    return image_processing_pil_qwen2_vl


def _normalised(frames_THWC: np.ndarray) -> np.ndarray:
    return (frames_THWC.astype(np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)


def test_matches_transformers_qwen2vl_image_processor():
    """A single image is a video of one frame: the PIL processor broadcasts it over the
    temporal patch, we repeat the last frame; both must give the same numbers."""
    pil = _transformers_pil()
    img_HWC = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    ref = pil.Qwen2VLImageProcessorPil()(images=[img_HWC], do_resize=False)
    pixel_values, grid_thw = frames_to_patches(img_HWC[None])
    assert grid_thw.tolist() == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
    np.testing.assert_allclose(pixel_values, np.asarray(ref["pixel_values"]), atol=1e-6)


def test_layout_by_hand():
    """Patch n holds (C, t, py, px) of the patch at merge-block-major position: 2x2 blocks of
    14-pixel patches, row by row, blocks left to right, then the next temporal pair."""
    rng = np.random.default_rng(1)
    frames_THWC = rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)  # T=3 pads to 4
    pixel_values, grid_thw = frames_to_patches(frames_THWC)
    assert grid_thw.tolist() == [2, 4, 4]
    assert pixel_values.shape == (2 * 4 * 4, 3 * 2 * 14 * 14)
    x_TCHW = _normalised(frames_THWC).transpose(0, 3, 1, 2)
    x_TCHW = np.concatenate([x_TCHW, x_TCHW[-1:]])  # last frame repeated

    def patch(t: int, y: int, x: int) -> np.ndarray:  # t: temporal pair, y/x: patch row/col
        return x_TCHW[2 * t : 2 * t + 2, :, 14 * y : 14 * y + 14, 14 * x : 14 * x + 14].transpose(1, 0, 2, 3).ravel()

    # first block (rows 0-1, cols 0-1), then the block to its right, then the next pair
    expected_order = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 0, 2), (0, 0, 3), (0, 1, 2)]
    for n, (t, y, x) in enumerate(expected_order):
        np.testing.assert_allclose(pixel_values[n], patch(t, y, x), atol=1e-6)
    np.testing.assert_allclose(pixel_values[8], patch(0, 2, 0), atol=1e-6)  # second block row
    np.testing.assert_allclose(pixel_values[16], patch(1, 0, 0), atol=1e-6)  # second temporal pair


def test_rejects_sizes_off_the_merge_grid():
    with pytest.raises(ValueError, match="multiples of 28"):
        frames_to_patches(np.zeros((2, 30, 28, 3), np.uint8))


@pytest.mark.parametrize("hw", [(112, 112), (480, 640), (37, 1000), (2000, 300)])
def test_smart_resize_matches_transformers(hw):
    pil = _transformers_pil()
    for lo, hi in ((56 * 56, 224 * 224), (3136, 1003520)):
        assert smart_resize(*hw, 28, lo, hi) == pil.smart_resize(*hw, factor=28, min_pixels=lo, max_pixels=hi)


def test_sample_frame_indices():
    # 8 fps video, 2 fps sampling: every 4th frame; a window picks its own span.
    assert sample_frame_indices(40, 8.0, 2.0).tolist() == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert sample_frame_indices(40, 8.0, 1.0, start_s=2.0, end_s=4.0).tolist() == [16, 24]
    assert sample_frame_indices(40, 8.0, 2.0, start_s=6.0).size == 0  # window after the end
