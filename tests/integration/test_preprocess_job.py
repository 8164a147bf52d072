"""The two jobs as a user runs them: make the mini corpus with assets, then preprocess it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]

# No skip when espeak-ng or ffmpeg is missing: jobs/make_mini_corpus.py fails naming how to
# install them, and the job's stderr is in the assertion message.
pytestmark = pytest.mark.integration


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_make_corpus_then_preprocess(tmp_path):
    corpus = tmp_path / "mini"
    _run(
        "jobs/make_mini_corpus.py",
        "--out",
        str(corpus),
        "--with-assets",
        "--n-tts-en",
        "2",
        "--n-tts-zh",
        "1",
        "--n-t2m",
        "1",
        "--n-v2m",
        "1",
        "--long-music-seconds",
        "0",
    )
    out = tmp_path / "shards"
    _run(
        "jobs/preprocess.py",
        "--manifest",
        str(corpus / "manifest.jsonl"),
        "--out",
        str(out),
        "--tokenizer",
        str(corpus / "assets/tokenizer"),
        "--dac-path",
        str(corpus / "assets/dac_random.pth"),
        "--target",
        "tts_en=1",
        "--max",
        "silence_ratio=0.9",
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts_add_up"] and stats["manifest_rows"] == 5 + 11
    assert stats["out"]["by_task"]["tts_en"]["rows"] == 1  # balanced down from 2
    assert stats["filtered"]["by_reason"]["balance"] == 1
    assert stats["quarantined"]["rows"] == 9
    rows = pq.read_table(out / stats["shards"][0]).num_rows
    assert rows == stats["out"]["rows"] == 4
