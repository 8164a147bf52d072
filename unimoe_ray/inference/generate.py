"""Codec-frame generation (DESIGN.md §1 "Decoding"): conditional and unconditional rows in
one batch, classifier-free guidance, top-k on the guided logits, temperature, top-p, the
delay-pattern EOS countdown, max frames, greedy mode, KV-cache decoding.

Shape legend: B rows in the batch (cond + uncond), C conditional rows, K codebooks,
V codec vocab, L prompt length, S decoding steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unimoe_ray.audio.delay import DelayPattern
from unimoe_ray.model.unimoe_audio import UniMoEAudio, mrope_position_ids


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt. `audio_codes_KL` holds codec frames at placeholder positions
    (anything valid elsewhere); `pixel_values`/`video_grid_thw` feed the vision tower."""

    input_ids_L: torch.Tensor
    audio_codes_KL: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    guidance_scale: float = 3.0  # music ≈ 3-10, speech ≈ 1-3; 0 disables the uncond rows
    top_k: int = 45
    temperature: float = 1.0
    top_p: float = 1.0
    max_frames: int = 1000  # 20 s at 50 frames/s
    greedy: bool = False
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ValueError(f"max_frames={self.max_frames}: must be >= 1")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.temperature <= 0 and not self.greedy:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (or set greedy=True)")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale}: must be >= 0")


def _batch_prompts(model: UniMoEAudio, rows: list[Prompt]) -> dict:
    """Left-pad rows into one batch and append the first audio input: a BOS frame at a
    placeholder position (its output predicts the first delayed step)."""
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
        input_ids[b, L - i.numel():] = i
        audio[b, :, L - i.numel():] = c
        mask[b, L - i.numel():] = True
    batch = {"input_ids": input_ids.to(device), "audio": audio.to(device), "mask": mask.to(device)}
    videos = [p for p in rows if p.pixel_values is not None]
    if videos:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in videos]).to(device)
        batch["grid"] = torch.cat([p.video_grid_thw.view(-1, 3) for p in videos]).to(device)
    return batch


def _positions(model: UniMoEAudio, batch: dict) -> torch.Tensor | None:
    if "grid" not in batch:
        return None
    v = model.cfg.vision
    return mrope_position_ids(
        batch["input_ids"], video_token_id=model.cfg.video_token_id, video_grid_thw=batch["grid"],
        spatial_merge_size=v.spatial_merge_size, attention_mask_BL=batch["mask"],
    )


def _filter_and_sample(logits_CKV: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Top-k filter on the (guided) logits, then temperature and top-p, then sample."""
    if s.greedy:
        return logits_CKV.argmax(dim=-1)
    k = min(s.top_k, logits_CKV.shape[-1])
    kth_CK1 = logits_CKV.topk(k, dim=-1).values[..., -1:]
    logits_CKV = logits_CKV.masked_fill(logits_CKV < kth_CK1, float("-inf")) / s.temperature
    probs_CKV = logits_CKV.softmax(dim=-1)
    if s.top_p < 1.0:
        sorted_CKV, order_CKV = probs_CKV.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop_sorted = sorted_CKV.cumsum(-1) - sorted_CKV >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order_CKV, drop_sorted)
        probs_CKV = probs_CKV.masked_fill(drop, 0.0)
    C, K, V = probs_CKV.shape
    return torch.multinomial(probs_CKV.view(C * K, V), 1, generator=gen).view(C, K)


@torch.inference_mode()
def generate(
    model: UniMoEAudio,
    prompts: list[Prompt],
    negatives: list[Prompt] | None = None,
    sampling: SamplingConfig = SamplingConfig(),
) -> list[torch.Tensor]:
    """Generate codec frames for each prompt. Returns one (K, T_i) code tensor per prompt.

    With guidance_scale > 0, `negatives` (one per prompt: e.g. "Low quality." for music, the
    same prompt with empty text for speech) run as unconditional rows in the same batch and
    logits = cond + scale · (cond − uncond).
    """
    cfg = model.cfg
    pattern = DelayPattern(cfg.codec_delay_pattern, bos=cfg.codec_bos, eos=cfg.codec_eos, pad=cfg.codec_pad)
    guided = sampling.guidance_scale > 0
    if guided and (negatives is None or len(negatives) != len(prompts)):
        raise ValueError("guidance_scale > 0 needs one negative prompt per prompt (or set guidance_scale=0)")
    rows = list(prompts) + (list(negatives) if guided else [])
    C, K, V = len(prompts), cfg.codec_channels, cfg.codec_vocab_size
    batch = _batch_prompts(model, rows)
    device = batch["input_ids"].device
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None

    # Which codes may be sampled: real codes everywhere; EOS only on codebook 0 (it ends the
    # audio); BOS/PAD never (the delay pattern writes them).
    allowed_KV = torch.zeros(K, V, dtype=torch.bool, device=device)
    allowed_KV[:, : cfg.codebook_size] = True
    allowed_KV[0, cfg.codec_eos] = True
    allowed_first_KV = allowed_KV.clone()
    allowed_first_KV[0, cfg.codec_eos] = False  # at least one frame
    delays = torch.tensor(cfg.codec_delay_pattern, device=device)

    max_steps = sampling.max_frames + pattern.max_delay + 1
    cache = model.new_cache(len(rows), batch["input_ids"].shape[1] + max_steps) if sampling.use_cache else None
    ids, audio, mask = batch["input_ids"], batch["audio"], batch["mask"]
    out = model(
        ids, audio, attention_mask_BL=mask, position_ids_3BL=_positions(model, batch),
        pixel_values_videos=batch.get("pixel_values"), video_grid_thw=batch.get("grid"),
        cache=cache, logits_last_only=True,
    )
    eos_step_C = torch.full((C,), -1, dtype=torch.long, device=device)
    steps: list[torch.Tensor] = []
    for s in range(max_steps):
        logits_BKV = out.codec_logits_BLKV[:, -1].float()
        cond_CKV = logits_BKV[:C]
        if guided:
            cond_CKV = cond_CKV + sampling.guidance_scale * (cond_CKV - logits_BKV[C:])
        cond_CKV = cond_CKV.masked_fill(~(allowed_KV if s else allowed_first_KV), float("-inf"))
        frame_CK = _filter_and_sample(cond_CKV, sampling, gen)

        # Codebook 0 must end by max_frames.
        running_C = eos_step_C < 0
        if s == sampling.max_frames:
            frame_CK[running_C, 0] = cfg.codec_eos
        eos_step_C = torch.where(running_C & (frame_CK[:, 0] == cfg.codec_eos), s, eos_step_C)
        # The countdown after codebook 0's EOS: EOS at T + delay[c], PAD after it.
        j_C1 = (s - eos_step_C)[:, None]
        counting_C1 = eos_step_C[:, None] >= 0
        frame_CK = torch.where(counting_C1 & (j_C1 == delays), cfg.codec_eos, frame_CK)
        frame_CK = torch.where(counting_C1 & (j_C1 > delays), cfg.codec_pad, frame_CK)
        frame_CK = torch.where(s < delays, cfg.codec_bos, frame_CK)  # before a codebook's first frame
        steps.append(frame_CK)
        if bool((counting_C1.squeeze(1) & (j_C1.squeeze(1) >= pattern.max_delay)).all()):
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
                ids, audio, attention_mask_BL=mask, position_ids_3BL=_positions(model, batch),
                pixel_values_videos=batch.get("pixel_values"), video_grid_thw=batch.get("grid"),
                logits_last_only=True,
            )

    delayed_CKS = torch.stack(steps, dim=2)
    results = []
    for c in range(C):
        n_steps = int(eos_step_C[c]) + pattern.max_delay + 1
        results.append(pattern.revert(delayed_CKS[c, :, :n_steps]).cpu())
    return results
