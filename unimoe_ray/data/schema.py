"""Row identity, row status and the Parquet schemas of the outputs.

Shard row layout (one row = one training example):
    sample_id      string   16 hex digits of sha1(source_id, segment)
    source_id      string   16 hex digits of sha1(task, audio path as in the manifest)
    task           string   tts_zh | tts_en | t2m | v2m
    audio, video   string   paths as written in the manifest ("" when absent)
    segment        int32    window index (music is cut into fixed windows; speech is 0)
    start_s        float32  window start in the source file
    duration_s     float32  clip length at 16 kHz
    text           string   normalised transcript / caption
    speaker, language string
    text_ids       list<int32>   token ids of `text` (no special tokens)
    n_frames       int32    T, codec frames (50/s)
    codes          list<uint16>  DAC codes, codebook-major: codes[k * n_frames + t], K = 12
    video_frames   binary   uint8 RGB frames (T_v, H, W, 3) row-major, already resized
    video_thw      list<int32>   (T_v, H, W); (0, 0, 0) without video
    q_<scorer>     float32  quality scores (NaN where a scorer does not apply)

`codes_of(row)` and `frames_of(row)` undo the flattening.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

OK, QUARANTINED, FILTERED = "ok", "quarantined", "filtered"
N_CODEBOOKS = 12


def source_id(task: str, audio: str) -> str:
    return hashlib.sha1(f"{task}\0{audio}".encode()).hexdigest()[:16]


def sample_id(source: str, segment: int) -> str:
    """Hash of (task, audio path, segment) via the source id. Stable across runs and machines:
    it depends on the manifest's path text, not on where the corpus lives or on the order in
    which Ray processes rows."""
    return hashlib.sha1(f"{source}\0{segment}".encode()).hexdigest()[:16]


def score_column(name: str) -> str:
    return f"q_{name}"


_BASE_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("task", pa.string()),
    pa.field("audio", pa.string()),
    pa.field("video", pa.string()),
    pa.field("segment", pa.int32()),
    pa.field("start_s", pa.float32()),
    pa.field("duration_s", pa.float32()),
    pa.field("text", pa.string()),
    pa.field("speaker", pa.string()),
    pa.field("language", pa.string()),
]
_PAYLOAD_FIELDS = [
    pa.field("text_ids", pa.list_(pa.int32())),
    pa.field("n_frames", pa.int32()),
    pa.field("codes", pa.list_(pa.uint16())),
    pa.field("video_frames", pa.binary()),
    pa.field("video_thw", pa.list_(pa.int32())),
]
_STATUS_FIELDS = [pa.field("status", pa.string()), pa.field("reason", pa.string()), pa.field("detail", pa.string())]


def _score_fields(score_names: tuple[str, ...]) -> list[pa.Field]:
    return [pa.field(score_column(n), pa.float32()) for n in score_names]


def shard_schema(score_names: tuple[str, ...]) -> pa.Schema:
    return pa.schema(_BASE_FIELDS + _PAYLOAD_FIELDS + _score_fields(score_names))


def staging_schema(score_names: tuple[str, ...]) -> pa.Schema:
    """Every item the pipeline saw, payload empty unless status == ok."""
    return pa.schema(_BASE_FIELDS + _PAYLOAD_FIELDS + _score_fields(score_names) + _STATUS_FIELDS)


def quarantine_schema() -> pa.Schema:
    return pa.schema(_BASE_FIELDS + _STATUS_FIELDS[1:])


def filtered_schema(score_names: tuple[str, ...]) -> pa.Schema:
    return pa.schema(_BASE_FIELDS + _score_fields(score_names) + _STATUS_FIELDS[1:])


def codes_of(row: dict) -> np.ndarray:
    """Shard row -> int64 codes (K, T), ready for DACCodec.decode."""
    codes = np.asarray(row["codes"], dtype=np.int64)
    return codes.reshape(N_CODEBOOKS, int(row["n_frames"]))


def frames_of(row: dict) -> np.ndarray:
    """Shard row -> uint8 frames (T_v, H, W, 3), the input of video.frames_to_patches."""
    t, h, w = (int(v) for v in row["video_thw"])
    return np.frombuffer(row["video_frames"], dtype=np.uint8).reshape(t, h, w, 3)
