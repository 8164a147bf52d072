"""What one model replica runs, as a plain Python object (no Ray): the checkpoint, tokenizer
and DAC (inference/pipeline.AudioGenerator), one continuous-batching DecodeEngine on a
background thread, and an async API that turns a request into audio events as frames complete.
The Serve deployment (serve/model.py) is a thin adapter over it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import torch

from unimoe_ray.inference.engine import DecodeEngine, EngineOutput, EngineRequest
from unimoe_ray.inference.engine_loop import EngineLoop
from unimoe_ray.inference.pipeline import AudioGenerator
from unimoe_ray.inference.requests import assemble
from unimoe_ray.inference.sampling import SamplingConfig
from unimoe_ray.inference.streaming import StreamingDecoder, decode_whole
from unimoe_ray.inference.video import VideoSampling
from unimoe_ray.serve.formats import SAMPLE_RATE
from unimoe_ray.serve.settings import ModelSettings
from unimoe_ray.serve.untrusted_media import VideoPlan, read_audio_upload, read_video_upload


class GenerationTimeout(TimeoutError):
    """The request passed its deadline in the engine (HTTP 504)."""


class EngineError(RuntimeError):
    """The model or the engine failed, not the request (HTTP 500; the message stays server-side)."""


def resolve_artifacts(s: ModelSettings) -> tuple[str, str, str]:
    """Checkpoint, tokenizer and DAC paths; missing ones generated once (a file lock lets
    several replicas start together; later starts reuse what the first wrote)."""
    if s.checkpoint and s.tokenizer and s.dac_path:
        return s.checkpoint, s.tokenizer, s.dac_path
    from unimoe_ray.builders import ArtifactsConfig, prepare_artifacts

    out = Path(s.artifacts_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    marker = out / f"artifacts_{s.preset}.json"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            paths = json.loads(marker.read_text())
        else:
            ckpt, tok, dac = prepare_artifacts(
                ArtifactsConfig(
                    out_dir=str(out),
                    preset=s.preset,
                    checkpoint=s.checkpoint,
                    tokenizer=s.tokenizer,
                    dac_path=s.dac_path,
                )
            )
            paths = {"checkpoint": str(ckpt), "tokenizer": str(tok), "dac_path": str(dac)}
            if not (s.checkpoint or s.tokenizer or s.dac_path):
                marker.write_text(json.dumps(paths))
    return (s.checkpoint or paths["checkpoint"], s.tokenizer or paths["tokenizer"], s.dac_path or paths["dac_path"])


@dataclass(frozen=True)
class AudioJob:
    """A request as the ingress hands it to a model replica (plain, picklable)."""

    task: str  # "speech" | "music"
    text: str  # speech: words to say; music: the caption
    sampling: dict  # SamplingConfig overrides (seed, guidance_scale, temperature, top_k, top_p, ...)
    max_seconds: float
    exact_seconds: bool = False  # music `duration`: EOS forbidden before, forced at the length
    voice_codes: np.ndarray | None = None  # (K, T) DAC codes of the voice prompt
    voice_text: str | None = None
    video: bytes | None = None  # an uploaded video (video-to-music)


class ModelRuntime:
    def __init__(self, settings: ModelSettings, *, before_start=None) -> None:
        """before_start(model): called with the loaded model before the engine starts
        (the Serve deployment attaches expert actors there)."""
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        ckpt, tok, dac = resolve_artifacts(settings)
        self.paths = {"checkpoint": ckpt, "tokenizer": tok, "dac_path": dac}
        self.gen = AudioGenerator.load(
            ckpt, tok, dac, device=settings.device, dtype=settings.dtype, expert_dtype=settings.expert_dtype
        )
        self.model = self.gen.model.eval()
        if before_start is not None:
            before_start(self.model)
        self.engine = DecodeEngine(
            self.model,
            max_rows=settings.max_rows,
            max_len=settings.max_len,
            max_waiting=settings.max_waiting,
            timeout_s=settings.request_timeout_s,
        )
        self.loop = EngineLoop(self.engine)
        self.model_name = Path(ckpt).name

    def update_live(self, settings: ModelSettings) -> None:
        """Apply settings that need no reload."""
        self.settings = settings
        self.engine.max_waiting = settings.max_waiting
        self.engine.timeout_s = settings.request_timeout_s

    def health(self) -> str | None:
        """None when the engine is live; else the reason (the replica's check_health raises it)."""
        return self.loop.health(self.settings.stall_timeout_s)

    def stop(self) -> None:
        self.loop.stop()

    # ---- requests ----

    def encode_voice(self, audio: bytes, max_seconds: float) -> np.ndarray:
        """A client's audio bytes → (K, T) int16 DAC codes. The header is checked and the audio
        decoded in a child process (serve/untrusted_media); ValueError names what is wrong."""
        wav, sr = read_audio_upload(audio, max_seconds=max_seconds, target_rate=self.gen.codec.sample_rate)
        return self.gen.encode_voice(wav, sr).numpy().astype(np.int16)

    def engine_request(self, job: AudioJob) -> EngineRequest:
        frames = max(1, int(round(job.max_seconds * self.gen.codec.frame_rate)))
        codes = None
        if job.voice_codes is not None:  # a stored voice, or inline reference audio the ingress had encoded
            codes = torch.as_tensor(np.asarray(job.voice_codes)).long()
        video = self._video(job.video) if job.task == "music" and job.video is not None else None
        prompt, negative, sampling = assemble(
            self.gen.prompts,
            job.task,
            job.text,
            voice_text=job.voice_text,
            voice_codes_KT=codes,
            video=video,
            max_frames=frames,
            exact_length=job.task == "music" and job.exact_seconds,
            overrides=job.sampling,
        )
        return EngineRequest(
            prompt,
            negative if sampling.guidance_scale > 0 else None,
            sampling,
            timeout_s=self.settings.request_timeout_s,
        )

    def _video(self, data: bytes):
        if self.model.cfg.vision is None:
            raise ValueError("this model has no vision tower: it cannot take a video")
        # A client's bytes: parsed by PyAV in a child process (serve/untrusted_media), never by
        # decord; the same vision inputs as inference/video.load_video gives for a file.
        plan = VideoPlan.of(self.model.cfg.vision, VideoSampling())
        pixel_values, grid_thw = read_video_upload(data, plan)
        return torch.from_numpy(pixel_values), torch.from_numpy(grid_thw)

    async def run(self, job: AudioJob, *, stream: bool) -> AsyncIterator[dict[str, Any]]:
        """Audio events for one job: {"type": "audio", "wav": float32 24 kHz chunk} ... then
        {"type": "done", ...usage and timings}. With stream=False one audio event (the whole
        clip, decoded at once). Closing the iterator early cancels the engine row."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        req = await asyncio.to_thread(self.engine_request, job)  # tokenise / DAC-encode / video off the loop
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        rid = self.loop.submit(req, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        codec = self.gen.codec
        dec = (
            StreamingDecoder(
                codec,
                out_rate=SAMPLE_RATE,
                first_chunk=self.settings.first_chunk_frames,
                chunk=self.settings.chunk_frames,
            )
            if stream
            else None
        )
        frames: list[torch.Tensor] = []
        ttfa = None
        finished = False
        try:
            while True:
                out = await queue.get()
                if out.frames_KT.shape[1]:
                    frames.append(out.frames_KT)
                    if dec is not None:
                        # A thread only when a chunk is due (DAC decode); most steps just store a frame.
                        pushed = (
                            await asyncio.to_thread(dec.push, out.frames_KT)
                            if dec.renders_after(out.frames_KT.shape[1])
                            else dec.push(out.frames_KT)
                        )
                        for chunk in pushed:
                            ttfa = ttfa if ttfa is not None else time.monotonic() - t0
                            yield {"type": "audio", "wav": chunk}
                if out.done:
                    finished = True
                    if out.finish_reason == "timeout":
                        raise GenerationTimeout(out.error)
                    if out.finish_reason == "error":
                        # The request's own fault is a client error; the model's is a server one.
                        raise (ValueError if out.error_kind == "invalid" else EngineError)(out.error)
                    if out.finish_reason == "cancelled":
                        return
                    break
            codes_KT = torch.cat(frames, dim=1) if frames else torch.zeros(codec.n_codebooks, 0, dtype=torch.long)
            if dec is not None:
                tail = await asyncio.to_thread(dec.finish)
            else:
                tail = await asyncio.to_thread(decode_whole, codec, codes_KT, SAMPLE_RATE)
            if len(tail):
                ttfa = ttfa if ttfa is not None else time.monotonic() - t0
                yield {"type": "audio", "wav": tail}
            wall = time.monotonic() - t0
            seconds = codes_KT.shape[1] / codec.frame_rate
            yield {
                "type": "done",
                "frames": int(codes_KT.shape[1]),
                "seconds": seconds,
                "finish_reason": out.finish_reason,
                "ttfa_s": ttfa,
                "wall_s": wall,
                "rtf": wall / seconds if seconds else None,
                "experts_per_token": self.engine.stats.experts_per_token,
                "prompt_tokens": int(req.prompt.input_ids_L.numel()),
            }
        finally:
            if not finished:
                self.loop.cancel(rid)  # the client went away: free the row now

    def status(self) -> dict:
        e = self.engine
        return {
            "running_requests": e.num_running,
            "running_rows": e.running_rows,
            "waiting": e.num_waiting,
            "max_rows": e.cache.rows,
            "free_rows": e.cache.free,
            "steps": e.stats.steps,
            "finished": e.stats.finished,
            "cancelled": e.stats.cancelled,
            "failed": e.stats.failed,
            "timed_out": e.stats.timed_out,
            "experts_per_token": e.stats.experts_per_token,
            "healthy": self.health() is None,
        }


def sampling_overrides(**knobs) -> dict:
    """The API's sampling extensions, checked by SamplingConfig (ValueError names the knob).
    temperature 0 means greedy decoding (as OpenAI's and the released do_sample=False)."""
    clean = {k: v for k, v in knobs.items() if v is not None}
    if clean.get("temperature") == 0:
        del clean["temperature"]
        clean["greedy"] = True
    SamplingConfig(**clean)  # validate early, at the ingress
    return clean
