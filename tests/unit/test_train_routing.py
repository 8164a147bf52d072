"""Routing statistics: hand-counted tallies, and jobs/analyze_routing.py's PNGs + JSON."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from unimoe_ray.checkpoint import save_pretrained
from unimoe_ray.model.moe import MoEStats
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.routing import RoutingTally
from unimoe_ray.train.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def test_tally_counts_by_hand():
    cfg = get_preset("tiny")  # 4 routed + 1 null expert, 2 layers
    tally = RoutingTally.empty(cfg)
    mask_TR = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # 2 routed
            [0, 0, 0, 0, 1],  # null only: 0 routed
            [0, 1, 1, 1, 1],  # 3 routed + null
            [1, 1, 1, 1, 0],  # padding: not counted
        ],
        dtype=torch.bool,
    )
    st = MoEStats(aux_loss=torch.tensor(0.0), k_T=mask_TR.sum(-1), mask_TR=mask_TR, counts=(2, 3, 2, 2))
    tally.add([st, st], torch.tensor([True, True, True, False]))
    m = tally.metrics()
    assert m["moe/L0/experts_per_token"] == pytest.approx(5 / 3)
    assert m["moe/L1/null_share"] == pytest.approx(2 / 3)
    assert [m[f"moe/L0/tokens_e{e}"] for e in range(4)] == [1, 2, 1, 1]
    assert tally.k_hist_YH[0].tolist() == [1, 0, 1, 1, 0]


def test_analyze_routing_job_writes_plots_and_numbers(tmp_path):
    tok = build_test_tokenizer(tmp_path / "tok")
    cfg = config_for_tokenizer(get_preset("tiny"), load_tokenizer(tok))
    save_pretrained(UniMoEAudio(cfg).init_weights(seed=0), tmp_path / "ckpt")
    write_synthetic_shards(tmp_path / "shards", {"tts_en": 3, "t2m": 2, "v2m": 2})
    job = runpy.run_path(str(REPO / "jobs" / "analyze_routing.py"))  # the job's main(), in-process
    job["main"](
        [
            str(tmp_path / "ckpt"),
            "--shards",
            str(tmp_path / "shards"),
            "--tokenizer",
            str(tok),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    for png in ("experts_per_token.png", "experts_per_token_by_task.png", "expert_share_by_task.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert report["tasks"] == ["t2m", "tts_en", "v2m"] and len(report["layers"]) == 2
    for layer in report["layers"]:
        assert sum(layer["k_share"]) == pytest.approx(1.0)
        mean_from_hist = sum(k * s for k, s in enumerate(layer["k_share"]))
        assert layer["mean_routed_experts"] == pytest.approx(mean_from_hist)
        # A task's mean routed experts per token is the sum of the experts' shares of its tokens.
        by_task = layer["mean_routed_experts_by_task"]
        assert set(by_task) == set(report["tasks"])
        for t, shares in layer["expert_share_by_task"].items():
            assert by_task[t] == pytest.approx(sum(shares))
        for shares in layer["expert_share_by_task"].values():
            assert len(shares) == 4 and all(0 <= s <= 1 for s in shares)
