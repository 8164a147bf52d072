"""The DAC stage (unimoe_ray.data.encode), run in-process on a small random DAC."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from unimoe_ray.data.batch import objects
from unimoe_ray.data.config import BalanceConfig, EncodeConfig
from unimoe_ray.data.encode import ENCODE_ERROR, EncodeAudio, check_encode_errors, length_buckets
from unimoe_ray.data.schema import FILTERED, OK, QUARANTINED, codes_of
from unimoe_ray.data.shards import finalize


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


def test_check_encode_errors_counts_rows_that_reached_the_codec():
    oom = "OutOfMemoryError: CPU out of memory"

    def check(outcomes, max_fraction=0.5):
        statuses, reasons, details = zip(*outcomes)
        check_encode_errors(list(statuses), list(reasons), list(details), max_fraction)

    ok, filtered = (OK, "", ""), (FILTERED, "low_snr_db", "snr_db=3 < 15")
    decode_error = (QUARANTINED, "corrupt_audio", "")
    # 5 of the 8 rows the codec received: fails, naming the error. Filtered and decode-stage
    # rows never reached the codec and do not dilute the fraction.
    with pytest.raises(RuntimeError, match="5 of the 8 rows it received with OutOfMemoryError"):
        check([ok] * 3 + [(QUARANTINED, ENCODE_ERROR, oom)] * 5 + [filtered, decode_error] * 4)
    check([ok] * 5 + [(QUARANTINED, ENCODE_ERROR, oom)] * 3)  # 3 of 8: quarantined, goes on
    # 6 of 10 failed, but not for the same reason (3 + 3): goes on.
    value_error = (QUARANTINED, ENCODE_ERROR, "ValueError: x")
    check([ok] * 4 + [(QUARANTINED, ENCODE_ERROR, oom)] * 3 + [value_error] * 3)
    check([(QUARANTINED, ENCODE_ERROR, oom)] * 2, max_fraction=1.0)  # 1.0: never fails
    with pytest.raises(ValueError, match="max_error_fraction"):
        EncodeConfig(max_error_fraction=1.5)


def test_a_codec_failing_every_row_fails_the_run_before_any_output(encoder, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):  # what a too-large forward does on a small machine
        raise torch.OutOfMemoryError("CPU out of memory: tried to allocate 6.00 GiB")

    monkeypatch.setattr(encoder.codec, "encode_batch", out_of_memory)
    clips = [np.full(n, 0.1, np.float32) for n in (16000, 8000, 4000)]
    out = encoder(_batch(clips + [np.zeros(0, np.float32)], [OK] * 3 + [QUARANTINED]))
    assert list(out["status"]) == [QUARANTINED] * 4
    assert list(out["reason"][:3]) == [ENCODE_ERROR] * 3
    assert all(d.startswith("OutOfMemoryError: CPU out of memory") for d in out["detail"][:3])

    # The staging rows as the pipeline writes them (meta columns), two more rows that encoded.
    n = len(out["sample_id"]) + 2
    staging = tmp_path / "_staging"
    staging.mkdir()
    pq.write_table(
        pa.table(
            {
                "sample_id": [*out["sample_id"], "ok1", "ok2"],
                "source_id": [f"src{i}" for i in range(n)],
                "task": ["tts_en"] * n,
                "status": [*out["status"], OK, OK],
                "reason": [*out["reason"], "", ""],
                "detail": [*out["detail"], "", ""],
                "duration_s": pa.array([1.0] * n, pa.float32()),
            }
        ),
        staging / "part-0.parquet",
    )
    kw = dict(score_names=(), balance=BalanceConfig(), rows_per_shard=8, source_ids=[])
    with pytest.raises(RuntimeError, match="3 of the 5 rows it received with OutOfMemoryError"):
        finalize(staging, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()  # no quietly short dataset left behind
