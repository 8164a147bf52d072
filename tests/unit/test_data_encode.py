"""The DAC stage (unimoe_ray.data.encode), run in-process on a small random DAC."""

from __future__ import annotations

import numpy as np
import pytest

from unimoe_ray.data.batch import objects
from unimoe_ray.data.config import EncodeConfig
from unimoe_ray.data.encode import EncodeAudio, length_buckets
from unimoe_ray.data.schema import OK, QUARANTINED, codes_of


def test_length_buckets():
    assert length_buckets([12000, 16000, 3000, 15000], 8000) == {16000: [0, 1, 3], 8000: [2]}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from unimoe_ray.audio.codec import DACCodec

    path = DACCodec.random(seed=0).save(tmp_path_factory.mktemp("dac") / "dac.pth")
    # A forward budget above one clip, so same-bucket clips share a forward here.
    return EncodeAudio(EncodeConfig(dac_path=str(path), max_batch_seconds=10.0))


def _batch(wavs: list[np.ndarray], statuses: list[str]) -> dict:
    n = len(wavs)
    return {
        "sample_id": objects([f"s{i}" for i in range(n)]),
        "status": objects(statuses),
        "reason": objects([""] * n),
        "detail": objects([""] * n),
        "wav": objects(wavs),
    }


def test_codes_per_clip_and_independent_of_batch_mates(encoder):
    rng = np.random.default_rng(0)
    clips = [(0.3 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 23456, 24000, 5000)]
    out = encoder(_batch(clips + [np.zeros(0, np.float32)], [OK] * 4 + [QUARANTINED]))
    assert "wav" not in out
    assert out["n_frames"].tolist() == [50, 74, 75, 16, 0]  # ceil(N / 320); not-ok rows: none
    assert out["codes"][4].size == 0
    for i, clip in enumerate(clips):
        codes_KT = codes_of({"codes": out["codes"][i], "n_frames": out["n_frames"][i]})
        assert codes_KT.shape == (12, out["n_frames"][i]) and codes_KT.max() < 1024
        alone = encoder(_batch([clip], [OK]))  # same clip in a batch of its own
        np.testing.assert_array_equal(alone["codes"][0], out["codes"][i])
