"""The embedded default job: a local Ray in-process, the `small` preset, generated artifacts.

It writes a random-weight checkpoint, a small test tokenizer and a small random DAC through
the same save/load code real weights use, then a Ray actor loads them and generates a TTS
clip (voice-cloned from a synthesised reference) and a music clip. With random weights the
audio is noise; the point is that every stage runs end to end.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.audio.io import write_wav
from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.config import get_preset
from unimoe_ray.inference.sampling import task_sampling
from unimoe_ray.inference.pipeline import AudioGenerator
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out_dir: str = "outputs/demo"
    preset: str = "small"
    checkpoint: str | None = None  # a saved checkpoint folder; default: random weights
    tokenizer: str | None = None  # a tokenizer folder; default: a small trained BPE
    dac_path: str | None = None  # a DAC .pth; default: a small random DAC
    max_frames: int = 100  # 2 s at 50 frames/s
    seed: int = 0
    tts_text: str = "Hello from UniMoE Audio on Ray."
    music_caption: str = "A calm piano piece in C major at 80 bpm."


def prepare_artifacts(cfg: DemoConfig) -> tuple[Path, Path, Path]:
    """Checkpoint, tokenizer and DAC paths; missing ones are generated under out_dir."""
    out = Path(cfg.out_dir)
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else build_test_tokenizer(out / "tokenizer")
    dac_path = Path(cfg.dac_path) if cfg.dac_path else DACCodec.random(cfg.seed).save(out / "dac_small_random.pth")
    if cfg.checkpoint:
        return Path(cfg.checkpoint), tok_path, dac_path
    model_cfg = config_for_tokenizer(get_preset(cfg.preset), load_tokenizer(tok_path))
    model = UniMoEAudio(model_cfg).init_weights(seed=cfg.seed)
    return save_pretrained(model, out / f"checkpoint_{cfg.preset}"), tok_path, dac_path


def reference_voice(seconds: float = 1.0, sample_rate: int = 16000) -> np.ndarray:
    """A synthetic 'voice': a vibrato tone with harmonics, enough to exercise voice cloning."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 10 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    return (0.3 * np.sin(phase) + 0.1 * np.sin(2 * phase) + 0.05 * np.sin(3 * phase)).astype(np.float32)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, tok, dac = prepare_artifacts(cfg)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # joins RAY_ADDRESS when set, else starts a local Ray
    worker = ray.remote(num_cpus=1)(AudioGenerator).remote(str(ckpt), str(tok), str(dac))
    sampling = dict(max_frames=cfg.max_frames, seed=cfg.seed)
    t0 = time.perf_counter()
    speech_ref = worker.tts.remote(
        [cfg.tts_text], voice_wav=reference_voice(), voice_sample_rate=16000,
        voice_text="This is my voice.", sampling=task_sampling("speech", **sampling),
    )
    music_ref = worker.music.remote([cfg.music_caption], sampling=task_sampling("music", **sampling))
    results = {"tts": ray.get(speech_ref)[0], "music": ray.get(music_ref)[0]}
    elapsed = time.perf_counter() - t0
    summary: dict = {"config": asdict(cfg), "checkpoint": str(ckpt), "seconds_wall": round(elapsed, 2)}
    for name, audio in results.items():
        np.save(out / f"{name}_codes.npy", audio.codes_KT.numpy().astype(np.uint16))
        write_wav(out / f"{name}.wav", audio.wav, audio.sample_rate)
        summary[name] = {"frames": int(audio.codes_KT.shape[1]), "seconds_audio": round(audio.seconds, 2),
                         "codes": f"{name}_codes.npy", "wav": f"{name}.wav"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ray.kill(worker)
    return summary
