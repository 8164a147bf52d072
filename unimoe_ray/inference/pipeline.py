"""Text/video → waveform: model + tokenizer + codec, each loaded from a local path.

The plain-Python object that the demo job, Ray actors and Serve deployments wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.inference.generate import generate
from unimoe_ray.inference.sampling import SamplingConfig, task_sampling
from unimoe_ray.inference.video import VideoSampling, load_video
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer

VideoInput = str | Path | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GeneratedAudio:
    codes_KT: torch.Tensor  # DAC codes, delay pattern already reverted
    wav: np.ndarray  # float32 mono
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate


class AudioGenerator:
    """Loads a checkpoint folder, a tokenizer folder and a DAC file; generates speech and music."""

    def __init__(
        self, checkpoint: str | Path, tokenizer: str | Path, dac_path: str | Path | None = None,
        *, device: str = "cpu", dtype: torch.dtype | str | None = None, router_precision: str | None = None,
        expert_dtype: str | None = None,
    ) -> None:
        """dtype: default the checkpoint's torch_dtype (bf16 for the released model).
        expert_dtype: "fp32" | "bf16" | "int8" expert weights (None: as loaded). Either way the
        fastest expert kernels of this machine are picked here, measured once per machine and
        cached (UNIMOE_KERNELS=default turns that off for reproducible runs)."""
        from unimoe_ray.model.quantize import convert_experts

        self.model = load_pretrained(checkpoint, dtype=dtype, device=device, router_precision=router_precision)
        convert_experts(self.model, expert_dtype)
        self.tokenizer = load_tokenizer(tokenizer)
        self.prompts = PromptBuilder(self.tokenizer, self.model.cfg)
        self.codec = DACCodec.load(dac_path, device=device)
        if self.codec.n_codebooks != self.model.cfg.codec_channels:
            raise ValueError(
                f"DAC has {self.codec.n_codebooks} codebooks but the model expects "
                f"{self.model.cfg.codec_channels}: use the 16 kHz DAC the model was trained with"
            )

    def _finish(self, codes_KT: torch.Tensor) -> GeneratedAudio:
        return GeneratedAudio(codes_KT=codes_KT, wav=self.codec.decode(codes_KT), sample_rate=self.codec.sample_rate)

    def encode_voice(self, wav: np.ndarray, sample_rate: int) -> torch.Tensor:
        """A reference recording → its (K, T) DAC codes (any sample rate; resampled)."""
        return self.codec.encode(wav, sample_rate)

    def tts(
        self, texts: list[str], *, voice_wav: np.ndarray | None = None, voice_sample_rate: int | None = None,
        voice_text: str | None = None, voice_codes: torch.Tensor | None = None,
        sampling: SamplingConfig | None = None,
    ) -> list[GeneratedAudio]:
        """Speech for each text; with a voice prompt (a waveform or its DAC codes, plus its
        transcript), in that voice. Default sampling: the released speech defaults."""
        if voice_wav is not None:
            if voice_codes is not None:
                raise ValueError("give voice_wav or voice_codes, not both")
            if voice_sample_rate is None:
                raise ValueError("voice_wav needs voice_sample_rate")
            voice_codes = self.encode_voice(voice_wav, voice_sample_rate)
        if voice_codes is not None and not (voice_text or "").strip():
            raise ValueError("a voice prompt needs its transcript (voice_text): the model reads both")
        kw = dict(prompt_text=voice_text, prompt_codes_KT=voice_codes)
        prompts = [self.prompts.tts(t, **kw) for t in texts]
        negatives = [self.prompts.tts_negative(**kw) for _ in texts]
        sampling = sampling or task_sampling("speech")
        return [self._finish(c) for c in generate(self.model, prompts, negatives, sampling)]

    def music(
        self, captions: list[str], *, video: VideoInput | None = None,
        video_sampling: VideoSampling = VideoSampling(), sampling: SamplingConfig | None = None,
    ) -> list[GeneratedAudio]:
        """Music for each caption; with `video` (a file path, or prepared
        `(pixel_values, grid_thw)`), scored to that video. Default sampling: the released
        music / video-to-music defaults."""
        if isinstance(video, (str, Path)):
            if self.model.cfg.vision is None:
                raise ValueError("this model has no vision tower: it cannot take a video")
            video = load_video(video, self.model.cfg.vision, video_sampling)
        prompts = [self.prompts.music(c, video=video) for c in captions]
        negatives = [self.prompts.music_negative(video=video) for _ in captions]
        sampling = sampling or task_sampling("v2m" if video is not None else "music")
        return [self._finish(c) for c in generate(self.model, prompts, negatives, sampling)]
