"""Codec-frame generation (docs/DESIGN.md §1 "Decoding"), as the released `generate`: conditional
and unconditional rows in one batch, the released sampling rules (inference/sampling.py), the
delay-pattern EOS countdown, the released length rules, KV-cache decoding.

Shape legend: B rows in the batch (cond + uncond), C conditional rows, K codebooks,
V codec vocab, L prompt length, S decoding steps.
"""

from __future__ import annotations

import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.inference.sampling import RowKnobs, SamplingConfig, apply_pattern_rules, row_generators, sample_frame
from unimoe_ray.model.unimoe_audio import UniMoEAudio, mrope_position_ids
from unimoe_ray.text.prompt import Prompt


def batch_prompts(model: UniMoEAudio, rows: list[Prompt]) -> dict:
    """Left-pad rows into one batch and append the first audio input: a BOS frame at a
    placeholder position (its output predicts the first delayed step). Shared with the decode
    engine (inference/engine.py), which prefills each request through it."""
    cfg = model.cfg
    K, device = cfg.codec_channels, model.codec_head.weight.device
    ids, codes = [], []
    for p in rows:
        if p.input_ids_L.numel() == 0:
            raise ValueError("empty prompt: the text tokenised to nothing")
        c = p.audio_codes_KL
        if c is None:
            c = torch.full((K, p.input_ids_L.numel()), cfg.codec_pad, dtype=torch.long)
        ids.append(torch.cat([p.input_ids_L, torch.tensor([cfg.codec_placeholder_id])]))
        codes.append(torch.cat([c, torch.full((K, 1), cfg.codec_bos, dtype=torch.long)], dim=1))
    L = max(x.numel() for x in ids)
    B = len(rows)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    audio = torch.full((B, K, L), cfg.codec_pad, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b, (i, c) in enumerate(zip(ids, codes)):
        input_ids[b, L - i.numel() :] = i
        audio[b, :, L - i.numel() :] = c
        mask[b, L - i.numel() :] = True
    batch = {"input_ids": input_ids.to(device), "audio": audio.to(device), "mask": mask.to(device)}
    videos = [p for p in rows if p.pixel_values is not None]
    if videos:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in videos]).to(device)
        batch["grid"] = torch.cat([p.video_grid_thw.view(-1, 3) for p in videos]).to(device)
    return batch


def prompt_positions(model: UniMoEAudio, batch: dict) -> torch.Tensor | None:
    """M-RoPE position ids (3, B, L) for a `batch_prompts` batch with video; None without
    video (the model then counts positions itself)."""
    if "grid" not in batch:
        return None
    v = model.cfg.vision
    return mrope_position_ids(
        batch["input_ids"],
        video_token_id=model.cfg.video_token_id,
        video_grid_thw=batch["grid"],
        spatial_merge_size=v.spatial_merge_size,
        attention_mask_BL=batch["mask"],
    )


@torch.inference_mode()
def generate(
    model: UniMoEAudio,
    prompts: list[Prompt],
    negatives: list[Prompt] | None = None,
    sampling: SamplingConfig | list[SamplingConfig] = SamplingConfig(),
) -> list[torch.Tensor]:
    """Generate codec frames for each prompt. Returns one (K, T_i) code tensor per prompt.

    `sampling`: one config for all prompts or one per prompt. With any guidance_scale > 0,
    `negatives` (one per prompt: "Low quality." for music, the same prompt with empty text for
    speech) run as unconditional rows in the same batch and logits = cond + s·(cond − uncond).
    Row c samples with its own generator seeded `seed + c`, so a prompt's codes depend on its
    seed and position only (see inference/sampling.py for the released sampling rules).
    """
    cfg = model.cfg
    configs = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(configs)} sampling configs for {len(prompts)} prompts: give one or one per prompt")
    pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)
    guided = any(s.guidance_scale > 0 for s in configs)
    if guided and (negatives is None or len(negatives) != len(prompts)):
        raise ValueError("guidance_scale > 0 needs one negative prompt per prompt (or set guidance_scale=0)")
    rows = list(prompts) + (list(negatives) if guided else [])
    C = len(prompts)
    batch = batch_prompts(model, rows)
    device = batch["input_ids"].device
    knobs = RowKnobs.stack(configs, device)
    gens = row_generators([None if s.seed is None else s.seed + c for c, s in enumerate(configs)], device)
    limit_C = torch.tensor([s.frame_limit(pattern.max_delay) for s in configs], device=device)
    delays_K = torch.tensor(cfg.codec_delay_pattern, device=device)
    use_cache = all(s.use_cache for s in configs)

    max_steps = int(limit_C.max()) + pattern.max_delay + 1
    cache = model.new_cache(len(rows), batch["input_ids"].shape[1] + max_steps) if use_cache else None
    ids, audio, mask = batch["input_ids"], batch["audio"], batch["mask"]
    out = model(
        ids,
        audio,
        attention_mask_BL=mask,
        position_ids_3BL=prompt_positions(model, batch),
        pixel_values_videos=batch.get("pixel_values"),
        video_grid_thw=batch.get("grid"),
        cache=cache,
        logits_last_only=True,
    )
    eos_step_C = torch.full((C,), -1, dtype=torch.long, device=device)
    steps: list[torch.Tensor] = []
    for s in range(max_steps):
        logits_BKV = out.codec_logits_BLKV[:, -1]
        step_C = torch.full((C,), s, dtype=torch.long, device=device)
        frame_CK = sample_frame(
            logits_BKV[:C], logits_BKV[C:] if guided else None, knobs, step_C, gens, eos=cfg.codec_eos
        )
        frame_CK, eos_step_C = apply_pattern_rules(
            frame_CK, step_C, eos_step_C, limit_C, delays_K, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad
        )
        steps.append(frame_CK)
        if bool(((eos_step_C >= 0) & (s - eos_step_C >= pattern.max_delay)).all()):
            break

        next_BK1 = (torch.cat([frame_CK, frame_CK]) if guided else frame_CK)[:, :, None]
        next_ids = torch.full((len(rows), 1), cfg.codec_placeholder_id, dtype=torch.long, device=device)
        if cache is not None:
            out = model(next_ids, next_BK1, cache=cache, logits_last_only=True)
        else:
            ids = torch.cat([ids, next_ids], dim=1)
            audio = torch.cat([audio, next_BK1], dim=2)
            mask = torch.cat([mask, torch.ones_like(next_ids, dtype=torch.bool)], dim=1)
            batch.update(input_ids=ids, mask=mask)
            out = model(
                ids,
                audio,
                attention_mask_BL=mask,
                position_ids_3BL=prompt_positions(model, batch),
                pixel_values_videos=batch.get("pixel_values"),
                video_grid_thw=batch.get("grid"),
                logits_last_only=True,
            )

    delayed_CKS = torch.stack(steps, dim=2)
    results = []
    for c in range(C):
        n_steps = int(eos_step_C[c]) + pattern.max_delay + 1
        results.append(pattern.revert(delayed_CKS[c, :, :n_steps]).cpu())
    return results
