"""The light per-batch stages of the pipeline: video frames, tokenisation, quality scores, and
the final conversion to the staging schema. The DAC stage is in `encode.py`.

Each stage takes a Ray Data numpy batch (dict of column arrays), works only on rows whose
status is still ok, and may turn a row quarantined or filtered with a reason; it never drops
rows, so the final counts cover every item. Stages holding a model (tokenizer, model scorers)
are callable classes, loaded once per actor; the rest are plain functions run as tasks.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa

from unimoe_ray.data.batch import mark, objects
from unimoe_ray.data.config import TEXT_TASKS, QualityConfig, VideoConfig
from unimoe_ray.data.quality import build_model_scorer, failed_rule, signal_scorers
from unimoe_ray.data.schema import FILTERED, OK, QUARANTINED, score_column, staging_schema
from unimoe_ray.media.video import VideoError, read_video_frames

_STRING_COLUMNS = (
    "sample_id", "source_id", "task", "audio", "video", "text", "speaker", "language",
    "status", "reason", "detail",
)  # fmt: skip


def normalize_text(text: str) -> str:
    """NFKC, control and format characters (zero-width spaces, BOMs, ...) removed, runs of
    whitespace collapsed to one space, trimmed."""
    text = unicodedata.normalize("NFKC", str(text))
    kept = (" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf"))
    return " ".join("".join(kept).split())


def attach_video(batch: dict, *, cfg: VideoConfig) -> dict:
    """V2M rows: sample the segment's window of the video at cfg.fps, resized for the vision
    tower. Adds video_frames (flat uint8) and video_thw."""
    n = len(batch["sample_id"])
    frames, thw = [np.zeros(0, np.uint8)] * n, [np.zeros(3, np.int32)] * n
    for i in range(n):
        if batch["status"][i] != OK or batch["task"][i] != "v2m":
            continue
        path = str(batch["video_path"][i])
        if not path or not Path(path).is_file():
            detail = f"{batch['video'][i] or 'no video'} does not exist"
            mark(batch, i, QUARANTINED, "missing_video", detail)
            continue
        start = float(batch["start_s"][i])
        try:
            frames_THWC = read_video_frames(
                path,
                fps=cfg.fps,
                start_s=start,
                end_s=start + float(batch["duration_s"][i]),
                min_pixels=cfg.min_pixels,
                max_pixels=cfg.max_pixels,
                factor=cfg.patch_size * cfg.merge_size,
            )
        except VideoError as err:
            mark(batch, i, QUARANTINED, "corrupt_video", str(err))
            continue
        if len(frames_THWC) == 0:
            mark(batch, i, QUARANTINED, "video_too_short", f"no frame after {start:.1f} s")
            continue
        frames[i] = frames_THWC.reshape(-1)
        thw[i] = np.array(frames_THWC.shape[:3], np.int32)
    batch["video_frames"], batch["video_thw"] = objects(frames), objects(thw)
    return batch


class TokenizeText:
    """Normalise text and tokenise it (no special tokens: the prompt builder adds those).
    A TTS transcript or T2M caption that comes out empty quarantines the row."""

    def __init__(self, tokenizer_path: str):
        from unimoe_ray.text.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)

    def __call__(self, batch: dict) -> dict:
        texts = [normalize_text(t) for t in batch["text"]]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, row_ids in enumerate(ids):
            if batch["status"][i] == OK and batch["task"][i] in TEXT_TASKS and not row_ids:
                mark(batch, i, QUARANTINED, "empty_text", repr(str(batch["text"][i])))
        batch["text"] = objects(texts)
        batch["text_ids"] = objects([np.asarray(row_ids, np.int32) for row_ids in ids])
        return batch


class ScoreAudio:
    """Quality scores (signal scorers always, model scorers when configured) and the rules
    that filter on them (paper §4.1)."""

    def __init__(self, cfg: QualityConfig, sample_rate: int):
        self.rules, self.sample_rate = cfg.rules, sample_rate
        self.scorers = [(s, None) for s in signal_scorers()]
        self.scorers += [(build_model_scorer(spec), spec.tasks) for spec in cfg.model_scorers]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["sample_id"])
        scores = {s.name: np.full(n, np.nan, np.float32) for s, _ in self.scorers}
        for i in range(n):
            if batch["status"][i] != OK:
                continue
            task, wav = batch["task"][i], np.asarray(batch["wav"][i], np.float32)
            row = {}
            for scorer, tasks in self.scorers:
                if tasks is None or task in tasks:
                    row[scorer.name] = scorer.score(wav, self.sample_rate, str(batch["text"][i]))
                    scores[scorer.name][i] = row[scorer.name]
            reason, detail = failed_rule(row, task, self.rules)
            if reason:
                mark(batch, i, FILTERED, reason, detail)
        for name, column in scores.items():
            batch[score_column(name)] = column
        return batch


def to_staging_table(batch: dict, *, score_names: tuple[str, ...]) -> pa.Table:
    """Numpy batch -> Arrow table in the staging schema (codes, ids and frames as plain Arrow
    lists/binary, so the shards read back with pyarrow alone)."""
    schema = staging_schema(score_names)

    columns: dict = {name: [str(v) for v in batch[name]] for name in _STRING_COLUMNS}
    columns["segment"] = np.asarray(batch["segment"], np.int32)
    columns["start_s"] = np.asarray(batch["start_s"], np.float32)
    columns["duration_s"] = np.asarray(batch["duration_s"], np.float32)
    columns["n_frames"] = np.asarray(batch["n_frames"], np.int32)
    columns["text_ids"] = [np.asarray(v, np.int32) for v in batch["text_ids"]]
    columns["codes"] = [np.asarray(v, np.uint16) for v in batch["codes"]]
    columns["video_frames"] = [np.asarray(v, np.uint8).tobytes() for v in batch["video_frames"]]
    columns["video_thw"] = [np.asarray(v, np.int32) for v in batch["video_thw"]]
    for name in score_names:
        columns[score_column(name)] = np.asarray(batch[score_column(name)], np.float32)
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)
