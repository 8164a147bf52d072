"""Serving pieces without Ray running: the serve_configs validate against Ray Serve's own
schema and our settings classes; audio formats (streamed WAV header, pcm, speed with pitch
kept); the voice store (persistence across instances, cap, library voices protected)."""

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from ray.serve.schema import ServeDeploySchema

from unimoe_ray.serve import formats
from unimoe_ray.serve.settings import IngressSettings, ModelSettings, SettingsError
from unimoe_ray.serve.voices import VoiceStore, VoiceStoreError

CONFIGS = Path(__file__).parents[2] / "serve_configs"


@pytest.mark.parametrize("name", ["local_cpu.yaml", "gpu.yaml", "npu.yaml"])
def test_serve_configs_validate(name):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    ServeDeploySchema.model_validate(cfg)  # what `serve deploy` checks
    (app,) = cfg["applications"]
    assert app["import_path"] == "unimoe_ray.serve.app:build_app"
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"APIIngress", "SpeechModel", "MusicModel"}
    IngressSettings.from_dict(deps["APIIngress"]["user_config"])
    for model in ("SpeechModel", "MusicModel"):
        d = deps[model]
        s = ModelSettings.from_dict(d["user_config"])
        a = d["autoscaling_config"]
        assert a["min_replicas"] <= a["max_replicas"] and a["target_ongoing_requests"] > 0
        assert d["max_queued_requests"] > 0 and d["max_ongoing_requests"] > 0
        opts = d["ray_actor_options"]
        if name == "gpu.yaml":
            assert opts["num_gpus"] == 1 and s.device == "cuda"
        elif name == "npu.yaml":
            assert opts["resources"] == {"NPU": 1} and s.device == "npu"
        else:
            assert s.device == "cpu" and s.checkpoint is None  # generated weights from a fresh clone


def test_settings_name_unknown_keys_and_bad_values():
    with pytest.raises(SettingsError, match="unknown keys \\['max_row'\\]"):
        ModelSettings.from_dict({"max_row": 3})
    with pytest.raises(SettingsError, match="max_rows=0"):
        ModelSettings.from_dict({"max_rows": 0})
    assert ModelSettings.from_dict({"max_waiting": 3}).model_key() == ModelSettings().model_key()
    with pytest.raises(SettingsError, match="expert_dtype='int4'"):
        ModelSettings.from_dict({"expert_dtype": "int4"})
    assert ModelSettings.from_dict({"expert_dtype": "bf16"}).model_key() != ModelSettings().model_key()  # a reload


def test_wav_stream_header_and_whole_formats():
    wav = (0.5 * np.sin(np.arange(2400) / 5)).astype(np.float32)
    head = formats.wav_stream_header()
    assert len(head) == 44 and head[:4] == b"RIFF" and struct.unpack("<I", head[40:44])[0] == 0xFFFFFFFF
    assert struct.unpack("<IHHIIHH", head[16:36])[3] == 24000
    pcm = np.frombuffer(formats.pcm16(wav), dtype="<i2")
    assert np.abs(pcm / 32768 - wav).max() <= 0.5 / 32768 + 1e-7
    for fmt in ("wav", "flac"):
        got, sr = sf.read(io.BytesIO(formats.encode(wav, fmt)), dtype="int16")
        assert sr == 24000 and np.array_equal(got, pcm)  # lossless: the same samples as pcm


@pytest.mark.parametrize("speed", [0.5, 2.0])
def test_speed_changes_length_not_pitch(speed):
    t = np.arange(24000) / 24000
    wav = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = formats.change_speed(wav, speed)
    assert len(out) == round(24000 / speed)
    mid = out[len(out) // 4 : 3 * len(out) // 4]
    peak_hz = np.argmax(np.abs(np.fft.rfft(mid))) * 24000 / len(mid)
    assert abs(peak_hz - 440) < 5


def test_voice_store_persists_caps_and_protects_library(tmp_path):
    codes = torch.randint(0, 1024, (12, 30))
    store = VoiceStore(tmp_path, max_voices=1)
    lib = store.add("default", "Library voice.", codes, origin="library")
    up = store.add("Narrator One", "Hello there.", codes)
    with pytest.raises(VoiceStoreError, match="voice limit reached") as err:
        store.add("other", "Words.", codes)
    assert err.value.status == 409
    with pytest.raises(VoiceStoreError, match="exists"):
        store.add("narrator one", "Again.", codes)  # names fold case and spaces
    with pytest.raises(VoiceStoreError, match="ref_text is empty"):
        store.add("x", "  ", codes)
    with pytest.raises(VoiceStoreError, match="voice name"):
        store.add("../etc/passwd", "x", codes)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    again = VoiceStore(tmp_path, max_voices=1)  # a restart reads the same folder
    assert [v.name for v in again.list()] == ["default", "Narrator One"]
    v, got = again.get(up.id)
    assert v.name == "Narrator One" and torch.equal(got, codes)
    assert again.get("narrator_one")[0].id == up.id
    with pytest.raises(VoiceStoreError) as err:
        again.delete(lib.name)
    assert err.value.status == 403
    again.delete("Narrator One")
    with pytest.raises(VoiceStoreError) as err:
        again.get("Narrator One")
    assert err.value.status == 404


def test_runtime_expert_dtype_setting_loads_int8_experts(tmp_path):
    """`expert_dtype` in a replica's user_config reaches the loaded model (and it still speaks)."""
    import asyncio

    from unimoe_ray.model.quantize import expert_dtype
    from unimoe_ray.serve.runtime import AudioJob, ModelRuntime

    rt = ModelRuntime(
        ModelSettings(
            preset="tiny",
            artifacts_dir=str(tmp_path / "art"),
            max_rows=2,
            max_len=300,
            torch_threads=1,
            expert_dtype="int8",
        )
    )
    try:
        assert expert_dtype(rt.model) == "int8"

        async def run():
            return [
                ev
                async for ev in rt.run(
                    AudioJob(task="speech", text="Hi.", sampling={"seed": 1}, max_seconds=0.3), stream=False
                )
            ]

        events = asyncio.run(run())
        assert events[-1]["type"] == "done" and len(events[0]["wav"]) == int(0.3 * 24000)
    finally:
        rt.stop()
