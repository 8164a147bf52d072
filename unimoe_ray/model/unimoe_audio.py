"""UniMoE-Audio: a Qwen2.5-VL-style decoder whose FFNs are DCMoE blocks, reading text tokens,
DAC codec frames (one embedding table per codebook, summed, at <|AUDIO_PLACEHOLDER|>
positions) and video (the Qwen2.5-VL vision tower at video-token positions), and writing
12 × 1027 codec logits per position through one linear head (docs/DESIGN.md §1).

Module names follow the released checkpoint (decoder under `language_model.`; see
unimoe_ray.checkpoint for the on-disk map).

Shape legend: B batch, L sequence, D model dim, K codebooks, V codec vocab (1027),
T tokens (B·L flattened), N video tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unimoe_ray.config import ModelConfig
from unimoe_ray.model.attention import Attention, MRoPE, RMSNorm, attention_mask
from unimoe_ray.model.kv_cache import KVCache
from unimoe_ray.model.moe import MoEStats, build_ffn

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(dim=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_ffn(dim=cfg.hidden_size, cfg=cfg.moe, layer_idx=layer_idx)

    def forward(self, x_BLD, cos_sin, mask_B1LS, cache, valid_T) -> tuple[torch.Tensor, MoEStats | None]:
        x_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD), cos_sin, mask_B1LS, cache, self.layer_idx)
        B, L, D = x_BLD.shape
        ffn_TD, stats = self.mlp(self.post_attention_layernorm(x_BLD).reshape(B * L, D), valid_T)
        return x_BLD + ffn_TD.view(B, L, D), stats


class Decoder(nn.Module):
    """The text trunk: token embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRoPE(head_dim=cfg.head_dim, theta=cfg.rope_theta, mrope_section=cfg.mrope_section)


@dataclass
class ModelOutput:
    """hidden_BLD: final hidden states. codec_logits_BLKV: only when requested.
    loss: Σ per-codebook CE + aux_weight · aux_loss (when labels given)."""

    hidden_BLD: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)
    codec_logits_BLKV: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    codec_losses_K: torch.Tensor | None = None


def build_vision_tower(cfg: ModelConfig) -> nn.Module:
    """transformers' Qwen2.5-VL vision tower (ViT + patch merger), out dim = hidden size."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    v = cfg.vision
    vcfg = Qwen2_5_VLVisionConfig(
        depth=v.depth,
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_heads=v.num_heads,
        out_hidden_size=v.out_hidden_size,
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        spatial_merge_size=v.spatial_merge_size,
        in_channels=v.in_channels,
        window_size=v.window_size,
        fullatt_block_indexes=list(v.fullatt_block_indexes),
        tokens_per_second=v.tokens_per_second,
        hidden_act=v.hidden_act,
    )
    vcfg._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(vcfg)


class UniMoEAudio(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, K, V = cfg.hidden_size, cfg.codec_channels, cfg.codec_vocab_size
        self.language_model = Decoder(cfg)
        self.visual = build_vision_tower(cfg) if cfg.vision is not None else None
        self.codec_embed_tokens = nn.ModuleList(nn.Embedding(V, D) for _ in range(K))
        self.codec_head = nn.Linear(D, K * V, bias=False)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)

    # ---- set-up ----

    def init_weights(self, seed: int | None = None) -> "UniMoEAudio":
        """Qwen's init: N(0, initializer_range) for linears and embeddings, ones for norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        with torch.no_grad():
            for name, module in self.named_modules():
                if name.startswith("visual"):
                    continue  # transformers initialises its own tower
                if isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
                elif isinstance(module, (nn.Linear, nn.Embedding)):
                    w = module.weight
                    if w.device.type != "meta":
                        w.copy_(torch.randn(w.shape, generator=gen).mul_(std).to(w.dtype))
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
        return self

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.language_model.layers]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.cfg
        p = self.codec_head.weight
        return KVCache(
            num_layers=cfg.num_layers,
            batch=batch,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            max_len=max_len,
            dtype=p.dtype,
            device=p.device,
        )

    # ---- inputs ----

    def check_inputs(self, input_ids_BL: torch.Tensor, audio_codes_BKL: torch.Tensor | None) -> None:
        """Clear errors before any kernel sees bad indices."""
        cfg = self.cfg
        if input_ids_BL.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length); got shape {tuple(input_ids_BL.shape)}")
        if input_ids_BL.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token (an empty text prompt?)")
        if input_ids_BL.min() < 0 or input_ids_BL.max() >= cfg.vocab_size:
            raise ValueError(
                f"input_ids outside [0, {cfg.vocab_size}): the tokenizer does not match the model config (vocab_size)"
            )
        has_audio = bool((input_ids_BL == cfg.codec_placeholder_id).any())
        if audio_codes_BKL is None:
            if has_audio:
                raise ValueError("input_ids contain <|AUDIO_PLACEHOLDER|> but no audio_codes were given")
            return
        B, L = input_ids_BL.shape
        if audio_codes_BKL.dim() != 3 or audio_codes_BKL.shape[1] != cfg.codec_channels:
            raise ValueError(
                f"audio_codes must be (batch, {cfg.codec_channels} codebooks, length); got "
                f"{tuple(audio_codes_BKL.shape)}. Wrong codebook count: encode with a "
                f"{cfg.codec_channels}-codebook DAC (16 kHz)."
            )
        if audio_codes_BKL.shape[0] != B or audio_codes_BKL.shape[2] != L:
            raise ValueError(f"audio_codes {tuple(audio_codes_BKL.shape)} must align with input_ids {(B, L)}")
        lo, hi = int(audio_codes_BKL.min()), int(audio_codes_BKL.max())
        if lo < 0 or hi >= cfg.codec_vocab_size:
            raise ValueError(
                f"audio codes outside [0, {cfg.codec_vocab_size}) (got min {lo}, max {hi}): codes "
                f"must be DAC indices < {cfg.codebook_size} or the eos/pad/bos specials"
            )

    def embed(
        self,
        input_ids_BL: torch.Tensor,
        audio_codes_BKL: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings, with the summed codec embeddings at placeholder positions and the
        vision tower's output at video-token positions."""
        cfg = self.cfg
        x_BLD = self.language_model.embed_tokens(input_ids_BL)
        if audio_codes_BKL is not None:
            audio_BLD = sum(emb(audio_codes_BKL[:, c]) for c, emb in enumerate(self.codec_embed_tokens))
            is_audio_BL1 = (input_ids_BL == cfg.codec_placeholder_id)[..., None]
            x_BLD = torch.where(is_audio_BL1, audio_BLD.to(x_BLD.dtype), x_BLD)
        if pixel_values_videos is not None:
            if self.visual is None:
                raise ValueError("this model config has no vision tower; it cannot take video input")
            video_ND = self.visual(pixel_values_videos.to(x_BLD.dtype), grid_thw=video_grid_thw).pooler_output
            is_video_BL = input_ids_BL == cfg.video_token_id
            n_slots = int(is_video_BL.sum())
            if n_slots != video_ND.shape[0]:
                raise ValueError(
                    f"{n_slots} video tokens in input_ids but the vision tower produced "
                    f"{video_ND.shape[0]} embeddings: the prompt must hold t·h·w/merge² video "
                    "tokens per video (see unimoe_ray.text.prompts)"
                )
            x_BLD = x_BLD.masked_scatter(is_video_BL[..., None], video_ND.to(x_BLD.dtype))
        return x_BLD

    # ---- forward ----

    def forward(
        self,
        input_ids_BL: torch.Tensor,
        audio_codes_BKL: torch.Tensor | None = None,
        *,
        attention_mask_BL: torch.Tensor | None = None,
        position_ids_3BL: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels_BKL: torch.Tensor | None = None,
        aux_weight: float = 0.0,
        return_logits: bool = True,
        logits_last_only: bool = False,
    ) -> ModelOutput:
        self.check_inputs(input_ids_BL, audio_codes_BKL)
        B, L = input_ids_BL.shape
        valid_BL = (
            torch.ones_like(input_ids_BL, dtype=torch.bool) if attention_mask_BL is None else attention_mask_BL.bool()
        )
        if position_ids_3BL is None:
            start_B = (
                cache.next_pos_B if cache is not None else torch.zeros(B, dtype=torch.long, device=input_ids_BL.device)
            )
            pos_BL = start_B[:, None] + valid_BL.long().cumsum(-1) - 1
            position_ids_3BL = pos_BL.clamp_min(0)[None].expand(3, B, L)
        x_BLD = self.embed(input_ids_BL, audio_codes_BKL, pixel_values_videos, video_grid_thw)
        cos_sin = self.language_model.rotary(position_ids_3BL, x_BLD.dtype)

        if cache is not None:
            cache.check_room(L)
            valid_BS = torch.cat([cache.valid_BS[:, : cache.length], valid_BL], dim=1)
            mask = attention_mask(valid_BS, L)
        elif attention_mask_BL is not None and not bool(valid_BL.all()):
            mask = attention_mask(valid_BL, L)
        else:
            mask = None  # plain causal

        valid_T = valid_BL.reshape(-1)
        stats: list[MoEStats] = []
        for layer in self.language_model.layers:
            x_BLD, st = layer(x_BLD, cos_sin, mask, cache, valid_T)
            if st is not None:
                stats.append(st)
        if cache is not None:
            cache.advance(valid_BL, position_ids_3BL.amax(dim=(0, 2)))
        h_BLD = self.language_model.norm(x_BLD)

        aux = torch.stack([s.aux_loss for s in stats]).mean() if stats else h_BLD.new_zeros(())
        out = ModelOutput(hidden_BLD=h_BLD, aux_loss=aux, moe_stats=stats)
        if labels_BKL is not None:
            out.loss, out.codec_losses_K = self.codec_loss(h_BLD, labels_BKL)
            out.loss = out.loss + aux_weight * aux
        if return_logits:
            h = h_BLD[:, -1:] if logits_last_only else h_BLD
            out.codec_logits_BLKV = self.codec_logits(h)
        return out

    def codec_logits(self, h_BLD: torch.Tensor) -> torch.Tensor:
        B, L, _ = h_BLD.shape
        return self.codec_head(h_BLD).view(B, L, self.cfg.codec_channels, self.cfg.codec_vocab_size)

    def codec_loss(self, h_BLD: torch.Tensor, labels_BKL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over codebooks of the mean cross-entropy at that codebook's labelled positions.
        The head only runs on positions with at least one label (the audio span)."""
        cfg = self.cfg
        if labels_BKL.shape[:1] + labels_BKL.shape[2:] != h_BLD.shape[:2] or labels_BKL.shape[1] != cfg.codec_channels:
            raise ValueError(
                f"labels must be (batch, {cfg.codec_channels}, length) aligned with input_ids; "
                f"got {tuple(labels_BKL.shape)}"
            )
        labels_TK = labels_BKL.transpose(1, 2).reshape(-1, cfg.codec_channels)
        rows_T = (labels_TK != IGNORE_INDEX).any(-1)
        h_TD = h_BLD.reshape(-1, h_BLD.shape[-1])[rows_T]
        labels_TK = labels_TK[rows_T]
        logits_TKV = self.codec_head(h_TD).view(-1, cfg.codec_channels, cfg.codec_vocab_size).float()
        losses_K = torch.stack(
            [
                F.cross_entropy(logits_TKV[:, c], labels_TK[:, c], ignore_index=IGNORE_INDEX)
                if bool((labels_TK[:, c] != IGNORE_INDEX).any())
                else logits_TKV.sum() * 0.0
                for c in range(cfg.codec_channels)
            ]
        )
        return losses_K.sum(), losses_K.detach()


def mrope_position_ids(
    input_ids_BL: torch.Tensor,
    *,
    video_token_id: int,
    video_grid_thw: torch.Tensor | None,
    spatial_merge_size: int,
    time_interval: float = 2.0,
    attention_mask_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """3-axis RoPE positions (Qwen2.5-VL): text advances all axes by 1; a video block of
    t × h × w merged patches gets (start + t·interval, start + row, start + col), and text
    after it resumes at the block's largest position + 1. Returns position_ids_3BL."""
    B, L = input_ids_BL.shape
    pos_3BL = torch.zeros(3, B, L, dtype=torch.long, device=input_ids_BL.device)
    grids = iter(video_grid_thw.tolist()) if video_grid_thw is not None else iter(())
    for b in range(B):
        valid = attention_mask_BL[b].bool() if attention_mask_BL is not None else torch.ones(L, dtype=torch.bool)
        idx = valid.nonzero().squeeze(-1).tolist()
        ids = input_ids_BL[b].tolist()
        cur, i = 0, 0
        while i < len(idx):
            j = idx[i]
            if ids[j] != video_token_id:
                pos_3BL[:, b, j] = cur
                cur += 1
                i += 1
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("more video blocks in input_ids than rows in video_grid_thw") from None
            h, w = h // spatial_merge_size, w // spatial_merge_size
            n = t * h * w
            block = torch.tensor(idx[i : i + n])
            tt = torch.arange(t).repeat_interleave(h * w)
            hh = torch.arange(h).repeat_interleave(w).repeat(t)
            ww = torch.arange(w).repeat(t * h)
            pos_3BL[0, b, block] = cur + (tt * time_interval).long()
            pos_3BL[1, b, block] = cur + hh
            pos_3BL[2, b, block] = cur + ww
            cur = int(pos_3BL[:, b, block].max()) + 1
            i += n
    return pos_3BL
