"""Decode -> mono 16 kHz -> segment: one manifest row in, one item per segment out.

Used as a Ray Data `flat_map` function (stateless, so plain tasks). Any failure turns the row
into a single quarantined item with its reason; nothing is raised, so the job always completes
and every manifest row is accounted for.

Item layout: the source columns plus sample_id, segment, start_s, duration_s and `wav`
(float32 at 16 kHz; empty unless the item is ok).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unimoe_ray.audio.io import AudioError, read_audio, resample
from unimoe_ray.data.config import MUSIC_TASKS, SPEECH_TASKS, AudioConfig
from unimoe_ray.data.schema import FILTERED, OK, QUARANTINED, sample_id

_EMPTY_WAV = np.zeros(0, np.float32)


def segment_bounds(n_samples: int, task: str, cfg: AudioConfig) -> list[tuple[int, int]]:
    """[start, stop) sample windows: music in fixed windows (the last one dropped when shorter
    than min_tail_s, unless it is the only one), speech whole.

    Example (window 20 s, min tail 5 s): 47 s of music -> [0, 20) [20, 40) [40, 47) s;
    43 s -> [0, 20) [20, 40) s.
    """
    if task not in MUSIC_TASKS:
        return [(0, n_samples)]
    window = int(round(cfg.music_window_s * cfg.sample_rate))
    min_tail = int(round(cfg.min_tail_s * cfg.sample_rate))
    bounds = [(a, min(a + window, n_samples)) for a in range(0, max(n_samples, 1), window)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_tail:
        bounds.pop()
    return bounds


def _clip_problem(clip: np.ndarray, task: str, cfg: AudioConfig) -> tuple[str, str, str]:
    """(status, reason, detail) for a decoded clip: unusable clips are quarantined, usable but
    over-long speech is filtered."""
    seconds = len(clip) / cfg.sample_rate
    if seconds < cfg.min_duration_s:
        return QUARANTINED, "too_short", f"{seconds:.2f} s < {cfg.min_duration_s:g} s"
    peak = float(np.max(np.abs(clip)))
    if peak < cfg.silence_peak:
        return QUARANTINED, "silent", f"peak {peak:.2g} < {cfg.silence_peak:g}"
    if task in SPEECH_TASKS and seconds > cfg.max_speech_s:
        return FILTERED, "too_long", f"{seconds:.1f} s > {cfg.max_speech_s:g} s"
    return OK, "", ""


def _item(
    row: dict, segment: int, start: int, stop: int, sr: int, status: str, reason: str, detail: str, wav: np.ndarray
) -> dict:
    item = dict(row)
    item.update(
        sample_id=sample_id(row["source_id"], segment),
        segment=segment,
        start_s=start / sr,
        duration_s=(stop - start) / sr,
        status=status,
        reason=reason,
        detail=detail,
        wav=wav if status == OK else _EMPTY_WAV,
    )
    return item


class _Unusable(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _read(row: dict, sr: int) -> np.ndarray:
    """The row's audio, mono at `sr`; _Unusable(reason) when it cannot be had."""
    path = Path(row["audio_path"])
    if not path.is_file():
        raise _Unusable("missing_audio", f"{row['audio']} does not exist")
    if path.stat().st_size == 0:
        raise _Unusable("empty_file", f"{row['audio']} has 0 bytes")
    try:
        wav, file_sr = read_audio(path)
    except AudioError as err:
        raise _Unusable("corrupt_audio", str(err)) from err
    return resample(wav, file_sr, sr)


def decode_row(row: dict, *, cfg: AudioConfig) -> list[dict]:
    """Ray Data flat_map: source row -> items (one per segment), quarantining on failure."""
    sr = cfg.sample_rate
    if row["status"] != OK:  # already quarantined on the driver (duplicate, unknown task)
        return [_item(row, 0, 0, 0, sr, row["status"], row["reason"], row["detail"], _EMPTY_WAV)]
    try:
        wav = _read(row, sr)
    except _Unusable as err:
        return [_item(row, 0, 0, 0, sr, QUARANTINED, err.reason, err.detail, _EMPTY_WAV)]
    except Exception as err:  # a decoder bug must not take the job down; keep the evidence
        return [_item(row, 0, 0, 0, sr, QUARANTINED, "decode_error", repr(err), _EMPTY_WAV)]
    items = []
    for segment, (start, stop) in enumerate(segment_bounds(len(wav), row["task"], cfg)):
        clip = np.ascontiguousarray(wav[start:stop], dtype=np.float32)
        status, reason, detail = _clip_problem(clip, row["task"], cfg)
        items.append(_item(row, segment, start, stop, sr, status, reason, detail, clip))
    return items
