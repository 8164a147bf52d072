"""Training rows: the inference prompt + the delay-patterned target, token-capped packing, and
the replayable batch stream that resume relies on."""

from __future__ import annotations

import pytest
import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.data.schema import codes_of
from unimoe_ray.model.unimoe_audio import IGNORE_INDEX
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import PromptBuilder, config_for_tokenizer
from unimoe_ray.text.tokenizer import build_test_tokenizer, load_tokenizer
from unimoe_ray.train.batches import ExampleBuilder, batch_stream, collate, epoch_batches, pack_by_tokens
from unimoe_ray.train.synthetic import synthetic_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_test_tokenizer(tmp_path_factory.mktemp("tok")))
    cfg = config_for_tokenizer(get_preset("tiny"), tok)
    prompts = PromptBuilder(tok, cfg)
    return cfg, prompts, ExampleBuilder(prompts, cfg)


def test_tts_row_is_the_inference_prompt_then_bos_then_delayed_steps(setup):
    cfg, prompts, build = setup
    row = synthetic_rows("tts_en", 1, frames=(5, 5))[0]
    ex = build(row)
    prompt_ids = prompts.tts(row["text"]).input_ids_L
    Lp, T = prompt_ids.numel(), 5
    S = T + max(cfg.codec_delay_pattern) + 1
    assert ex.length == Lp + S
    assert torch.equal(ex.ids_L[:Lp], prompt_ids)
    assert (ex.ids_L[Lp:] == cfg.codec_placeholder_id).all()
    pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)
    delayed = pattern.apply(torch.from_numpy(codes_of(row)))
    # Inputs: a BOS frame first (as generate appends it), then steps 0..S-2.
    assert (ex.codes_KL[:, Lp] == cfg.codec_bos).all()
    assert torch.equal(ex.codes_KL[:, Lp + 1 :], delayed[:, : S - 1])
    # Labels: the BOS position predicts step 0; every prompt position is ignored.
    assert (ex.labels_KL[:, :Lp] == IGNORE_INDEX).all()
    assert ex.labels_KL[0, Lp] == delayed[0, 0]
    assert ex.labels_KL[1, Lp] == IGNORE_INDEX  # codebook 1 is still BOS at step 0
    assert ex.labels_KL[0, Lp + T] == cfg.codec_eos  # EOS stays a target
    assert ex.labels_KL[0, -1] == IGNORE_INDEX  # PAD after codebook 0's EOS
    assert ex.labels_KL[-1, -1] == cfg.codec_eos  # the last codebook's EOS is the last step
    n_targets = int((ex.labels_KL != IGNORE_INDEX).sum())
    assert n_targets == cfg.codec_channels * (T + 1)  # each codebook: T frames + EOS


def test_v2m_row_carries_video_tokens_and_patches(setup):
    cfg, _, build = setup
    ex = build(synthetic_rows("v2m", 1, video_thw=(2, 28, 28))[0])
    assert ex.grid_thw.tolist() == [[1, 2, 2]]
    assert int((ex.ids_L == cfg.video_token_id).sum()) == 1  # 1·2·2 patches / merge² = 1
    batch = collate([ex, build(synthetic_rows("t2m", 1)[0])], cfg)
    assert batch.position_ids_3BL is not None and batch.pixel_values.shape[0] == 4


def test_collate_pads_right_and_masks_padding(setup):
    cfg, _, build = setup
    a, b = (build(r) for r in synthetic_rows("tts_en", 2, frames=(5, 30)))
    batch = collate([a, b], cfg)
    L = max(a.length, b.length)
    assert batch.input_ids_BL.shape == (2, L)
    short = 0 if a.length < b.length else 1
    n = min(a.length, b.length)
    assert batch.attention_mask_BL[short, :n].all() and not batch.attention_mask_BL[short, n:].any()
    assert (batch.labels_BKL[short, :, n:] == IGNORE_INDEX).all()


def test_packing_caps_padded_tokens_not_rows(setup):
    cfg, _, build = setup
    ex = [build(r) for r in synthetic_rows("tts_en", 12, frames=(10, 60))]
    cap = 400
    batches = pack_by_tokens(sorted(ex, key=lambda e: e.length), cap)
    assert sum(len(b) for b in batches) == 12
    for b in batches:
        assert max(e.length for e in b) * len(b) <= cap
    assert len({len(b) for b in batches}) > 1  # short rows travel in bigger batches
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_tokens(ex, 50)


def test_stream_replays_exactly_from_any_position_and_covers_each_epoch(setup):
    cfg, _, build = setup
    rows = synthetic_rows("tts_en", 10, frames=(5, 40)) + synthetic_rows("t2m", 5, frames=(5, 40))
    windows = lambda: [rows[:8], rows[8:]]  # noqa: E731
    kw = dict(max_tokens=300, seed=3, rank=1)
    full = batch_stream(windows, build, **kw)
    ref = [[e.sample_id for e in next(full)] for _ in range(20)]
    resumed = batch_stream(windows, build, start=7, **kw)
    assert [[e.sample_id for e in next(resumed)] for _ in range(13)] == ref[7:]
    # Each epoch is a permutation of the rows: no sample skipped or repeated.
    n_epoch = sum(1 for _ in epoch_batches(windows(), build, epoch=0, **kw))
    first = [s for b in ref[:n_epoch] for s in b]
    assert sorted(first) == sorted(r["sample_id"] for r in rows)
    # Another epoch, another order.
    second = [s for b in ref[n_epoch : 2 * n_epoch] for s in b] if 2 * n_epoch <= 20 else None
    if second is not None and len(second) == len(first):
        assert second != first


def test_empty_worker_shard_is_a_clear_error(setup):
    _, _, build = setup
    with pytest.raises(ValueError, match="shard is empty"):
        next(batch_stream(lambda: [], build, max_tokens=300, seed=0, rank=1))
