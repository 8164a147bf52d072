"""One request assembly: a task's text (plus a voice prompt or a video) → the prompt, the
negative prompt for classifier-free guidance and the task's sampling settings. Used by
`AudioGenerator.tts` / `.music` (inference/pipeline.py) and by the Serve runtime's engine
requests (serve/runtime.py), so the two build the same rows for the same request.

Prompts and negatives as the released code builds them (docs/DESIGN.md §1 "Prompts"): speech
negative = the same prompt with empty target text, music negative = "Low quality.". Sampling:
the released per-task defaults (`task_sampling`), video-to-music when a video is given.
"""

from __future__ import annotations

from typing import Any

import torch

from unimoe_ray.inference.sampling import SamplingConfig, task_sampling
from unimoe_ray.tasks import REQUEST_TASKS
from unimoe_ray.text.prompt import Prompt
from unimoe_ray.text.prompts import PromptBuilder

VOICE_NEEDS_TRANSCRIPT = (
    "a voice prompt needs its transcript (voice_text / reference_text / ref_text): the model reads both"
)


def assemble(
    prompts: PromptBuilder,
    task: str,
    text: str,
    *,
    voice_text: str | None = None,
    voice_codes_KT: torch.Tensor | None = None,
    video: tuple[torch.Tensor, torch.Tensor] | None = None,
    sampling: SamplingConfig | None = None,
    max_frames: int | None = None,
    exact_length: bool = False,
    overrides: dict[str, Any] | None = None,
) -> tuple[Prompt, Prompt, SamplingConfig]:
    """(prompt, negative prompt, sampling) for one request.

    task: "speech" (text = the target text; optionally a voice prompt: its (K, T) DAC codes
    and transcript) or "music" (text = the caption; optionally prepared video inputs
    `(pixel_values, grid_thw)`: video-to-music). sampling: used as given; else the task's
    released defaults with `max_frames`, `overrides` (None values ignored) and, with
    `exact_length`, EOS forbidden before `max_frames`; min_frames is then capped at max_frames.
    ValueError names what is wrong."""
    if task == "speech":
        if video is not None:
            raise ValueError("a video goes with music (video-to-music), not speech")
        if voice_codes_KT is not None and not (voice_text or "").strip():
            raise ValueError(VOICE_NEEDS_TRANSCRIPT)
        kw = dict(prompt_text=voice_text, prompt_codes_KT=voice_codes_KT)
        prompt, negative = prompts.tts(text, **kw), prompts.tts_negative(**kw)
        sampling_task = "speech"
    elif task == "music":
        prompt, negative = prompts.music(text, video=video), prompts.music_negative(video=video)
        sampling_task = "v2m" if video is not None else "music"
    else:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(REQUEST_TASKS)}")
    if sampling is None:
        extra: dict[str, Any] = {"max_frames": max_frames}
        if exact_length and max_frames is not None:
            extra["min_frames"] = max_frames
        sampling = task_sampling(sampling_task, **{**extra, **(overrides or {})})
        if sampling.max_frames is not None and sampling.min_frames > sampling.max_frames:
            sampling = sampling.replace(min_frames=sampling.max_frames)
    return prompt, negative, sampling
