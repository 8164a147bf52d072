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
# Six TorchTrainer runs, Ray Serve and eval: 2-4 min alone on 2 cores (machines differ twofold
# from day to day), up to twice that beside the other test process of `make test` (466 s on
# the slowest day measured). The timeout is a hang guard, not a speed check.
@pytest.mark.timeout(1500)
def test_the_product_end_to_end_on_the_tiny_preset(local_ray, tmp_path, capsys):
    """`make demo` at tiny sizes: corpus → Ray Data shards → stage 1 (4 specialists) → 2 → 3 on
    Ray Train → Ray Serve → cloned TTS, T2M and V2M over HTTP → WAVs + summary."""
    from unimoe_ray.apps.product import ProductConfig, format_summary, run_product

    s = run_product(
        ProductConfig(
            out_dir=str(tmp_path), preset="tiny", steps=(1, 2, 2), corpus=(2, 2, 2, 2), seconds=0.5, eval_frames=3
        )
    )
    assert set(s["stages"]) == {"stage1_tts_zh", "stage1_tts_en", "stage1_t2m", "stage1_v2m", "stage2", "stage3"}
    assert s["stages"]["stage3"]["steps"] == 2 and "experts_per_token" in s["stages"]["stage3"]
    assert "experts_per_token" not in s["stages"]["stage1_t2m"]  # a dense specialist
    assert s["preprocess"]["rows_out"] > 0 and all(s["preprocess"]["by_task"].values())
    assert [s["stages"][n]["lr"] for n in ("stage1_t2m", "stage2", "stage3")] == list(ProductConfig().lrs)

    # Validation: rows held out of every stage, each stage's CE on them at its start and end.
    val = s["validation_rows"]
    assert val and all(n >= 1 for n in val.values())
    data = json.loads((tmp_path / "runs" / "stage3" / "logs" / "data.json").read_text())
    assert data["val_rows"] == sum(val.values())
    for name, st in s["stages"].items():
        tasks = [name.removeprefix("stage1_")] if name.startswith("stage1_") else list(val)
        tasks = [t for t in tasks if t in val]
        assert sorted(st["val_ce_start"]) == sorted(st["val_ce_end"]) == sorted(tasks)
        assert all(0 < v < 200 for v in [*st["val_ce_start"].values(), *st["val_ce_end"].values()])
        assert st["loss_mean_steps"] == 1  # 1 or 2 steps: the means are the first and last step's loss
        assert (st["loss_first_mean"], st["loss_last_mean"]) == (st["loss_first"], st["loss_last"])
    # Stage 3 starts from the stage-2 model: its start is stage 2's end.
    assert s["stages"]["stage3"]["val_ce_start"] == pytest.approx(s["stages"]["stage2"]["val_ce_end"], abs=2e-3)

    # The stage-3 model beside a random-init one of its shapes, on those rows (unimoe_ray.eval).
    ev = s["eval"]
    assert ev["rows"] == val
    for model in ("random_init", "stage3"):
        assert set(ev[model]) == set(val)
        for task, m in ev[model].items():
            assert m["rows"] == val[task] and len(m["ce_per_codebook"]) == 12
            assert np.isfinite(m["ce"]) and 0.0 <= m["accuracy"] <= 1.0
            assert 1.0 <= m["experts_per_token"] <= 4.0 and 0.0 <= m["null_share"] <= 1.0
            assert m["generated"] == val[task] and 0.0 <= m["eos_rate"] <= 1.0 and 1 <= m["mean_frames"] <= 3
    assert any(ev["random_init"][t]["ce"] != ev["stage3"][t]["ce"] for t in val)
    for name, wav in (("tts_cloned", "tts.wav"), ("text_to_music", "music.wav"), ("video_to_music", "video_music.wav")):
        r = s["requests"][name]
        data, sr = sf.read(tmp_path / wav)
        assert sr == 24000 and len(data) == int(0.5 * 24000) and r["seconds_audio"] == 0.5
        assert 0 < r["ttfa_s"] <= r["latency_s"]
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == s["requests"]
    assert json.loads((tmp_path / "summary.json").read_text())["eval"]["stage3"] == s["eval"]["stage3"]
    table = format_summary(s)
    assert "stage3" in table and "video_to_music" in table and "random init → stage 3" in table
    assert len(table.splitlines()) <= 20
    log = (tmp_path / "demo.log").read_text()  # the stage lines and, around them, Ray's full output
    assert "1/6 generating the mini corpus" in log and "6/6 serving" in log
