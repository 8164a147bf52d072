"""Config turned into objects, in one place (as audiocraft's `builders.py`): a random-weight
model for a preset and a tokenizer, and the artifacts recipe that gives a fresh clone a
checkpoint, a tokenizer and a DAC to load — through the same save/load code real weights use.

Core (torch only, no Ray): the Serve runtime, the demo, tests and benchmarks all build their
random-weight artifacts here, so a model made for serving and one made for a test agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.config import ModelConfig
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer


def new_model(preset: str | ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> UniMoEAudio:
    """A random-weight model of `preset` (a name, a config.json path or a ModelConfig) whose
    vocabulary and special ids are the tokenizer's; the same seed gives the same weights, every
    tensor of them: `init_weights(seed)` draws the trunk's from its own generator, and the
    vision tower, which transformers initialises as it builds it from torch's global generator,
    is built with that generator seeded (and restored after, so the caller's stream is untouched)."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UniMoEAudio(config_for_tokenizer(cfg, tokenizer))
    return model.init_weights(seed=seed)


@dataclass(frozen=True, kw_only=True)
class ArtifactsConfig:
    """What `prepare_artifacts` makes. A path given is used as it is; a missing one is
    generated under `out_dir` (random weights: the audio they give is noise)."""

    out_dir: str
    preset: str = "small"
    checkpoint: str | None = None  # a saved checkpoint folder; default: random weights of `preset`
    tokenizer: str | None = None  # a tokenizer folder; default: a small trained BPE
    dac_path: str | None = None  # a DAC .pth; default: a small random DAC
    seed: int = 0


def prepare_artifacts(cfg: ArtifactsConfig) -> tuple[Path, Path, Path]:
    """(checkpoint folder, tokenizer folder, DAC .pth); the missing ones are written under
    `cfg.out_dir` and then loaded the way real weights are (config.json + safetensors, a
    tokenizer folder, DAC's own checkpoint format)."""
    out = Path(cfg.out_dir)
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else build_test_tokenizer(out / "tokenizer")
    dac_path = Path(cfg.dac_path) if cfg.dac_path else DACCodec.random(cfg.seed).save(out / "dac_small_random.pth")
    if cfg.checkpoint:
        return Path(cfg.checkpoint), tok_path, dac_path
    model = new_model(cfg.preset, load_tokenizer(tok_path), seed=cfg.seed)
    return save_pretrained(model, out / f"checkpoint_{cfg.preset}"), tok_path, dac_path
