"""The README's main job, end to end on the tiny preset: artifacts written and reloaded
through the real loading code, generation inside a Ray actor, WAVs and codes on disk."""

import json

import numpy as np
import pytest
import ray
import soundfile as sf

from unimoe_ray.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.integration
def test_demo_writes_codes_and_audio(local_ray, tmp_path):
    summary = run_demo(DemoConfig(out_dir=str(tmp_path), preset="tiny", max_frames=6))
    assert json.loads((tmp_path / "summary.json").read_text())["tts"]["frames"] == summary["tts"]["frames"]
    for name in ("tts", "music"):
        codes = np.load(tmp_path / f"{name}_codes.npy")
        assert codes.shape[0] == 12 and 1 <= codes.shape[1] <= 6 and codes.max() < 1024
        wav, sr = sf.read(tmp_path / f"{name}.wav")
        assert sr == 16000 and len(wav) == codes.shape[1] * 320
    assert (tmp_path / "checkpoint_tiny" / "config.json").is_file()
