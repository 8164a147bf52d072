"""Music synthesis and the generated mini corpus (unimoe_ray.data.music / mini_corpus)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from unimoe_ray.data import music
from unimoe_ray.data.mini_corpus import (
    MiniCorpusConfig,
    ball_video_frames,
    make_mini_corpus,
    manifest_counts,
    write_test_assets,
)

REPO = Path(__file__).resolve().parents[2]
INSTALL = "apt-get install -y espeak-ng ffmpeg"


@pytest.mark.parametrize("seed", range(6))
def test_caption_states_what_the_notes_are(seed):
    rng = np.random.default_rng(seed)
    tonic, mode = int(rng.integers(12)), ("major", "minor")[seed % 2]
    instrument = list(music.INSTRUMENTS)[seed % len(music.INSTRUMENTS)]
    piece = music.compose(
        rng, tonic=tonic, mode=mode, bpm=72 + 12 * seed, n_bars=4, instrument=instrument, drums=seed % 3 == 0
    )
    assert music.estimate_key(piece.melody + piece.bass) == (music.NOTE_NAMES[tonic], mode)
    text = music.caption(piece, rng)
    assert f"{music.NOTE_NAMES[tonic]} {mode}" in text and f"{72 + 12 * seed} BPM" in text and instrument in text
    assert ("with a steady drum beat" in text) == (seed % 3 == 0)
    wav = music.render(piece, 16000, rng)
    assert len(wav) == round(16 * 60 / piece.bpm * 16000) and np.abs(wav).max() == pytest.approx(0.8, rel=1e-5)


@pytest.mark.parametrize("instrument", sorted(music.INSTRUMENTS))
def test_stated_tempo_is_audible(instrument):
    """With drums, onsets land on the stated beat grid: the onset envelope is much stronger at
    beat times than a quarter-beat later (where neither kick, hat nor notes start)."""
    rng = np.random.default_rng(0)
    piece = music.compose(rng, tonic=0, mode="major", bpm=100, n_bars=4, instrument=instrument, drums=True)
    wav = music.render(piece, 16000, rng)
    env = np.sqrt(np.mean(wav[: len(wav) // 160 * 160].reshape(-1, 160) ** 2, axis=1))  # 100 Hz
    onset = np.maximum(np.diff(env, prepend=0.0), 0.0)

    def strength(phase: float) -> float:
        starts = ((np.arange(piece.n_beats - 1) + phase) * 60 / piece.bpm * 100).astype(int)
        return float(np.mean([onset[i : i + 3].max() for i in starts]))

    assert strength(0.0) > 2.0 * strength(0.25)


def test_video_motion_follows_the_bar():
    piece = music.compose(
        np.random.default_rng(0), tonic=0, mode="major", bpm=120, n_bars=2, instrument="guitar", drums=False
    )
    frames = ball_video_frames(piece, piece.duration_s, size=56, fps=8)
    assert frames.shape == (32, 56, 56, 3)
    # 120 BPM: a bar is 2 s = 16 frames; the ball is back where it started
    np.testing.assert_array_equal(frames[0], frames[16])
    assert not np.array_equal(frames[0], frames[8])


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_mini_corpus_is_deterministic_and_tags_broken_rows(tmp_path):
    cfg = MiniCorpusConfig(
        n_tts_en=1,
        n_tts_zh=1,
        n_t2m=1,
        n_v2m=1,
        long_music_seconds=0,
        music_seconds=(2.0, 3.0),
        video_seconds=(2.0, 3.0),
    )
    first = make_mini_corpus(tmp_path / "a", cfg)
    make_mini_corpus(tmp_path / "b", cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_mini_corpus(tmp_path / "c", MiniCorpusConfig(**{**cfg.__dict__, "seed": 1}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")

    rows = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert [r["task"] for r in rows[:4]] == ["tts_en", "tts_zh", "t2m", "v2m"]
    zh = rows[1]
    assert zh["language"] == "zh" and zh["text"].endswith("。")
    wav, sr = sf.read(tmp_path / "a" / zh["audio"])
    assert sr == 22050 and len(wav) > sr  # espeak-ng spoke it
    expects = {r["expect"] for r in rows if "expect" in r}
    assert {
        "quarantined:corrupt_audio",
        "quarantined:empty_file",
        "quarantined:silent",
        "quarantined:too_short",
        "quarantined:missing_video",
        "quarantined:empty_text",
        "filtered:low_snr_db",
        "filtered:high_clipping_ratio",
    } <= expects


def test_manifest_counts_rows_per_task_and_the_broken_ones(tmp_path):
    rows = [
        {"task": "tts_en", "audio": "a.wav"},
        {"task": "t2m", "audio": "b.wav", "expect": "quarantined:silent"},
        {"task": "tts_en", "audio": "c.wav"},
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert manifest_counts(tmp_path / "manifest.jsonl") == ({"tts_en": 2, "t2m": 1}, 1)


def test_test_assets_are_a_tokenizer_and_the_seeded_random_dac(tmp_path):
    import torch

    from unimoe_ray.audio.codec import DACCodec
    from unimoe_ray.text.tokenizer import load_tokenizer

    tokenizer, dac = write_test_assets(tmp_path / "assets", seed=3)
    assert (tokenizer, dac) == (tmp_path / "assets" / "tokenizer", tmp_path / "assets" / "dac_random.pth")
    assert len(load_tokenizer(tokenizer)) > 256
    loaded = DACCodec.load(dac).model.state_dict()
    same, other = (DACCodec.random(seed=seed).model.state_dict() for seed in (3, 0))
    assert all(torch.equal(loaded[k], same[k]) for k in same)
    assert not all(torch.equal(loaded[k], other[k]) for k in other)


def test_missing_tools_fail_naming_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no_tools"))
    with pytest.raises(FileNotFoundError, match=r"espeak-ng and ffmpeg not found") as err:
        make_mini_corpus(tmp_path / "corpus", MiniCorpusConfig(n_tts_en=1, n_tts_zh=0))
    assert INSTALL in str(err.value)
    assert not (tmp_path / "corpus").exists()  # nothing half-made


def test_corpus_tests_fail_rather_than_skip_without_the_tools(tmp_path):
    """CI installs espeak-ng and ffmpeg: a suite that skipped the corpus tests without them
    would pass on a broken image. Run one test of each module that needs them with an empty
    PATH (the corpus is checked before Ray starts, so this takes seconds)."""
    tests = [
        "tests/unit/test_data_corpus.py::test_mini_corpus_is_deterministic_and_tags_broken_rows",
        "tests/ray/test_preprocess.py::test_counts_add_up",
        "tests/integration/test_preprocess_job.py::test_make_corpus_then_preprocess",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests],
        cwd=REPO,
        env={**os.environ, "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = done.stdout.splitlines()[-1]
    assert "skipped" not in summary, done.stdout[-3000:]
    assert "2 failed" in summary and "1 error" in summary, done.stdout[-3000:]
    assert done.stdout.count(INSTALL) >= 3, done.stdout[-3000:]
