"""Stage-2 MoE integration (docs/DESIGN.md §2, paper §4): dense specialists → one DCMoE model.
Pure functions of configs and state dicts (in-memory tensor names); no Ray, no files.

Per decoder layer, specialist s's SwiGLU FFN (width F = per · f) is cut along its intermediate
dimension into `per` proto-experts of width f: expert s·per + j takes rows [j·f, (j+1)·f) of
gate_proj and up_proj and the same columns of down_proj, the latter times `per`. Why the
factor: SwiGLU is a sum over its intermediate units, so FFN_s(x) = Σ_j E_j(x) exactly; the
router's combine weights over one token's chosen experts sum to 1 (1/per each when it splits a
token evenly over one specialist's proto-experts), so the factor makes that routing give back
FFN_s(x) itself, not FFN_s(x) / per.

Everything else (attention, norms, token and codec embeddings, heads) is the specialists'
average; the vision tower comes from the V2M specialist; the router is new (N(0, σ), σ the
config's initializer_range). Shared experts, our rule: gate/up N(0, σ), down_proj zero, so
at the start of stage 2 they add nothing and the block is exactly the proto-experts' mix;
they grow from there (stage 2 trains only them and the router).
"""

from __future__ import annotations

import re

import torch

from unimoe_ray.config import ModelConfig
from unimoe_ray.model.unimoe_audio import UniMoEAudio

_FFN = re.compile(r"^language_model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class IntegrationError(ValueError):
    """Specialists that cannot be merged; the message names the cause and the fix."""


def specialist_config(target: ModelConfig, num_specialists: int) -> ModelConfig:
    """The stage-1 dense config whose FFN splits exactly into the target's proto-experts:
    width = (routed experts ÷ specialists) × routed width. The MoE fields stay in the config
    (config.json keeps them), so stage 2 knows what to split into."""
    moe = target.moe
    if moe.num_routed % num_specialists:
        raise IntegrationError(
            f"{moe.num_routed} routed experts do not split evenly over {num_specialists} "
            "specialists: choose a routed-expert count that is a multiple of the specialist count"
        )
    per = moe.num_routed // num_specialists
    return target.replace(moe=dict(mode="dense", dense_intermediate=per * moe.routed_intermediate))


def moe_config_of(specialist: ModelConfig, num_specialists: int) -> ModelConfig:
    """The stage-2 (Top-P DCMoE) config for specialists made by `specialist_config`."""
    if specialist.moe.mode != "dense":
        raise IntegrationError(
            f"a specialist must be a dense model (moe.mode 'dense'), got {specialist.moe.mode!r}: "
            "pass stage-1 checkpoints (jobs/train_stage1.py)"
        )
    moe = specialist.moe
    expected = specialist_config(specialist.replace(moe=dict(mode="top_p")), num_specialists).moe.dense_intermediate
    if moe.dense_intermediate != expected:
        raise IntegrationError(
            f"specialist FFN width {moe.dense_intermediate} != (routed {moe.num_routed} ÷ "
            f"{num_specialists} specialists) × routed width {moe.routed_intermediate} = {expected}: "
            "the specialists were trained for another expert count or specialist count"
        )
    return specialist.replace(moe=dict(mode="top_p"))


def check_compatible(configs: dict[str, ModelConfig]) -> None:
    """All specialists must share one architecture (same preset and expert count)."""
    items = list(configs.items())
    name0, ref = items[0]
    for name, cfg in items[1:]:
        if cfg != ref:
            diffs = [f for f in ref.__dataclass_fields__ if getattr(cfg, f) != getattr(ref, f)]
            raise IntegrationError(
                f"specialists {name0} and {name} differ in {diffs}: all specialists must come "
                "from stage 1 with the same --preset and tokenizer"
            )


def integrate_specialists(
    states: dict[str, dict[str, torch.Tensor]], specialist_cfg: ModelConfig, *, vision_task: str = "v2m", seed: int = 0
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Merge dense specialists (task → state dict) into a DCMoE state dict.

    Expert order: specialists in the given order, `per` proto-experts each. Returns the
    DCMoE config and its full state dict (float32)."""
    tasks = list(states)
    cfg = moe_config_of(specialist_cfg, len(tasks))
    moe = cfg.moe
    per, f = moe.num_routed // len(tasks), moe.routed_intermediate
    gen = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range
    keys = list(states[tasks[0]])
    for t in tasks[1:]:
        if list(states[t]) != keys:
            missing = sorted(set(keys) ^ set(states[t]))[:3]
            raise IntegrationError(f"specialist {t} has different tensors ({missing}…): not the same architecture")
    if specialist_cfg.vision is not None and vision_task not in states:
        raise IntegrationError(
            f"the vision tower comes from the {vision_task} specialist, but none was given "
            f"(got {tasks}): pass the V2M specialist too"
        )

    out: dict[str, torch.Tensor] = {}
    for name in keys:
        m = _FFN.match(name)
        if m:
            layer, proj = m.group(1), m.group(2)
            for s, t in enumerate(tasks):
                w = states[t][name].float()
                for j in range(per):
                    e = s * per + j
                    dst = f"language_model.layers.{layer}.mlp.routed_experts.{e}.{proj}.weight"
                    if proj == "down_proj":
                        out[dst] = w[:, j * f : (j + 1) * f] * per
                    else:
                        out[dst] = w[j * f : (j + 1) * f, :].clone()
        elif name.startswith("visual."):
            out[name] = states[vision_task][name].float().clone()
        else:
            out[name] = torch.stack([states[t][name].float() for t in tasks]).mean(0)

    D = cfg.hidden_size
    for layer in range(cfg.num_layers):
        prefix = f"language_model.layers.{layer}.mlp"
        out[f"{prefix}.gate.weight"] = torch.randn(moe.num_experts, D, generator=gen) * std
        for j in range(moe.num_shared):
            sp = f"{prefix}.shared_experts.{j}"
            out[f"{sp}.gate_proj.weight"] = torch.randn(moe.shared_intermediate, D, generator=gen) * std
            out[f"{sp}.up_proj.weight"] = torch.randn(moe.shared_intermediate, D, generator=gen) * std
            out[f"{sp}.down_proj.weight"] = torch.zeros(D, moe.shared_intermediate)
    return cfg, out


def integrated_model(
    states: dict[str, dict[str, torch.Tensor]],
    specialist_cfg: ModelConfig,
    *,
    vision_task: str = "v2m",
    seed: int = 0,
    moe: dict | None = None,
) -> UniMoEAudio:
    """The stage-2 model itself: `integrate_specialists`' config (with `moe` overrides, e.g.
    Top-2 routing over the same tensors) holding its merged state."""
    cfg, state = integrate_specialists(states, specialist_cfg, vision_task=vision_task, seed=seed)
    model = UniMoEAudio(cfg.replace(moe=moe) if moe else cfg)
    model.load_state_dict(state)
    return model


def is_stage2_trainable(name: str) -> bool:
    """Stage 2 trains only the router and the shared experts; everything else is frozen."""
    return ".mlp.gate." in name or ".mlp.shared_experts." in name


def apply_trainable(model: torch.nn.Module, trainable: str) -> list[str]:
    """Set requires_grad per the stage's rule; returns the trainable parameter names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or is_stage2_trainable(name))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise IntegrationError(
            "no parameter is trainable: stage 2 needs a DCMoE model (router + shared experts); "
            "pass the stage-2 output, not a dense specialist"
        )
    return names
