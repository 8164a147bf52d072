"""The model deployment's config switch `experts_group`: a replica's runtime attached to an
expert-actor group (routed experts as Ray actors, unimoe_ray.parallel) gives the same audio
as the in-process runtime for the same request and seed, with its own experts freed."""

import asyncio

import numpy as np
import pytest
import ray

from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, launch_experts, shutdown_experts
from unimoe_ray.serve.model import attach_expert_actors
from unimoe_ray.serve.runtime import AudioJob, ModelRuntime
from unimoe_ray.serve.settings import ModelSettings

pytestmark = pytest.mark.ray

GROUP = ExpertParallelConfig(group="serve-test", exchange="plain", expert_resources=ActorResources(num_cpus=0))


async def _audio(rt: ModelRuntime, job: AudioJob) -> tuple[np.ndarray, dict]:
    wav, done = [], None
    async for ev in rt.run(job, stream=False):
        if ev["type"] == "audio":
            wav.append(ev["wav"])
        else:
            done = ev
    return np.concatenate(wav), done


def test_runtime_on_expert_actors_matches_in_process(tmp_path):
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        base = dict(preset="tiny", artifacts_dir=str(tmp_path / "art"), max_rows=4, max_len=300, torch_threads=1)
        local = ModelRuntime(ModelSettings(**base))
        job = AudioJob(task="speech", text="Hello experts.", sampling={"seed": 3, "top_k": 1}, max_seconds=0.5)
        want, _ = asyncio.run(_audio(local, job))
        local.stop()
        launch_experts(local.paths["checkpoint"], GROUP)
        settings = ModelSettings(**base, experts_group=GROUP.group, experts_exchange="plain")
        remote = ModelRuntime(settings, before_start=lambda m: attach_expert_actors(m, settings))
        params = list(remote.model.moe_layers[0].routed_experts.parameters())
        assert params and all(p.device.type == "meta" for p in params)  # weights live in the actors
        got, done = asyncio.run(_audio(remote, job))
        remote.stop()
        assert np.array_equal(got, want) and len(got) == int(0.5 * 24000)
        assert done["experts_per_token"] >= 1.0
    finally:
        try:
            shutdown_experts(GROUP.group, GROUP.namespace)
        finally:
            ray.shutdown()
