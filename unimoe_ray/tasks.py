"""The task vocabulary, in one place: the paper's four training tasks (what data rows, shards,
training and evaluation name), the released front doors' task names (task files, the CLI), the
request kinds of the Serve API and AudioGenerator, and the released per-task sampling defaults
each of them decodes with (inference/sampling.py `task_sampling`).

    data task      front door (CLI)                 request   sampling defaults
    tts_zh, tts_en text_to_speech (tts)             speech    speech
    t2m            text_to_music (t2m)              music     music
    v2m            video_text_to_music (v2m)        music     v2m (music with a video)
"""

from __future__ import annotations

# The four tasks of the paper (§4): Mandarin TTS, English TTS, text-to-music, video-to-music.
DATA_TASKS = ("tts_zh", "tts_en", "t2m", "v2m")
SPEECH_TASKS = ("tts_zh", "tts_en")
MUSIC_TASKS = ("t2m", "v2m")
# Released task names, and the short ones of the CLI.
TASK_ALIASES = {
    "text_to_speech": "tts",
    "tts": "tts",
    "text_to_music": "t2m",
    "t2m": "t2m",
    "video_text_to_music": "v2m",
    "v2m": "v2m",
}
# What a request asks for (video-to-music is "music" with a video).
REQUEST_TASKS = ("speech", "music")
# The released sampling defaults, by front-door task.
SAMPLING_TASK = {"tts": "speech", "t2m": "music", "v2m": "v2m"}


def sampling_task(task: str) -> str:
    """The sampling defaults' name ("speech" | "music" | "v2m") for a data task or a front-door
    task name."""
    short = "tts" if task in SPEECH_TASKS else TASK_ALIASES.get(task)
    if short is None:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(DATA_TASKS + tuple(TASK_ALIASES))}")
    return SAMPLING_TASK[short]
