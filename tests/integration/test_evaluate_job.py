"""jobs/evaluate.py as a user runs it: a checkpoint folder, shards, a DAC file → eval.json and
eval.md; a bad input is one clear line, not a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/evaluate.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_evaluate_job(tmp_path):
    tok = build_test_tokenizer(tmp_path / "tok")
    cfg = config_for_tokenizer(get_preset("tiny"), load_tokenizer(tok))
    save_pretrained(UniMoEAudio(cfg).init_weights(seed=0), tmp_path / "ckpt")
    DACCodec.random(seed=0).save(tmp_path / "dac.pth")
    write_synthetic_shards(tmp_path / "shards", {"tts_en": 2, "t2m": 2}, frames=(10, 12))
    common = [str(tmp_path / "ckpt"), "--tokenizer", str(tok), "--dac-path", str(tmp_path / "dac.pth")]

    done = _run(
        *common,
        "--shards",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "out"),
        "--rows-per-task",
        "1",
        "--sampling",
        '{"min_frames": 5}',
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(report["tasks"]) == {"tts_en", "t2m"}  # tasks without rows are reported, not evaluated
    assert "no rows of tts_zh in the shards" in done.stdout
    assert report["tasks"]["t2m"]["generated"] == 1 and "ce" in report["tasks"]["t2m"]
    assert "| tts_en |" in (tmp_path / "out" / "eval.md").read_text()

    bad = _run(*common, "--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out2"))
    assert bad.returncode != 0 and "error: shard path" in bad.stderr and "Traceback" not in bad.stderr
