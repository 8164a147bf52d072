"""Manifest reading, decoding, segmentation and text normalisation, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from unimoe_ray.data.config import AudioConfig
from unimoe_ray.data.decode import decode_row, segment_bounds
from unimoe_ray.data.manifest import read_manifest
from unimoe_ray.data.schema import FILTERED, OK, QUARANTINED, sample_id, source_id
from unimoe_ray.data.stages import normalize_text

CFG = AudioConfig(music_window_s=4.0, min_tail_s=1.0, max_speech_s=5.0)


def _tone(seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)


def test_segment_bounds():
    sr = 16000
    default = AudioConfig()
    assert segment_bounds(47 * sr, "t2m", default) == [(0, 20 * sr), (20 * sr, 40 * sr), (40 * sr, 47 * sr)]
    assert segment_bounds(43 * sr, "t2m", default) == [(0, 20 * sr), (20 * sr, 40 * sr)]  # 3 s tail < 5 s
    assert segment_bounds(3 * sr, "v2m", default) == [(0, 3 * sr)]  # only window: kept
    assert segment_bounds(47 * sr, "tts_en", default) == [(0, 47 * sr)]  # speech is never cut


def _manifest(tmp_path, rows: list[dict]):
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_manifest(path)


def test_manifest_marks_bad_rows_and_resolves_paths(tmp_path):
    rows = _manifest(
        tmp_path,
        [
            {"task": "tts_en", "audio": "a.wav", "text": "hi"},
            {"task": "karaoke", "audio": "b.wav"},
            {"task": "t2m", "audio": "", "caption": "x"},
            {"task": "tts_en", "audio": "a.wav", "text": "hi again"},
        ],
    )
    assert [(r["status"], r["reason"]) for r in rows] == [
        (OK, ""),
        (QUARANTINED, "unknown_task"),
        (QUARANTINED, "missing_audio"),
        (QUARANTINED, "duplicate"),
    ]
    assert rows[0]["audio_path"] == str(tmp_path / "a.wav")
    assert rows[2]["text"] == "x"  # caption is an alias of text
    assert rows[0]["source_id"] == source_id("tts_en", "a.wav")
    assert len({r["source_id"] for r in rows}) == 4  # the duplicate gets its own id


def test_manifest_csv_keeps_text_as_string(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("task,audio,text\ntts_en,a.wav,1984\n")
    assert read_manifest(path)[0]["text"] == "1984"


def test_decode_mixes_resamples_and_segments(tmp_path):
    stereo = np.stack([_tone(9.0, 44100), 0.5 * _tone(9.0, 44100)], axis=1)
    sf.write(tmp_path / "m.wav", stereo, 44100, subtype="PCM_16")
    row = _manifest(tmp_path, [{"task": "t2m", "audio": "m.wav", "text": "a tune"}])[0]
    items = decode_row(row, cfg=CFG)
    assert [(i["segment"], i["start_s"], i["duration_s"]) for i in items] == [
        (0, 0.0, 4.0),
        (1, 4.0, 4.0),
        (2, 8.0, 1.0),
    ]
    assert [i["sample_id"] for i in items] == [sample_id(row["source_id"], s) for s in range(3)]
    assert all(i["status"] == OK and i["wav"].dtype == np.float32 for i in items)
    assert len(items[0]["wav"]) == 4 * 16000
    # mono mix of (x, x/2) = 0.75 x: peak 0.375
    assert np.abs(items[0]["wav"]).max() == pytest.approx(0.375, abs=0.01)


@pytest.mark.parametrize(
    "name, make, task, status, reason",
    [
        ("missing.wav", None, "tts_en", QUARANTINED, "missing_audio"),
        ("empty.wav", lambda p: p.write_bytes(b""), "tts_en", QUARANTINED, "empty_file"),
        (
            "corrupt.wav",
            lambda p: p.write_bytes(b"RIFF" + bytes(range(256)) * 8),
            "tts_en",
            QUARANTINED,
            "corrupt_audio",
        ),
        ("silence.wav", lambda p: sf.write(p, np.zeros(32000), 16000), "t2m", QUARANTINED, "silent"),
        ("short.wav", lambda p: sf.write(p, _tone(0.3, 16000), 16000), "tts_zh", QUARANTINED, "too_short"),
        ("long.wav", lambda p: sf.write(p, _tone(6.0, 16000), 16000), "tts_zh", FILTERED, "too_long"),
    ],
)
def test_decode_failures_become_one_item_with_a_reason(tmp_path, name, make, task, status, reason):
    if make:
        make(tmp_path / name)
    row = _manifest(tmp_path, [{"task": task, "audio": name, "text": "t"}])[0]
    (item,) = decode_row(row, cfg=CFG)
    assert (item["status"], item["reason"]) == (status, reason)
    assert item["wav"].size == 0 and item["sample_id"] == sample_id(row["source_id"], 0)


def test_normalize_text():
    assert normalize_text("\u200b\u200b \t\u200b") == ""
    assert normalize_text("  Hello,\n\tworld\u200b! ") == "Hello, world!"
    assert normalize_text("ＡＢＣ　今天") == "ABC 今天"  # NFKC folds full-width forms
