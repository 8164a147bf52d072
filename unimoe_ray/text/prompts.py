"""Prompt formats (docs/DESIGN.md §1 "Prompts"): ChatML with the UniMoE-Audio special tokens.

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n<|AUDIO_START|>

content, per task:
- TTS with voice cloning: <|SPEECH_PROMPT_START|>{prompt text}<|SPEECH_PROMPT_END|>
  <|VOICE_PROMPT_START|>{one placeholder per voice-prompt frame}<|VOICE_PROMPT_END|>
  <|SPEECH_START|>{target text}<|SPEECH_END|>   (the voice part only when cloning)
- text-to-music: <|MUSIC_START|>{caption}<|MUSIC_END|>
- video-to-music: <vision_start>{video tokens}<vision_end> then the music content.
Negative prompts for classifier-free guidance: music "Low quality."; speech: the same prompt
with empty target text. Generation appends the first audio placeholder (a BOS frame) itself.

The voice prompt's codes enter as the released code places them: delay-patterned (BOS for a
codebook's delay + 1 steps, the codes, EOS, then PAD; `DelayPattern.voice_prompt`), one
placeholder per delayed step.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.config import ModelConfig
from unimoe_ray.text.prompt import Prompt
from unimoe_ray.text.tokenizer import special_token_ids

SYSTEM_PROMPT = "You are a helpful assistant."
MUSIC_NEGATIVE = "Low quality."


def config_for_tokenizer(cfg: ModelConfig, tok: PreTrainedTokenizerBase) -> ModelConfig:
    """Point the config's special ids at this tokenizer's. Vision ids come from the tokenizer
    when it has Qwen's vision tokens; a small test tokenizer gets ids just past its vocabulary
    (prompts insert them by id). Grows vocab_size when the tokenizer needs more."""
    ids = special_token_ids(tok)
    vocab = tok.get_vocab()
    n = len(tok)
    vision = {}
    for field, token, fallback in (
        ("vision_start_token_id", "<|vision_start|>", n),
        ("vision_end_token_id", "<|vision_end|>", n + 1),
        ("video_token_id", "<|video_pad|>", n + 2),
    ):
        vision[field] = vocab.get(token, fallback)
    # Grow the embedding only as far as the ids in use need (the released tokenizer has the
    # vision tokens, so the released 151676 rows stay as they are).
    needed = max(n, *(i + 1 for i in vision.values()))
    return cfg.replace(
        vocab_size=max(cfg.vocab_size, needed),
        codec_placeholder_id=ids["<|AUDIO_PLACEHOLDER|>"],
        eos_token_id=ids["<|im_end|>"],
        **vision,
    )


def check_tokenizer(cfg: ModelConfig, tok: PreTrainedTokenizerBase) -> None:
    """The tokenizer and the model must agree on the placeholder id and fit the vocab."""
    ids = special_token_ids(tok)
    if ids["<|AUDIO_PLACEHOLDER|>"] != cfg.codec_placeholder_id:
        raise ValueError(
            f"tokenizer's <|AUDIO_PLACEHOLDER|> is {ids['<|AUDIO_PLACEHOLDER|>']} but the model "
            f"expects {cfg.codec_placeholder_id}: load the tokenizer saved with this checkpoint "
            "(or build the config with config_for_tokenizer)"
        )
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's vocab {cfg.vocab_size}")


class PromptBuilder:
    """Tokenises task prompts into `Prompt`s for `generate` and for training rows."""

    def __init__(self, tok: PreTrainedTokenizerBase, cfg: ModelConfig) -> None:
        check_tokenizer(cfg, tok)
        self.tok = tok
        self.cfg = cfg
        self.ids = special_token_ids(tok)
        self.pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)

    def _text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False)

    def _sp(self, name: str) -> list[int]:
        return [self.ids[name]]

    def _chat(self, content: list[int]) -> list[int]:
        return (
            self._sp("<|im_start|>")
            + self._text(f"system\n{SYSTEM_PROMPT}")
            + self._sp("<|im_end|>")
            + self._text("\n")
            + self._sp("<|im_start|>")
            + self._text("user\n")
            + content
            + self._sp("<|im_end|>")
            + self._text("\n")
            + self._sp("<|im_start|>")
            + self._text("assistant\n")
            + self._sp("<|AUDIO_START|>")
        )

    def _prompt(self, ids: list[int], frames: dict[int, torch.Tensor] | None = None, **video) -> Prompt:
        ids_L = torch.tensor(ids, dtype=torch.long)
        codes_KL = None
        if frames:
            codes_KL = torch.full((self.cfg.codec_channels, len(ids)), self.cfg.codec_pad, dtype=torch.long)
            for start, f_KT in frames.items():
                codes_KL[:, start : start + f_KT.shape[1]] = f_KT
        return Prompt(input_ids_L=ids_L, audio_codes_KL=codes_KL, **video)

    def tts(
        self,
        text: str,
        *,
        prompt_text: str | None = None,
        prompt_codes_KT: torch.Tensor | None = None,
        allow_empty: bool = False,
    ) -> Prompt:
        """Speech for `text`, optionally in the voice of (prompt_text, prompt_codes_KT)."""
        target = self._text(text)
        if not target and not allow_empty:
            raise ValueError("TTS text is empty (or tokenises to nothing): give the words to speak")
        content: list[int] = []
        frames = {}
        if prompt_codes_KT is not None:
            self._check_frames(prompt_codes_KT)
            content += (
                self._sp("<|SPEECH_PROMPT_START|>") + self._text(prompt_text or "") + self._sp("<|SPEECH_PROMPT_END|>")
            )
            content += self._sp("<|VOICE_PROMPT_START|>")
            steps_KS = self.pattern.voice_prompt(prompt_codes_KT.long())
            frames[len(content)] = steps_KS
            content += [self.cfg.codec_placeholder_id] * steps_KS.shape[1]
            content += self._sp("<|VOICE_PROMPT_END|>")
        content += self._sp("<|SPEECH_START|>") + target + self._sp("<|SPEECH_END|>")
        offset = self._content_offset()
        return self._prompt(self._chat(content), {offset + s: f for s, f in frames.items()})

    def tts_negative(self, *, prompt_text: str | None = None, prompt_codes_KT: torch.Tensor | None = None) -> Prompt:
        """The unconditional row for speech: the same prompt with empty target text."""
        return self.tts("", prompt_text=prompt_text, prompt_codes_KT=prompt_codes_KT, allow_empty=True)

    def music(self, caption: str, *, video: tuple[torch.Tensor, torch.Tensor] | None = None) -> Prompt:
        """Music for `caption`; with `video=(pixel_values, grid_thw)`, video-to-music."""
        words = self._text(caption)
        if not words:
            raise ValueError("music caption is empty: describe the music (genre, tempo, instruments, mood)")
        content = self._sp("<|MUSIC_START|>") + words + self._sp("<|MUSIC_END|>")
        if video is None:
            return self._prompt(self._chat(content))
        pixel_values, grid_thw = video
        grid_thw = grid_thw.view(3).long()
        merge = self.cfg.vision.spatial_merge_size
        n_tokens = int(grid_thw.prod()) // (merge * merge)
        cfg = self.cfg
        vision = [cfg.vision_start_token_id] + [cfg.video_token_id] * n_tokens + [cfg.vision_end_token_id]
        return self._prompt(self._chat(vision + content), pixel_values=pixel_values, video_grid_thw=grid_thw[None])

    def music_negative(self, *, video: tuple[torch.Tensor, torch.Tensor] | None = None) -> Prompt:
        return self.music(MUSIC_NEGATIVE, video=video)

    def _content_offset(self) -> int:
        """Index where user content starts inside `_chat(content)`."""
        marker = [-1]
        return self._chat(marker).index(-1)

    def _check_frames(self, codes_KT: torch.Tensor) -> None:
        K = self.cfg.codec_channels
        if codes_KT.dim() != 2 or codes_KT.shape[0] != K:
            raise ValueError(f"voice prompt codes must be ({K}, frames); got {tuple(codes_KT.shape)}")
        if codes_KT.shape[1] == 0:
            raise ValueError("voice prompt has no frames: pass at least a second of reference audio")
        if codes_KT.min() < 0 or codes_KT.max() >= self.cfg.codebook_size:
            raise ValueError(f"voice prompt codes must be DAC codes in [0, {self.cfg.codebook_size})")
