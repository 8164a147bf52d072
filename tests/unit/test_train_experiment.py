"""The curriculum experiment's loop (unimoe_ray.train.experiment) on the tiny preset and small
synthetic shards whose music clips are cut into several windows: every variant runs, all start
from one init (specialists bit-identical), every variant spends the same FLOP budget to within
one step, validation holds whole clips, and the job writes valid PNGs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from unimoe_ray.data.schema import sample_id, shard_schema, source_id
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train import experiment as X
from unimoe_ray.train.batches import split_rows
from unimoe_ray.train.config import stage_config
from unimoe_ray.train.synthetic import synthetic_rows

REPO = Path(__file__).resolve().parents[2]
BUDGET = 2.4e9  # tiny preset, 256-token steps: ~0.3 GFLOP each, so every phase takes a few steps


def windowed_rows(task: str, n: int, windows: int) -> list[dict]:
    """Synthetic rows regrouped as clips of `windows` windows each (music-like)."""
    rows = synthetic_rows(task, n, frames=(16, 24))
    for i, r in enumerate(rows):
        src = source_id(task, f"synthetic/{task}_clip{i // windows}.wav")
        r.update(source_id=src, segment=i % windows, sample_id=sample_id(src, i % windows))
    return rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    tok_path = build_test_tokenizer(root / "tok")
    tok = load_tokenizer(tok_path)
    rows = (
        windowed_rows("tts_zh", 8, 1)
        + windowed_rows("tts_en", 8, 1)
        + windowed_rows("t2m", 9, 3)
        + windowed_rows("v2m", 8, 2)
    )
    (root / "shards").mkdir()
    pq.write_table(
        pa.Table.from_pylist(sorted(rows, key=lambda r: r["sample_id"]), schema=shard_schema(())),
        root / "shards" / "shard-00000.parquet",
    )
    target = config_for_tokenizer(get_preset("tiny"), tok)
    return root, tok_path, tok, rows, target


def _by_source(rows, val_ids):
    sides: dict[str, set[bool]] = {}
    for r in rows:
        sides.setdefault(r["source_id"], set()).add(r["sample_id"] in val_ids)
    return sides


def test_split_rows_keeps_each_clip_on_one_side():
    # One clip of 6 windows whose first window has the smallest sample id: a per-window split
    # (the first rows in sample-id order) would put that window in validation, the rest in training.
    rows = [{"task": "t2m", "source_id": "a", "sample_id": f"{2 * i:02d}"} for i in range(6)]
    rows += [{"task": "t2m", "source_id": f"b{i}", "sample_id": f"{2 * i + 1:02d}"} for i in range(14)]
    counts, val = split_rows(rows, stage_config("stage3", tasks=("t2m",)), val_fraction=0.1)
    assert counts == {"t2m": 20}
    assert val and all(len(s) == 1 for s in _by_source(rows, val).values())
    assert val == {f"{2 * i:02d}" for i in range(6)}  # the first clip, whole
    # With the first clip in training, validation takes whole single-window clips up to 10%.
    for r in rows[:6]:
        r["source_id"] = "z"
    _, val = split_rows(rows, stage_config("stage3", tasks=("t2m",)), val_fraction=0.1)
    assert all(len(s) == 1 for s in _by_source(rows, val).values()) and val == {"01", "03"}


def test_split_rows_single_clip_and_missing_source():
    rows = [{"task": "t2m", "source_id": "a", "sample_id": str(i)} for i in range(4)]
    assert split_rows(rows, stage_config("stage3", tasks=("t2m",)))[1] == set()  # no clip to spare
    with pytest.raises(ValueError, match="no source_id"):
        split_rows([{"task": "t2m", "sample_id": "x"}], stage_config("stage3"))


def test_every_variant_same_init_same_budget(env, monkeypatch):
    _, _, tok, rows, target = env
    entries: list[tuple[str, dict]] = []
    real = X.train_phase

    def spy(model, data, phase, ecfg, **kw):
        entries.append((phase.name, {k: v.clone() for k, v in model.state_dict().items()}))
        return real(model, data, phase, ecfg, **kw)

    monkeypatch.setattr(X, "train_phase", spy)
    ecfg = X.ExperimentConfig(budget_flops=BUDGET, seeds=(0, 1), max_tokens=256, val_fraction=0.25, evals_per_phase=1)
    result = X.run_experiment(target, tok, rows, ecfg, log=lambda _: None)

    # Validation: whole clips only, at least one row per task.
    data = result["data"]
    assert all(data["val_rows"][t] >= 1 for t in data["tasks"])
    assert data["val_clips"]["t2m"] + data["train_clips"]["t2m"] == 3
    # Every variant's shares add up to the same budget; each phase overshoots its budget by
    # less than one of its own steps, and that overshoot comes off the next phase's budget, so
    # the variant ends within one step of its last phase past the budget.
    for seed, runs in result["runs"].items():
        for v in X.VARIANTS:
            rec = runs[v]
            assert sum(p["share"] for p in rec["phases"]) == pytest.approx(BUDGET)
            xs = [0.0] + [x for x, _ in rec["curve"]["train"]]
            spent = 0.0
            for p in rec["phases"]:
                assert 0 <= p["flops"] - p["budget"] < p["max_step_flops"]
                assert p["steps"] >= 1
                spent += p["flops"]
            assert rec["flops"] == pytest.approx(xs[-1]) == pytest.approx(spent)
            assert 0 <= rec["flops"] - BUDGET < rec["phases"][-1]["max_step_flops"], (v, rec["phases"])
    assert set(result["summary"]) == {*X.VARIANTS, X.REFERENCE}
    assert all(s["n"] == 2 for per_task in result["summary"].values() for s in per_task.values())

    # Same init: per seed, the naive-dense model and all four stage-1 specialists start from
    # bit-identical weights; the Top-2 MoE's trunk and its routed experts come from them too.
    per_seed = len(entries) // 2
    first = entries[:per_seed]
    init = dict(first)["joint dense"]
    specialists = [s for name, s in first if name.startswith("stage 1")]
    assert len(specialists) == 4
    for s in specialists:
        assert s.keys() == init.keys() and all(torch.equal(s[k], init[k]) for k in init)
    top2 = dict(first)["joint top-2"]
    for k, w in init.items():
        if ".mlp." not in k:
            assert torch.equal(top2[k], w), k
    f = target.moe.routed_intermediate  # per = 1 in tiny: each routed expert is the whole FFN
    up = init["language_model.layers.0.mlp.up_proj.weight"]
    for e in range(target.moe.num_routed):
        assert torch.equal(top2[f"language_model.layers.0.mlp.routed_experts.{e}.up_proj.weight"], up[:f])
    # curriculum_no_stage1 integrates the untrained init: the same tensors as top2 but Top-P.
    no_stage1 = next(s for name, s in first if name == "stage 2")
    assert all(torch.equal(no_stage1[k], top2[k]) for k in top2)
    # A different seed gives a different init.
    assert not torch.equal(dict(entries[per_seed:])["joint dense"][k], init[k])


def test_flop_rule_counts_by_hand(env):
    _, _, tok, _, target = env
    init = X.common_init(target, tok, ("tts_zh", "tts_en", "t2m", "v2m"), 0, None)
    rule = X.FlopRule.of(init)
    D, L = target.hidden_size, target.num_layers
    kv = target.num_kv_heads * target.head_dim
    attn = D * D * 2 + D * kv * 2
    ffn = 3 * D * target.moe.routed_intermediate  # the specialist FFN: (4 routed / 4) × 32
    assert rule.per_token == L * (attn + ffn)
    assert rule.per_label == D * target.codec_channels * target.codec_vocab_size
    w = rule.per_token * 10 + rule.per_label * 4
    assert rule.flops(tokens=10, picks=0, labels=4) == 6 * w  # all trainable: 2 + 2 + 2


def test_job_writes_json_and_pngs(env):
    root, tok_path, _, _, _ = env
    out = root / "out" / "curriculum_test.json"
    job = runpy.run_path(str(REPO / "jobs" / "curriculum_experiment.py"))
    job["main"](
        [
            "--shards",
            str(root / "shards"),
            "--tokenizer",
            str(tok_path),
            "--preset",
            "tiny",
            "--budget-flops",
            "1.2e9",
            "--seeds",
            "0",
            "--max-tokens",
            "256",
            "--val-fraction",
            "0.25",
            "--evals-per-phase",
            "1",
            "--variants",
            "naive_dense",
            "curriculum",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"naive_dense", "curriculum", "specialists"}
    pngs = sorted(out.parent.glob("*.png"))
    names = {p.name for p in pngs}
    assert "curriculum_test_loss_curves.png" in names
    for fig in ("experts_per_token", "experts_per_token_by_task", "expert_share_by_task"):
        assert f"curriculum_test_curriculum_{fig}.png" in names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(p).ndim == 3  # decodes as an image
