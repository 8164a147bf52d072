"""Quality scorers and filter rules (unimoe_ray.data.quality)."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from unimoe_ray.data.config import (
    SIGNAL_SCORES,
    SPEECH_TASKS,
    TASKS,
    ModelScorerSpec,
    QualityConfig,
    QualityRule,
    check_rules,
)
from unimoe_ray.data.quality import (
    ClapScorer,
    ClippingScorer,
    Scorer,
    SilenceScorer,
    SnrScorer,
    TorchModuleScorer,
    failed_rule,
    signal_scorers,
)

SR = 16000


def _tone(seconds: float, amp: float = 0.5, freq: float = 440.0) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def test_signal_scorers_follow_the_protocol():
    assert [s.name for s in signal_scorers()] == ["snr_db", "clipping_ratio", "silence_ratio"]
    assert tuple(s.name for s in signal_scorers()) == SIGNAL_SCORES  # config's check_rules knows them
    assert all(isinstance(s, Scorer) for s in signal_scorers())


def test_snr_clean_speechlike_hits_ceiling_and_noise_floor_is_measured():
    clean = np.concatenate([_tone(1.0), np.zeros(SR, np.float32)])  # signal, then digital silence
    assert SnrScorer().score(clean, SR) == 100.0
    # Tone of power 0.125 over white noise of power 0.0125: quiet frames read the noise floor,
    # loud ones tone + noise: 10 log10(0.1375 / 0.0125) = 10.4 dB.
    rng = np.random.default_rng(0)
    noisy = clean + rng.normal(0, math.sqrt(0.0125), clean.shape).astype(np.float32)
    assert SnrScorer().score(noisy, SR) == pytest.approx(10.4, abs=0.6)
    assert SnrScorer().score(np.zeros(SR, np.float32), SR) == 0.0


def test_clipping_ratio_of_an_overdriven_sine():
    # 2 sin clipped at 1: |2 sin| >= 0.99 where |sin| >= 0.495, a fraction 1 - (2/pi) asin(0.495).
    clipped = np.clip(_tone(1.0, amp=2.0, freq=10.0), -1, 1)  # 1600 samples a period
    assert ClippingScorer().score(clipped, SR) == pytest.approx(1 - 2 / math.pi * math.asin(0.495), abs=2e-3)
    assert ClippingScorer().score(_tone(1.0, amp=0.8), SR) == 0.0


def test_silence_ratio_counts_quiet_frames():
    half = np.concatenate([_tone(1.0), np.zeros(SR, np.float32)])
    assert SilenceScorer().score(half, SR) == pytest.approx(0.5)
    # -50 dB below the tone is "silent" relative to it, even though it is not digital zero.
    quiet_tail = np.concatenate([_tone(1.0), _tone(1.0, amp=0.5e-2 * 0.3)])
    assert SilenceScorer().score(quiet_tail, SR) == pytest.approx(0.5)
    assert SilenceScorer().score(_tone(1.0, amp=0.01), SR) == 0.0  # quiet but clean


def test_failed_rule_reports_first_broken_rule():
    rules = (
        QualityRule(scorer="snr_db", tasks=("tts_en",), min_value=15.0),
        QualityRule(scorer="clipping_ratio", tasks=("tts_en", "t2m"), max_value=0.01),
    )
    assert failed_rule({"snr_db": 40.0, "clipping_ratio": 0.0}, "tts_en", rules) == ("", "")
    assert failed_rule({"snr_db": 3.0, "clipping_ratio": 0.5}, "tts_en", rules)[0] == "low_snr_db"
    assert failed_rule({"snr_db": 3.0, "clipping_ratio": 0.5}, "t2m", rules) == (
        "high_clipping_ratio",
        "clipping_ratio=0.5 > 0.01",
    )
    assert failed_rule({"snr_db": float("nan")}, "tts_en", rules) == ("", "")  # scorer did not apply


class _PeakModule(torch.nn.Module):
    def forward(self, wav_BN: torch.Tensor) -> torch.Tensor:
        return torch.stack([wav_BN.abs().amax(dim=1), wav_BN.mean(dim=1)], dim=1)  # (B, 2)


def test_torchscript_scorer_loads_from_path(tmp_path):
    path = tmp_path / "scorer.pt"
    torch.jit.script(_PeakModule()).save(str(path))
    scorer = TorchModuleScorer("utmos", path, output_index=0)
    assert scorer.score(_tone(0.5, amp=0.25), SR) == pytest.approx(0.25, abs=1e-3)
    # resampled to the model's rate first: 8 kHz in, still the same peak
    assert scorer.score(_tone(0.5, amp=0.25)[::2], SR // 2) == pytest.approx(0.25, abs=2e-2)


def test_model_scorers_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        TorchModuleScorer("utmos", tmp_path / "nope.pt")
    try:
        import laion_clap  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="laion_clap"):
            ClapScorer(tmp_path / "clap.ckpt")
    else:
        with pytest.raises(FileNotFoundError, match="clap.ckpt"):
            ClapScorer(tmp_path / "clap.ckpt")


def test_a_rule_on_a_score_no_scorer_produces_is_an_error():
    utmos = ModelScorerSpec(kind="utmos", path="u.pt", tasks=SPEECH_TASKS)
    check_rules(QualityConfig())  # the defaults are on the signal scores
    check_rules(
        QualityConfig(rules=(QualityRule(scorer="utmos", tasks=SPEECH_TASKS, min_value=3.0),), model_scorers=(utmos,))
    )
    # utmos without its scorer, and a typo of snr_db: either rule would keep every row.
    for name in ("utmos", "snr"):
        bad = QualityConfig(rules=(QualityRule(scorer=name, tasks=TASKS, min_value=3.0),))
        with pytest.raises(ValueError, match=f"{name!r}.*snr_db, clipping_ratio, silence_ratio"):
            check_rules(bad)
    with pytest.raises(ValueError, match="unknown tasks .'tts'"):
        check_rules(QualityConfig(rules=(QualityRule(scorer="snr_db", tasks=("tts",)),)))


def test_preprocess_job_rejects_an_unknown_score_before_starting_ray(tmp_path, capsys):
    job = runpy.run_path(str(Path(__file__).resolve().parents[2] / "jobs" / "preprocess.py"))
    args = ["--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        job["main"]([*args, "--tokenizer", str(tmp_path), "--min", "snr=15"])
    assert exit_.value.code == 2  # argparse's usage error, not a run
    err = capsys.readouterr().err
    assert "'snr'" in err and "the known scores are snr_db, clipping_ratio, silence_ratio" in err
