"""The model deployment: one ModelRuntime (one decode engine) per replica, reconfigured live
from `user_config`, with Prometheus metrics through ray.util.metrics (exported by Ray's
metrics agent: time to first audio, real-time factor, queue depth, running rows, experts per
token)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from ray import serve
from ray.util import metrics

from unimoe_ray.inference.engine import EngineFullError
from unimoe_ray.serve.runtime import AudioJob, ModelRuntime
from unimoe_ray.serve.settings import ModelSettings


class ModelBusyError(RuntimeError):
    """The replica's engine queue is full (the ingress answers 429 with Retry-After)."""


def _metrics(name: str) -> dict:
    tags = ("deployment",)
    return {
        "ttfa": metrics.Histogram(
            "unimoe_time_to_first_audio_seconds",
            "Request start to first audio chunk",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
            tag_keys=tags,
        ),
        "rtf": metrics.Histogram(
            "unimoe_real_time_factor",
            "Wall seconds per second of audio",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8],
            tag_keys=tags,
        ),
        "audio": metrics.Counter("unimoe_audio_seconds_total", "Seconds of audio generated", tag_keys=tags),
        "queue": metrics.Gauge("unimoe_engine_queue_depth", "Requests waiting for a KV slot", tag_keys=tags),
        "rows": metrics.Gauge("unimoe_engine_active_rows", "Rows in the running batch", tag_keys=tags),
        "requests": metrics.Gauge("unimoe_engine_active_requests", "Requests in the running batch", tag_keys=tags),
        "experts": metrics.Gauge(
            "unimoe_experts_per_token", "Mean experts chosen per token (last step)", tag_keys=tags
        ),
    }


def attach_expert_actors(model, settings: ModelSettings) -> None:
    """The distributed path: the model's routed experts run on a launched expert-actor group
    (unimoe_ray.parallel; `unimoe-ray experts launch`), the trunk stays in this replica."""
    from unimoe_ray.parallel import ExpertParallelConfig, attach_experts

    kw = {"group": settings.experts_group}
    if settings.experts_namespace:
        kw["namespace"] = settings.experts_namespace
    if settings.experts_exchange:
        kw["exchange"] = settings.experts_exchange
    attach_experts(model, ExpertParallelConfig(**kw))


@serve.deployment(name="AudioModel", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
class AudioModel:
    def __init__(self, name: str = "AudioModel") -> None:
        self.name = name
        self.runtime: ModelRuntime | None = None
        self.settings: ModelSettings | None = None
        self.metrics = _metrics(name)
        self.tags = {"deployment": name}
        self._gauges_task = None

    def reconfigure(self, user_config: dict) -> None:
        """Live settings apply at once; model paths, device or engine sizes reload the model."""
        settings = ModelSettings.from_dict(user_config)
        if self.runtime is not None and self.settings.model_key() == settings.model_key():
            self.runtime.update_live(settings)
            self.settings = settings
            return
        old = self.runtime
        attach = (lambda model: attach_expert_actors(model, settings)) if settings.experts_group else None
        self.runtime = ModelRuntime(settings, before_start=attach)
        self.settings = settings
        if old is not None:
            old.stop()

    async def _gauges(self) -> None:
        while True:
            if self.runtime is not None:
                e = self.runtime.engine
                self.metrics["queue"].set(e.num_waiting, tags=self.tags)
                self.metrics["rows"].set(e.running_rows, tags=self.tags)
                self.metrics["requests"].set(e.num_running, tags=self.tags)
                self.metrics["experts"].set(e.stats.experts_per_token, tags=self.tags)
            await asyncio.sleep(1.0)

    def _require(self) -> ModelRuntime:
        if self.runtime is None:
            raise RuntimeError("model not loaded: the deployment needs a user_config")
        if self._gauges_task is None:
            self._gauges_task = asyncio.get_running_loop().create_task(self._gauges())
        return self.runtime

    async def generate(self, job: AudioJob, stream: bool):
        """Streams the runtime's events (see ModelRuntime.run)."""
        rt = self._require()
        try:
            async for event in rt.run(job, stream=stream):
                if event["type"] == "done":
                    if event["ttfa_s"] is not None:
                        self.metrics["ttfa"].observe(event["ttfa_s"], tags=self.tags)
                    if event["rtf"] is not None:
                        self.metrics["rtf"].observe(event["rtf"], tags=self.tags)
                    self.metrics["audio"].inc(event["seconds"], tags=self.tags)
                yield event
        except EngineFullError as err:
            raise ModelBusyError(str(err)) from None

    async def encode_voice(self, audio: bytes, max_seconds: float):
        return await asyncio.to_thread(self._require().encode_voice, audio, max_seconds)

    async def info(self) -> dict:
        rt = self._require()
        cfg = rt.model.cfg
        return {
            "model": rt.model_name,
            "paths": rt.paths,
            "settings": asdict(self.settings),
            "vision": cfg.vision is not None,
            "status": rt.status(),
            "time": time.time(),
        }

    def check_health(self) -> None:
        """Serve's liveness probe: a dead loop thread, broken slot accounting or a stalled
        engine (work and no step for stall_timeout_s) fail it, and Serve replaces the replica."""
        if self.runtime is None:
            raise RuntimeError("model not loaded: the deployment needs a user_config")
        problem = self.runtime.health()
        if problem is not None:
            raise RuntimeError(problem)
