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

from unimoe_ray.audio.io import write_wav
from unimoe_ray.audio.synth import reference_voice
from unimoe_ray.builders import ArtifactsConfig, prepare_artifacts
from unimoe_ray.inference.pipeline import AudioGenerator
from unimoe_ray.inference.sampling import task_sampling


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


class _Generator:
    """The demo's Ray actor: an AudioGenerator loaded inside the actor, from the paths."""

    def __init__(self, checkpoint: str, tokenizer: str, dac_path: str) -> None:
        self.gen = AudioGenerator.load(checkpoint, tokenizer, dac_path)

    def tts(self, texts: list[str], **kw):
        return self.gen.tts(texts, **kw)

    def music(self, captions: list[str], **kw):
        return self.gen.music(captions, **kw)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, tok, dac = prepare_artifacts(
        ArtifactsConfig(
            out_dir=cfg.out_dir,
            preset=cfg.preset,
            checkpoint=cfg.checkpoint,
            tokenizer=cfg.tokenizer,
            dac_path=cfg.dac_path,
            seed=cfg.seed,
        )
    )
    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # joins RAY_ADDRESS when set, else starts a local Ray
    worker = ray.remote(num_cpus=1)(_Generator).remote(str(ckpt), str(tok), str(dac))
    sampling = dict(max_frames=cfg.max_frames, seed=cfg.seed)
    t0 = time.perf_counter()
    speech_ref = worker.tts.remote(
        [cfg.tts_text],
        voice_wav=reference_voice(),
        voice_sample_rate=16000,
        voice_text="This is my voice.",
        sampling=task_sampling("speech", **sampling),
    )
    music_ref = worker.music.remote([cfg.music_caption], sampling=task_sampling("music", **sampling))
    results = {"tts": ray.get(speech_ref)[0], "music": ray.get(music_ref)[0]}
    elapsed = time.perf_counter() - t0
    summary: dict = {"config": asdict(cfg), "checkpoint": str(ckpt), "seconds_wall": round(elapsed, 2)}
    for name, audio in results.items():
        np.save(out / f"{name}_codes.npy", audio.codes_KT.numpy().astype(np.uint16))
        write_wav(out / f"{name}.wav", audio.wav, audio.sample_rate)
        summary[name] = {
            "frames": int(audio.codes_KT.shape[1]),
            "seconds_audio": round(audio.seconds, 2),
            "codes": f"{name}_codes.npy",
            "wav": f"{name}.wav",
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ray.kill(worker)
    return summary
