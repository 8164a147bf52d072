"""The Ray Data preprocessing pipeline end to end on a small generated corpus.

One local Ray for the module; the pipeline runs once for the module (`run1`), then a re-run
into its folder fails midway and one with different block and batch sizes replaces it with the
same bytes (the shards do not depend on how Ray cut the stream); balancing is re-run from the
first run's staging folder without Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from unimoe_ray.data.config import AudioConfig, BalanceConfig, EncodeConfig, PreprocessConfig, score_names
from unimoe_ray.data.decode import segment_bounds
from unimoe_ray.data.manifest import read_manifest
from unimoe_ray.data.mini_corpus import MiniCorpusConfig, make_mini_corpus
from unimoe_ray.data.schema import codes_of, frames_of
from unimoe_ray.data.shards import finalize
from unimoe_ray.media.video import frames_to_patches

# No skip when espeak-ng or ffmpeg is missing: make_mini_corpus fails naming how to install them.
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # "local": its own Ray, never a `ray start` cluster found on the machine (as the other modules)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from unimoe_ray.audio.codec import DACCodec
    from unimoe_ray.text.tokenizer import build_test_tokenizer

    root = tmp_path_factory.mktemp("preprocess")
    corpus = MiniCorpusConfig(
        n_tts_en=3,
        n_tts_zh=3,
        n_t2m=3,
        n_v2m=2,
        long_music_seconds=9.0,
        music_seconds=(3.0, 5.0),
        video_seconds=(3.0, 4.5),
    )
    return {
        "root": root,
        "manifest": make_mini_corpus(root / "corpus", corpus),
        "tokenizer": str(build_test_tokenizer(root / "tokenizer")),
        "dac": str(DACCodec.random(seed=0).save(root / "dac.pth")),
    }


def _config(assets: dict, **overrides) -> PreprocessConfig:
    kw = dict(
        tokenizer_path=assets["tokenizer"],
        audio=AudioConfig(music_window_s=4.0, min_tail_s=1.0),
        encode=EncodeConfig(dac_path=assets["dac"], batch_rows=8),
        rows_per_shard=8,
        keep_staging=True,
    )
    return PreprocessConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def run1(assets, ray_local) -> tuple[Path, dict]:
    from unimoe_ray.data.pipeline import run_preprocess

    out = assets["root"] / "out1"
    return out, run_preprocess(assets["manifest"], out, _config(assets))


def _shard_rows(out: Path) -> list[dict]:
    return [
        r
        for name in json.loads((out / "stats.json").read_text())["shards"]
        for r in pq.read_table(out / name).to_pylist()
    ]


def _manifest_rows(manifest: Path) -> list[tuple[dict, dict]]:
    """(raw manifest row, source row with its id), in order."""
    raw = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    return list(zip(raw, read_manifest(manifest)))


def test_counts_add_up(run1, assets):
    out, stats = run1
    shards, quarantine, filtered = (
        _shard_rows(out),
        pq.read_table(out / "quarantine.parquet"),
        pq.read_table(out / "filtered.parquet"),
    )
    assert stats["items_in"] == len(shards) + quarantine.num_rows + filtered.num_rows
    assert stats["out"]["rows"] == len(shards) and stats["quarantined"]["rows"] == quarantine.num_rows
    assert stats["filtered"]["rows"] == filtered.num_rows and stats["counts_add_up"]
    assert stats["manifest_rows"] == len(assets["manifest"].read_text().splitlines())
    for task, entry in stats["out"]["by_task"].items():
        rows = [r for r in shards if r["task"] == task]
        assert entry["rows"] == len(rows)
        assert entry["hours"] == pytest.approx(sum(r["duration_s"] for r in rows) / 3600, abs=1e-5)
    ids = [r["sample_id"] for r in shards] + quarantine["sample_id"].to_pylist() + filtered["sample_id"].to_pylist()
    assert len(ids) == len(set(ids))
    # 8 rows per shard, sorted by sample id across shards
    assert [r["sample_id"] for r in shards] == sorted(r["sample_id"] for r in shards)
    assert len(stats["shards"]) == math.ceil(len(shards) / 8)


def test_each_broken_row_lands_with_its_reason_and_nothing_else_is_lost(run1, assets):
    out, _ = run1
    outcome: dict[str, set[str]] = {}
    for name, status in (("quarantine.parquet", "quarantined"), ("filtered.parquet", "filtered")):
        for r in pq.read_table(out / name).to_pylist():
            outcome.setdefault(r["source_id"], set()).add(f"{status}:{r['reason']}")
    kept = {r["source_id"] for r in _shard_rows(out)}
    expected = [(raw.get("expect"), src["source_id"]) for raw, src in _manifest_rows(assets["manifest"])]
    assert sum(e is not None for e, _ in expected) == 11
    for expect, sid in expected:
        if expect:
            assert outcome.get(sid) == {expect} and sid not in kept, expect
        else:  # a good row: all of it in the shards
            assert sid in kept and sid not in outcome


def test_codes_decode_back_to_the_clip_length(run1, assets):
    from unimoe_ray.audio.codec import DACCodec

    codec = DACCodec.load(assets["dac"])
    rows = _shard_rows(run1[0])
    for task in ("tts_en", "tts_zh", "t2m", "v2m"):
        row = next(r for r in rows if r["task"] == task)
        samples = round(row["duration_s"] * 16000)
        assert row["n_frames"] == math.ceil(samples / 320)
        codes_KT = codes_of(row)
        assert codes_KT.shape == (12, row["n_frames"]) and 0 <= codes_KT.min() and codes_KT.max() < 1024
        wav = codec.decode(codes_KT)
        assert len(wav) == row["n_frames"] * 320 and 0 <= len(wav) - samples < 320


def test_text_ids_and_music_segments(run1, assets):
    from unimoe_ray.text.tokenizer import load_tokenizer

    tok = load_tokenizer(assets["tokenizer"])
    rows = _shard_rows(run1[0])
    for row in rows:
        assert tok.decode(row["text_ids"]) == row["text"] and row["text"]
    # the ~9 s piece (a 16 kHz file) in 4 s windows, a tail of at least 1 s kept
    n = sf.info(assets["manifest"].parent / "music/t2m_0000.wav").frames
    bounds = segment_bounds(n, "t2m", AudioConfig(music_window_s=4.0, min_tail_s=1.0))
    assert len(bounds) >= 2 and bounds[0] == (0, 64000)
    long_piece = sorted((r for r in rows if r["audio"] == "music/t2m_0000.wav"), key=lambda r: r["segment"])
    assert [(r["segment"], r["start_s"], r["duration_s"]) for r in long_piece] == [
        (k, a / 16000, pytest.approx((b - a) / 16000)) for k, (a, b) in enumerate(bounds)
    ]


def test_video_rows_carry_frames_in_vision_layout(run1):
    rows = [r for r in _shard_rows(run1[0]) if r["task"] == "v2m"]
    assert rows
    for row in rows:
        frames_THWC = frames_of(row)
        assert frames_THWC.shape[1:] == (112, 112, 3)  # smart_resize keeps 112 = 4 x 28
        # 2 fps over the window; the video may end a frame before the audio does
        assert math.ceil(row["duration_s"] * 2) - len(frames_THWC) in (0, 1)
        pixel_values, grid_thw = frames_to_patches(frames_THWC)
        assert grid_thw.tolist() == [math.ceil(len(frames_THWC) / 2), 8, 8]
        assert pixel_values.shape == (int(np.prod(grid_thw)), 1176)
    assert all(
        r["video_thw"] == [0, 0, 0] and r["video_frames"] == b"" for r in _shard_rows(run1[0]) if r["task"] != "v2m"
    )


def test_balancing_hits_targets_from_staging(run1, assets):
    out, stats = run1
    available = stats["balance"]["available"]
    names = score_names(())
    source_ids = [src["source_id"] for _, src in _manifest_rows(assets["manifest"])]

    def balanced(dest: str, balance: BalanceConfig) -> tuple[dict, list[dict]]:
        s = finalize(
            out / "_staging",
            out.parent / dest,
            score_names=names,
            balance=balance,
            rows_per_shard=8,
            source_ids=source_ids,
        )
        return s, _shard_rows(out.parent / dest)

    targets = {"tts_en": 2, "tts_zh": 2, "t2m": 2, "v2m": 100}
    s, rows = balanced("bal_a", BalanceConfig(targets=tuple(targets.items()), seed=0))
    counts = {t: sum(r["task"] == t for r in rows) for t in available}
    assert counts == {t: min(targets[t], available[t]) for t in available}  # scarce v2m: all it has
    assert s["counts_add_up"] and s["filtered"]["by_reason"]["balance"] == sum(available.values()) - len(rows)
    assert {r["sample_id"] for r in rows} <= {r["sample_id"] for r in _shard_rows(out)}

    s_total, rows_total = balanced("bal_b", BalanceConfig(total=8, seed=0))
    assert sorted(s_total["balance"]["targets"].values()) == sorted(
        {"tts_en": 2, "tts_zh": 2, "t2m": 2, "v2m": 2}.values()
    )
    assert len(rows_total) == 8
    _, again = balanced("bal_c", BalanceConfig(total=8, seed=0))
    _, reseeded = balanced("bal_d", BalanceConfig(total=8, seed=5))
    assert [r["sample_id"] for r in again] == [r["sample_id"] for r in rows_total]
    assert {r["sample_id"] for r in reseeded} != {r["sample_id"] for r in rows_total}


def test_job_joins_the_running_cluster_named_by_ray_address(run1, assets):
    """`ray job submit` runs the driver with RAY_ADDRESS set; the job must join that cluster
    (here: this module's) rather than start its own."""
    import os
    import subprocess
    import sys

    import ray

    out = assets["root"] / "job_out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [
        "--manifest",
        str(assets["manifest"]),
        "--out",
        str(out),
        "--music-window-s",
        "4",
        "--tokenizer",
        assets["tokenizer"],
        "--dac-path",
        assets["dac"],
        "--target",
        "t2m=2",
    ]
    done = subprocess.run(
        [sys.executable, "jobs/preprocess.py", *args], cwd=Path(__file__).resolve().parents[2],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in done.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["out"]["by_task"]["t2m"]["rows"] == 2 and stats["counts_add_up"]


def test_a_failed_rerun_keeps_the_previous_outputs_and_a_good_one_replaces_them(run1, assets, monkeypatch):
    """A re-run into the same folder that fails midway through writing its shards leaves the
    previous files byte for byte (and no half-written folder beside them); a re-run that
    succeeds replaces them whole, with the same bytes although its block and batch sizes
    differ (they change how Ray cuts and orders the stream, never the files)."""
    from unimoe_ray.data import shards
    from unimoe_ray.data.pipeline import run_preprocess

    out, stats1 = run1
    assert len(stats1["shards"]) >= 2

    def files() -> dict:
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    real_write, written = shards._write, []

    def disk_full_at_second_shard(table, path):
        written.append(path)
        if len(written) == 2:
            raise OSError("No space left on device (injected)")
        real_write(table, path)

    monkeypatch.setattr(shards, "_write", disk_full_at_second_shard)
    with pytest.raises(OSError, match="injected"):
        run_preprocess(assets["manifest"], out, _config(assets))
    assert [p.name for p in written] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert written[0].parent != out  # the new shards went to their own folder
    assert files() == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name]

    monkeypatch.setattr(shards, "_write", real_write)
    cfg = _config(assets, keep_staging=False, block_rows=3, encode=EncodeConfig(dac_path=assets["dac"], batch_rows=3))
    stats = run_preprocess(assets["manifest"], out, cfg)
    assert stats == stats1
    assert files() == {k: v for k, v in before.items() if k.parts[0] != "_staging"}  # same bytes, staging gone
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name]


def test_an_out_folder_with_other_files_is_refused_before_any_work(assets, tmp_path):
    from unimoe_ray.data.pipeline import run_preprocess

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt.*pick a new or empty folder"):
        run_preprocess(assets["manifest"], tmp_path, _config(assets))
    assert (tmp_path / "notes.txt").read_text() == "mine"
