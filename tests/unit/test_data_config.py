"""The preprocess job's options → PreprocessConfig (unimoe_ray.data.config.preprocess_config): the
NAME=VALUE forms, the rules they add, and a clear error for each malformed or useless option."""

from __future__ import annotations

import pytest

from unimoe_ray.data.config import (
    DEFAULT_RULES,
    MUSIC_TASKS,
    SPEECH_TASKS,
    TASKS,
    AudioConfig,
    BalanceConfig,
    EncodeConfig,
    ModelScorerSpec,
    PreprocessConfig,
    PreprocessConfigError,
    QualityRule,
    VideoConfig,
    balance_config,
    model_scorer_spec,
    parse_pairs,
    preprocess_config,
    quality_config,
)


def test_pairs_cast_their_values_and_name_the_option_at_fault():
    assert parse_pairs(["snr_db=15", "utmos=3.5"], option="--min", metavar="SCORE=VALUE", cast=float) == (
        ("snr_db", 15.0),
        ("utmos", 3.5),
    )
    assert parse_pairs(["a=/w/x=y.pt"], option="--o", metavar="K=P") == (("a", "/w/x=y.pt"),)  # first '='
    for bad in ("snr_db", "=15", "snr_db="):
        with pytest.raises(PreprocessConfigError, match=f"--min '{bad}': expected SCORE=VALUE"):
            parse_pairs([bad], option="--min", metavar="SCORE=VALUE", cast=float)
    with pytest.raises(PreprocessConfigError, match="--target tts_en=many: 'many' is not a whole number"):
        parse_pairs(["tts_en=many"], option="--target", metavar="TASK=ROWS", cast=int)


def test_model_scorer_kind_output_and_path():
    assert model_scorer_spec("utmos=/w/utmos.pt") == ModelScorerSpec(
        kind="utmos", path="/w/utmos.pt", tasks=SPEECH_TASKS
    )
    assert model_scorer_spec("aesthetics:2=/w/a.pt") == ModelScorerSpec(
        kind="aesthetics", path="/w/a.pt", tasks=MUSIC_TASKS, output_index=2
    )
    with pytest.raises(PreprocessConfigError, match="unknown kind 'mos'; use one of utmos, aesthetics, clap"):
        model_scorer_spec("mos=/w/m.pt")
    with pytest.raises(PreprocessConfigError, match="OUTPUT 'x' must be a whole number"):
        model_scorer_spec("aesthetics:x=/w/a.pt")
    with pytest.raises(PreprocessConfigError, match="expected KIND"):
        model_scorer_spec("/w/utmos.pt")


def test_rules_go_to_the_tasks_their_scorer_judges():
    q = quality_config(model_scorers=["utmos=/w/u.pt"], mins=["utmos=3", "snr_db=20"], maxs=["silence_ratio=0.5"])
    assert q.rules == (
        *DEFAULT_RULES,
        QualityRule(scorer="utmos", tasks=SPEECH_TASKS, min_value=3.0),
        QualityRule(scorer="snr_db", tasks=TASKS, min_value=20.0),
        QualityRule(scorer="silence_ratio", tasks=TASKS, max_value=0.5),
    )
    assert q.model_scorers == (ModelScorerSpec(kind="utmos", path="/w/u.pt", tasks=SPEECH_TASKS),)
    assert quality_config(default_rules=False).rules == ()
    assert quality_config().rules == DEFAULT_RULES


def test_a_rule_no_scorer_of_the_run_can_apply_is_an_error():
    # A typo of snr_db, and utmos without its --model-scorer: either would keep every row.
    for option in ({"mins": ["snr=15"]}, {"maxs": ["utmos=4"]}):
        with pytest.raises(PreprocessConfigError, match="the known scores are snr_db, clipping_ratio, silence_ratio"):
            quality_config(**option)


def test_balance_targets_and_total():
    assert balance_config(targets=["tts_en=3", "v2m=0"], seed=4) == BalanceConfig(
        targets=(("tts_en", 3), ("v2m", 0)), seed=4
    )
    assert balance_config(total=10) == BalanceConfig(total=10)
    with pytest.raises(PreprocessConfigError, match=r"unknown tasks \['tts'\]; tasks are tts_zh"):
        balance_config(targets=["tts=3"])
    with pytest.raises(PreprocessConfigError, match=r"\['t2m'\] more than once"):
        balance_config(targets=["t2m=3", "t2m=4"])
    with pytest.raises(PreprocessConfigError, match=">= 0"):
        balance_config(targets=["t2m=-1"])
    with pytest.raises(PreprocessConfigError, match=">= 0"):
        balance_config(total=-5)


def test_preprocess_config_defaults_are_the_dataclasses_and_options_land_in_their_sections():
    assert preprocess_config(tokenizer="tok") == PreprocessConfig(tokenizer_path="tok")
    cfg = preprocess_config(
        tokenizer="tok",
        dac_path="d.pth",
        encode_actors=3,
        threads_per_actor=2,
        batch_rows=4,
        max_encode_error_fraction=1.0,
        music_window_s=8.0,
        min_duration_s=0.5,
        video_fps=1.0,
        targets=["t2m=2"],
        balance_total=9,
        seed=7,
        rows_per_shard=16,
        default_rules=False,
    )
    assert cfg == PreprocessConfig(
        tokenizer_path="tok",
        audio=AudioConfig(music_window_s=8.0, min_duration_s=0.5),
        video=VideoConfig(fps=1.0),
        encode=EncodeConfig(dac_path="d.pth", actors=3, threads_per_actor=2, batch_rows=4, max_error_fraction=1.0),
        quality=quality_config(default_rules=False),
        balance=BalanceConfig(targets=(("t2m", 2),), total=9, seed=7),
        rows_per_shard=16,
    )
    with pytest.raises(ValueError, match="max_error_fraction=1.5"):
        preprocess_config(tokenizer="tok", max_encode_error_fraction=1.5)
