"""Text/video → waveform: model + tokenizer + codec, given as objects or loaded from local paths.

The plain-Python object that the demo job, Ray actors and Serve deployments wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.inference.generate import generate
from unimoe_ray.inference.requests import assemble
from unimoe_ray.inference.sampling import SamplingConfig
from unimoe_ray.inference.video import VideoSampling, load_video
from unimoe_ray.model.quantize import convert_experts
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.text.prompt import Prompt
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
    """A model, its tokenizer and its DAC codec; generates speech and music.

    `AudioGenerator(model, tokenizer, codec)` wraps objects already in memory (a model just
    built or trained needs no trip through disk); `AudioGenerator.load(checkpoint, tokenizer,
    dac_path)` loads them from local paths and sets the model up for inference."""

    def __init__(self, model: UniMoEAudio, tokenizer: PreTrainedTokenizerBase, codec: DACCodec) -> None:
        if codec.n_codebooks != model.cfg.codec_channels:
            raise ValueError(
                f"DAC has {codec.n_codebooks} codebooks but the model expects "
                f"{model.cfg.codec_channels}: use the 16 kHz DAC the model was trained with"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, model.cfg)
        self.codec = codec

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        tokenizer: str | Path,
        dac_path: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        router_precision: str | None = None,
        expert_dtype: str | None = None,
    ) -> AudioGenerator:
        """A checkpoint folder, a tokenizer folder and a DAC file (None: the released 16 kHz DAC).
        dtype: default the checkpoint's torch_dtype (bf16 for the released model).
        expert_dtype: "fp32" | "bf16" | "int8" expert weights (None: as loaded). Either way the
        model is set up for inference by `convert_experts` (stacked experts, fused q/k/v, huge
        pages, and this machine's fastest expert kernels, measured once per machine and cached;
        UNIMOE_KERNELS=default turns that off for reproducible runs)."""
        model = load_pretrained(checkpoint, dtype=dtype, device=device, router_precision=router_precision)
        convert_experts(model, expert_dtype)
        return cls(model, load_tokenizer(tokenizer), DACCodec.load(dac_path, device=device))

    def _finish(self, codes_KT: torch.Tensor) -> GeneratedAudio:
        return GeneratedAudio(codes_KT=codes_KT, wav=self.codec.decode(codes_KT), sample_rate=self.codec.sample_rate)

    def encode_voice(self, wav: np.ndarray, sample_rate: int) -> torch.Tensor:
        """A reference recording → its (K, T) DAC codes (any sample rate; resampled)."""
        return self.codec.encode(wav, sample_rate)

    def tts(
        self,
        texts: list[str],
        *,
        voice_wav: np.ndarray | None = None,
        voice_sample_rate: int | None = None,
        voice_text: str | None = None,
        voice_codes: torch.Tensor | None = None,
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
        rows = [
            assemble(self.prompts, "speech", t, voice_text=voice_text, voice_codes_KT=voice_codes, sampling=sampling)
            for t in texts
        ]
        return self._generate(rows)

    def music(
        self,
        captions: list[str],
        *,
        video: VideoInput | None = None,
        video_sampling: VideoSampling = VideoSampling(),
        sampling: SamplingConfig | None = None,
    ) -> list[GeneratedAudio]:
        """Music for each caption; with `video` (a file path, or prepared
        `(pixel_values, grid_thw)`), scored to that video. Default sampling: the released
        music / video-to-music defaults."""
        if isinstance(video, (str, Path)):
            if self.model.cfg.vision is None:
                raise ValueError("this model has no vision tower: it cannot take a video")
            video = load_video(video, self.model.cfg.vision, video_sampling)
        return self._generate([assemble(self.prompts, "music", c, video=video, sampling=sampling) for c in captions])

    def _generate(self, rows: list[tuple[Prompt, Prompt, SamplingConfig]]) -> list[GeneratedAudio]:
        """One batch of (prompt, negative, sampling) rows."""
        prompts, negatives, samplings = ([r[i] for r in rows] for i in range(3))
        return [self._finish(c) for c in generate(self.model, prompts, negatives, samplings)]
