"""The README's main job, end to end on the tiny preset: artifacts written and reloaded
through the real loading code, generation inside a Ray actor, WAVs and codes on disk."""

import json

import numpy as np
import pytest
import ray
import soundfile as sf

from unimoe_ray.apps.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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


@pytest.mark.integration
def test_the_product_end_to_end_on_the_tiny_preset(local_ray, tmp_path, capsys):
    """`make demo` at tiny sizes: corpus → Ray Data shards → stage 1 (4 specialists) → 2 → 3 on
    Ray Train → Ray Serve → cloned TTS, T2M and V2M over HTTP → WAVs + summary."""
    from unimoe_ray.apps.product import ProductConfig, format_summary, run_product

    s = run_product(ProductConfig(out_dir=str(tmp_path), preset="tiny", steps=(1, 2, 2), corpus=(2, 2, 2, 2),
                                  seconds=0.5))
    assert set(s["stages"]) == {"stage1_tts_zh", "stage1_tts_en", "stage1_t2m", "stage1_v2m", "stage2", "stage3"}
    assert s["stages"]["stage3"]["steps"] == 2 and "experts_per_token" in s["stages"]["stage3"]
    assert "experts_per_token" not in s["stages"]["stage1_t2m"]  # a dense specialist
    assert s["preprocess"]["rows_out"] > 0 and all(s["preprocess"]["by_task"].values())
    for name, wav in (("tts_cloned", "tts.wav"), ("text_to_music", "music.wav"), ("video_to_music", "video_music.wav")):
        r = s["requests"][name]
        data, sr = sf.read(tmp_path / wav)
        assert sr == 24000 and len(data) == int(0.5 * 24000) and r["seconds_audio"] == 0.5
        assert 0 < r["ttfa_s"] <= r["latency_s"]
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == s["requests"]
    table = format_summary(s)
    assert "stage3" in table and "video_to_music" in table
    log = (tmp_path / "demo.log").read_text()  # the stage lines and, around them, Ray's full output
    assert "1/6 generating the mini corpus" in log and "6/6 serving" in log
