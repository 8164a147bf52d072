"""Generation tasks as the released front doors name them (`examples/inference.py`,
`examples/test_tasks.json`): text_to_speech (voice-cloned TTS), text_to_music,
video_text_to_music. One request type, checked up front so that a bad item fails with its
reason before any model time is spent; shared by `unimoe-ray generate` and
`jobs/generate_batch.py`.

A task file is the released JSON list (or JSONL, one object per line):

    {"task_type": "text_to_speech", "task_id": "s1", "target_text": "...",
     "reference_audio": "ref.wav", "reference_text": "...", "output_path": "out/speech"}
    {"task_type": "text_to_speech", "task_id": "s2", "target_text": "...", "voice": "english_male"}
    {"task_type": "text_to_music", "task_id": "m1", "caption": "...", "output_path": "out/music"}
    {"task_type": "video_text_to_music", "task_id": "v1", "caption": "...", "video_path": "clip.mp4"}

`output_path` is a folder (the WAV is `{task_id}.wav` inside it) or a `.wav` file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from unimoe_ray.audio.io import read_audio, write_wav
from unimoe_ray.inference.sampling import SamplingConfig, task_sampling
from unimoe_ray.inference.video import VideoSampling
from unimoe_ray.inference.voices import VoiceLibrary
from unimoe_ray.tasks import SAMPLING_TASK, TASK_ALIASES  # the task vocabulary: unimoe_ray/tasks.py


class TaskError(ValueError):
    """A task that cannot run as given; the message names the field and the fix."""


@dataclass(frozen=True, kw_only=True)
class TaskRequest:
    task: str  # tts | t2m | v2m
    task_id: str
    text: str  # speech: the words; music: the caption
    voice: str | None = None
    reference_audio: str | None = None
    reference_text: str | None = None
    video_path: str | None = None
    output_path: str = "output"
    sampling: dict = field(default_factory=dict)  # SamplingConfig overrides

    @classmethod
    def from_released(cls, item: dict, index: int = 0, base: Path | None = None) -> "TaskRequest":
        """One object of a released-style task file (paths relative to `base`)."""
        if not isinstance(item, dict):
            raise TaskError(f"task #{index} is not an object: {item!r}")
        kind = TASK_ALIASES.get(str(item.get("task_type", "")))
        if kind is None:
            raise TaskError(
                f"task #{index}: task_type {item.get('task_type')!r}; use text_to_speech, "
                "text_to_music or video_text_to_music"
            )

        def path(key: str) -> str | None:
            v = item.get(key)
            if v is None or base is None or Path(v).is_absolute():
                return v
            return str(base / v)

        text = item.get("target_text") if kind == "tts" else item.get("caption")
        return cls(
            task=kind,
            task_id=str(item.get("task_id", f"task_{index:04d}")),
            text=text if text is not None else "",
            voice=item.get("voice"),
            reference_audio=path("reference_audio"),
            reference_text=item.get("reference_text"),
            video_path=path("video_path") or path("video"),
            output_path=path("output_path") or "output",
            sampling=dict(item.get("sampling") or {}),
        )

    def output_file(self) -> Path:
        out = Path(self.output_path)
        return out if out.suffix.lower() == ".wav" else out / f"{self.task_id}.wav"

    def sampling_config(self, **defaults) -> SamplingConfig:
        try:
            return task_sampling(SAMPLING_TASK[self.task], **{**defaults, **self.sampling})
        except TypeError as err:
            raise TaskError(f"task {self.task_id}: bad sampling option ({err})") from None

    def check(self, voices: VoiceLibrary | None) -> None:
        """Every reason this task cannot run, before any model time is spent."""
        what = "target_text" if self.task == "tts" else "caption"
        if not self.text.strip():
            raise TaskError(f"task {self.task_id}: {what} is empty")
        if self.task == "tts":
            if self.voice is not None:
                if self.reference_audio is not None:
                    raise TaskError(f"task {self.task_id}: give a voice name or reference_audio, not both")
                if voices is None:
                    raise TaskError(
                        f"task {self.task_id}: voice {self.voice!r} needs a voice library (--voice-library)"
                    )
                voices.get(self.voice)  # VoiceError names the known voices / the missing file
            elif self.reference_audio is None:
                raise TaskError(
                    f"task {self.task_id}: text_to_speech needs a voice: a voice name from the library "
                    "or reference_audio + reference_text"
                )
            else:
                if not Path(self.reference_audio).is_file():
                    raise TaskError(f"task {self.task_id}: reference_audio {self.reference_audio} does not exist")
                if not (self.reference_text or "").strip():
                    raise TaskError(f"task {self.task_id}: reference_text (the transcript of reference_audio) is empty")
        if self.task == "v2m":
            if not self.video_path:
                raise TaskError(f"task {self.task_id}: video_text_to_music needs video_path")
            if not Path(self.video_path).is_file():
                raise TaskError(f"task {self.task_id}: video_path {self.video_path} does not exist")
        self.sampling_config()


def read_task_file(path: str | Path) -> list[dict]:
    """The released JSON list, or JSONL (one object per line). Raw objects: each is checked
    on its own, so one bad item cannot sink the file."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("tasks", [data])
        if not isinstance(data, list):
            raise TaskError(f"task file {path}: expected a JSON list of tasks (or JSONL)")
        return data
    except json.JSONDecodeError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as err:
                    items.append({"task_id": f"line_{n}", "_error": f"line {n} is not JSON: {err.msg}"})
        return items


def run_task(
    generator,
    req: TaskRequest,
    voices: VoiceLibrary | None = None,
    video_sampling: VideoSampling = VideoSampling(),
    **sampling_defaults,
) -> dict:
    """Run one checked task on an AudioGenerator; write its WAV; return the manifest row."""
    req.check(voices)
    sampling = req.sampling_config(**sampling_defaults)
    t0 = time.perf_counter()
    if req.task == "tts":
        if req.voice is not None:
            v = voices.get(req.voice)
            ref_path, ref_text = v.audio_path, v.transcript
        else:
            ref_path, ref_text = Path(req.reference_audio), req.reference_text
        wav, sr = read_audio(ref_path)
        audio = generator.tts([req.text], voice_wav=wav, voice_sample_rate=sr, voice_text=ref_text, sampling=sampling)[
            0
        ]
    else:
        video = req.video_path if req.task == "v2m" else None
        audio = generator.music([req.text], video=video, video_sampling=video_sampling, sampling=sampling)[0]
    out = req.output_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_wav(out, audio.wav, audio.sample_rate)
    return {
        "task_id": req.task_id,
        "task": req.task,
        "status": "ok",
        "output": str(out),
        "frames": int(audio.codes_KT.shape[1]),
        "seconds_audio": round(audio.seconds, 3),
        "seconds_wall": round(time.perf_counter() - t0, 3),
        "error": None,
    }
