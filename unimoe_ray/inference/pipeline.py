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
from unimoe_ray.inference.generate import SamplingConfig, generate
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer

SPEECH_SAMPLING = SamplingConfig(guidance_scale=2.0, top_k=45, temperature=1.0, top_p=0.95)
MUSIC_SAMPLING = SamplingConfig(guidance_scale=5.0, top_k=45, temperature=1.0, top_p=0.95)


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
        *, device: str = "cpu", dtype: torch.dtype | None = None,
    ) -> None:
        self.model = load_pretrained(checkpoint, dtype=dtype, device=device)
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

    def tts(
        self, texts: list[str], *, voice_wav: np.ndarray | None = None, voice_sample_rate: int | None = None,
        voice_text: str | None = None, sampling: SamplingConfig = SPEECH_SAMPLING,
    ) -> list[GeneratedAudio]:
        """Speech for each text; with a voice prompt (waveform + its transcript), in that voice."""
        voice_codes = None
        if voice_wav is not None:
            if voice_sample_rate is None:
                raise ValueError("voice_wav needs voice_sample_rate")
            voice_codes = self.codec.encode(voice_wav, voice_sample_rate)
        kw = dict(prompt_text=voice_text, prompt_codes_KT=voice_codes)
        prompts = [self.prompts.tts(t, **kw) for t in texts]
        negatives = [self.prompts.tts_negative(**kw) for _ in texts]
        return [self._finish(c) for c in generate(self.model, prompts, negatives, sampling)]

    def music(
        self, captions: list[str], *, video: tuple[torch.Tensor, torch.Tensor] | None = None,
        sampling: SamplingConfig = MUSIC_SAMPLING,
    ) -> list[GeneratedAudio]:
        """Music for each caption; with `video=(pixel_values, grid_thw)`, scored to that video."""
        prompts = [self.prompts.music(c, video=video) for c in captions]
        negatives = [self.prompts.music_negative(video=video) for _ in captions]
        return [self._finish(c) for c in generate(self.model, prompts, negatives, sampling)]
