"""Synthetic training shards in the exact schema of `jobs/preprocess.py` (unimoe_ray.data.schema),
for tests and step benchmarks that need many rows in a second, not a corpus through the codec.

The codes are not encodings of audio: each task draws its frames from its own small code
alphabet with a repeating motif, so a model can learn them in a few steps and the loss
visibly falls. Texts come from the mini corpus's sentence grammars. For real encoded data use
`jobs/make_mini_corpus.py` + `jobs/preprocess.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unimoe_ray.audio.codec import FRAME_RATE
from unimoe_ray.data.mini_corpus import english_sentence, mandarin_sentence
from unimoe_ray.data.schema import N_CODEBOOKS, sample_id, shard_schema, source_id
from unimoe_ray.tasks import DATA_TASKS

_CAPTIONS = (
    "A slow piano ballad in C minor with soft strings.",
    "Upbeat electronic dance track with driving bass.",
    "Acoustic guitar folk song in G major.",
    "Ambient soundscape, slow evolving pads, calm mood.",
)


def synthetic_rows(
    task: str,
    n: int,
    *,
    seed: int = 0,
    frames: tuple[int, int] = (20, 40),
    video_thw: tuple[int, int, int] = (2, 28, 28),
) -> list[dict]:
    """`n` shard rows of one task (all schema columns, no quality scores)."""
    rows = []
    task_id = DATA_TASKS.index(task)
    for i in range(n):
        rng = np.random.default_rng([seed, task_id, i])
        if task == "tts_en":
            text = english_sentence(rng)
        elif task == "tts_zh":
            text = mandarin_sentence(rng)
        else:
            text = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
        T = int(rng.integers(frames[0], frames[1] + 1))
        alphabet_K4 = (np.arange(4)[None, :] * 7 + task_id * 40 + np.arange(N_CODEBOOKS)[:, None] * 3) % 1024
        motif = rng.integers(0, 4, size=4)
        codes_KT = alphabet_K4[:, motif[np.arange(T) % 4]].astype(np.uint16)
        audio = f"synthetic/{task}_{i:05d}.wav"
        src = source_id(task, audio)
        video, thw = "", [0, 0, 0]
        video_frames = b""
        if task == "v2m":
            t, h, w = video_thw
            video, thw = f"synthetic/{task}_{i:05d}.mp4", [t, h, w]
            video_frames = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8).tobytes()
        rows.append(
            dict(
                sample_id=sample_id(src, 0),
                source_id=src,
                task=task,
                audio=audio,
                video=video,
                segment=0,
                start_s=0.0,
                duration_s=T / FRAME_RATE,
                text=text,
                speaker=f"spk{i % 3}",
                language="zh" if task == "tts_zh" else "en",
                text_ids=[],
                n_frames=T,
                codes=codes_KT.reshape(-1).tolist(),
                video_frames=video_frames,
                video_thw=thw,
            )
        )
    return rows


def write_synthetic_shards(
    out_dir: str | Path,
    rows_per_task: dict[str, int],
    *,
    seed: int = 0,
    rows_per_shard: int = 64,
    frames: tuple[int, int] = (20, 40),
) -> list[Path]:
    """Write shard-00000.parquet … sorted by sample id, like `jobs/preprocess.py`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for task, n in rows_per_task.items() for r in synthetic_rows(task, n, seed=seed, frames=frames)]
    rows.sort(key=lambda r: r["sample_id"])
    schema = shard_schema(())
    paths = []
    for k in range(0, max(len(rows), 1), rows_per_shard):
        path = out / f"shard-{k // rows_per_shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[k : k + rows_per_shard], schema=schema), path)
        paths.append(path)
    return paths
