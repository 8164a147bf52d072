"""The stage jobs' flags come from one declaration: TrainConfig's fields (type, choices, the stage's
default) and the FLAG_HELP / NO_FLAG tables beside it (unimoe_ray/train/config.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from unimoe_ray.train.config import FLAG_HELP, MOE_FLAGS, NO_FLAG, STAGES, TrainConfig, stage_config
from unimoe_ray.train.run import InputError
from unimoe_ray.train.stages import Common, add_common_args, common_from_args, train_config_from_args, train_flags

REQUIRED = ["--shards", "s1", "s2", "--tokenizer", "tok", "--out", "o"]


def _parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_common_args(p, stage)
    return p


def _argv(cfg: TrainConfig, names: tuple[str, ...]) -> list[str]:
    argv = []
    for name in names:
        value = getattr(cfg, name)
        argv += ["--" + name.replace("_", "-"), *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return argv


def test_every_field_has_a_flag_or_a_reason_not_to():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FLAG_HELP) | set(NO_FLAG) == fields, "add the new field to FLAG_HELP or NO_FLAG"
    assert not set(FLAG_HELP) & set(NO_FLAG)
    assert set(MOE_FLAGS) <= set(FLAG_HELP)
    assert all(NO_FLAG.values()) and all(FLAG_HELP.values())


def test_the_flags_users_and_the_job_tests_pass_are_still_there():
    options = set(_parser("stage3")._option_string_actions)
    used = {
        "--shards",
        "--tokenizer",
        "--out",
        "--storage-path",
        "--name",
        "--num-workers",
        "--cpus-per-worker",
        "--use-gpu",
        "--npu",
        "--deepspeed",
        "--lr",
        "--warmup-steps",
        "--max-steps",
        "--grad-accum",
        "--grad-clip",
        "--max-tokens",
        "--precision",
        "--val-every",
        "--checkpoint-every",
        "--num-to-keep",
        "--max-failures",
        "--seed",
        "--expert-parallel",
    }
    assert used <= options, used - options


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_flags_give_the_stage_defaults(stage):
    args = _parser(stage).parse_args(REQUIRED)
    assert train_config_from_args(stage, args) == stage_config(stage)
    assert common_from_args(args) == Common(shards=["s1", "s2"], tokenizer="tok", storage_path="outputs/train")


def test_every_flag_round_trips():
    default = stage_config("stage3")
    wanted = stage_config(
        "stage3",
        lr=2e-5,
        min_lr_ratio=0.2,
        warmup_steps=3,
        max_steps=7,
        weight_decay=0.05,
        betas=(0.8, 0.99),
        grad_clip=0.5,
        grad_accum=2,
        max_tokens=512,
        shuffle_window=32,
        precision="bf16",
        val_every=0,
        val_max_rows=4,
        checkpoint_every=7,
        log_every=2,
        seed=5,
        max_bad_steps=1,
        expert_parallel=2,
    )
    names = train_flags("stage3")
    assert all(getattr(wanted, n) != getattr(default, n) for n in names), "give the new flag a value here"
    args = _parser("stage3").parse_args([*REQUIRED, *_argv(wanted, names)])
    assert train_config_from_args("stage3", args) == wanted
    assert isinstance(train_config_from_args("stage3", args).betas, tuple)


def test_stage1_has_no_expert_parallel_flag(capsys):
    assert "expert_parallel" not in train_flags("stage1")
    with pytest.raises(SystemExit):
        _parser("stage1").parse_args([*REQUIRED, "--expert-parallel", "2"])
    assert "unrecognized arguments: --expert-parallel 2" in capsys.readouterr().err
    assert train_config_from_args("stage1", _parser("stage1").parse_args(REQUIRED)).lr == 1e-4


def test_choices_and_types_come_from_the_fields():
    with pytest.raises(argparse.ArgumentError, match="fp16"):
        _parser("stage2").parse_args([*REQUIRED, "--precision", "fp16"])
    with pytest.raises(argparse.ArgumentError, match="max-steps"):
        _parser("stage2").parse_args([*REQUIRED, "--max-steps", "1.5"])


def test_deepspeed_reads_the_json(tmp_path):
    ds = {"zero_optimization": {"stage": 2}}
    (tmp_path / "zero2.json").write_text(json.dumps(ds))
    args = _parser("stage3").parse_args([*REQUIRED, "--deepspeed", str(tmp_path / "zero2.json")])
    assert train_config_from_args("stage3", args).deepspeed_config == ds
    args = _parser("stage3").parse_args([*REQUIRED, "--deepspeed", str(tmp_path / "missing.json")])
    with pytest.raises(InputError, match="missing.json: no such file"):
        train_config_from_args("stage3", args)


def test_a_field_type_without_a_flag_form_is_an_error_naming_no_flag(monkeypatch):
    import unimoe_ray.train.stages as stages

    monkeypatch.setattr(stages, "FLAG_HELP", {**FLAG_HELP, "deepspeed_config": "a dict"})
    with pytest.raises(TypeError, match="NO_FLAG"):
        _parser("stage3")
