"""Bad stage inputs fail on the driver, before Ray starts, with the cause and the fix named:
missing checkpoints, specialists of another preset / expert count / the wrong task, shards
without a task the stage needs, more workers than rows (an empty worker shard)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.integrate import IntegrationError, specialist_config
from unimoe_ray.train.run import InputError
from unimoe_ray.train.stages import Common, stage2, stage3
from unimoe_ray.train.state import META
from unimoe_ray.train.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tok = build_test_tokenizer(root / "tok")
    cfg = config_for_tokenizer(get_preset("tiny"), load_tokenizer(tok))
    write_synthetic_shards(root / "shards", {"tts_en": 4, "v2m": 3})

    def specialist(name: str, task: str, num_specialists: int = 2, base=cfg) -> str:
        path = save_pretrained(UniMoEAudio(specialist_config(base, num_specialists)).init_weights(seed=0), root / name)
        (path / META).write_text(f'{{"task": "{task}", "stage": "stage1"}}')
        return str(path)

    common = Common(shards=[str(root / "shards")], tokenizer=str(tok), storage_path=str(root / "store"))
    return root, common, specialist, cfg


def _stage2(common, specialists, **kw):
    return stage2(
        common,
        specialists=specialists,
        train=stage_config("stage2", max_steps=1),
        out="/nonexistent/out",
        name="s2",
        tasks=("tts_en", "v2m"),
        **kw,
    )


def test_missing_checkpoint(env):
    _, common, _, _ = env
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage3(common, init="/no/such/checkpoint", train=stage_config("stage3"), out="/x", name="s3")


def test_specialist_of_the_wrong_task(env):
    _, common, specialist, _ = env
    a, b = specialist("en_a", "tts_en"), specialist("en_b", "tts_en")
    with pytest.raises(InputError, match="both trained for 'tts_en'"):
        _stage2(common, [a, b])
    c = specialist("zh", "tts_zh")
    with pytest.raises(InputError, match="not one of this stage's tasks"):
        _stage2(common, [a, c])


def test_specialists_of_another_preset_or_expert_count(env):
    _, common, specialist, cfg = env
    en = specialist("en", "tts_en")
    other = specialist("v2m_wide", "v2m", base=cfg.replace(hidden_size=64, mrope_section=(4, 2, 2)))
    with pytest.raises(IntegrationError, match="hidden_size"):
        _stage2(common, [en, other])
    en4, v4 = specialist("en4", "tts_en", num_specialists=4), specialist("v4", "v2m", num_specialists=4)
    with pytest.raises(IntegrationError, match="another expert count or specialist count"):
        _stage2(common, [en4, v4])


def test_dense_checkpoint_for_stage3(env):
    _, common, specialist, _ = env
    with pytest.raises(InputError, match="dense model"):
        stage3(common, init=specialist("dense", "tts_en"), train=stage_config("stage3"), out="/x", name="s3")


def test_shards_without_a_needed_task(env):
    root, common, _, cfg = env
    init = save_pretrained(UniMoEAudio(cfg), root / "moe")
    with pytest.raises(InputError, match=r"no rows of task\(s\) \['t2m'\]"):
        stage3(common, init=str(init), train=stage_config("stage3"), out="/x", name="s3", tasks=("tts_en", "t2m"))


def test_more_workers_than_rows(env):
    root, common, _, cfg = env
    init = save_pretrained(UniMoEAudio(cfg), root / "moe2")
    common = Common(**{**common.__dict__, "num_workers": 9})
    with pytest.raises(InputError, match="empty shard"):
        stage3(common, init=str(init), train=stage_config("stage3"), out="/x", name="s3", tasks=("tts_en", "v2m"))


def test_job_prints_one_clear_line_and_exits_2(env):
    root, _, _, _ = env
    done = subprocess.run(
        [
            sys.executable,
            "jobs/train_stage3.py",
            "--init",
            str(root / "missing"),
            "--shards",
            str(root / "shards"),
            "--tokenizer",
            str(root / "tok"),
            "--out",
            str(root / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_device_flags_choose_resources_and_backend(env):
    from unimoe_ray.train.run import process_group_backend

    _, common, _, _ = env
    kw = dict(init="/x", train=stage_config("stage3"), name="n", meta={})
    assert process_group_backend(common.spec(**kw)) == "gloo"
    npu = Common(**{**common.__dict__, "npu": True}).spec(**kw)
    assert npu.resources_per_worker == {"CPU": 1.0, "NPU": 1} and process_group_backend(npu) == "hccl"
    gpu = Common(**{**common.__dict__, "use_gpu": True}).spec(**kw)
    assert gpu.use_gpu and process_group_backend(gpu) == "nccl"


def test_zero3_with_video_is_refused_before_ray_starts(env):
    import json

    root, common, _, cfg = env
    init = save_pretrained(UniMoEAudio(cfg), root / "moe3")
    zero3 = json.loads((REPO / "configs" / "zero3.json").read_text())
    with pytest.raises(InputError, match="ZeRO-3 cannot train the v2m task"):
        stage3(
            common,
            init=str(init),
            train=stage_config("stage3", deepspeed_config=zero3),
            out="/x",
            name="z3",
            tasks=("tts_en", "v2m"),
        )
