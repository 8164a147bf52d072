"""Weights moved into huge-page mappings (unimoe_ray.model.hugepages): same values, same
aliasing (fused gate/up stays one buffer), same outputs, saved and loaded as before."""

from __future__ import annotations

import torch

from unimoe_ray.checkpoint import load_pretrained, save_pretrained
from unimoe_ray.model import hugepages, kernels
from unimoe_ray.model.moe import DCMoE
from unimoe_ray.model.quantize import convert_experts
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.presets import get_preset


def _model(seed: int = 0) -> UniMoEAudio:
    return UniMoEAudio(get_preset("tiny")).init_weights(seed).eval()


def _mappings(tensors) -> dict[int, int]:
    """{mapping (storage) pointer: its lowest tensor address} over the moved-size tensors."""
    out: dict[int, int] = {}
    for t in tensors:
        if t.untyped_storage().nbytes() >= hugepages.MIN_BYTES:
            key = t.untyped_storage().data_ptr()
            out[key] = min(out.get(key, t.data_ptr()), t.data_ptr())
    return out


def test_move_keeps_values_aliasing_and_outputs(monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: True)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids_BL = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        unconverted = model(ids_BL).codec_logits_BLKV
    convert_experts(model, None, select=False, hugepages=False)  # fuses gate/up: new Parameters
    with torch.inference_mode():
        want = model(ids_BL).codec_logits_BLKV  # fused GEMMs: equal up to summation order
    torch.testing.assert_close(want, unconverted, atol=1e-5, rtol=1e-4)
    params_before = {name: id(p) for name, p in model.named_parameters()}
    assert hugepages.move_to_hugepages(model) > 0
    for name, v in model.state_dict().items():
        assert torch.equal(v, before[name]), name
    assert {name: id(p) for name, p in model.named_parameters()} == params_before  # .data swapped
    # Storages now live in few mappings, each starting on a 2 MiB boundary.
    maps = _mappings(model.parameters())
    assert maps and all(low % hugepages.HUGE_PAGE == 0 for low in maps.values())
    assert len(maps) <= 1 + sum(p.numel() * p.element_size() for p in model.parameters()) // hugepages.CHUNK_BYTES
    # Fused gate/up stayed one buffer: the fused kernels still apply.
    for m in model.modules():
        if isinstance(m, DCMoE):
            for e in [*m.routed_experts, *m.shared_experts]:
                assert e.expert_weights().gate_up_2FD is not None
                assert kernels.adjacent_rows(e.gate_proj.weight, e.up_proj.weight) is not None
    with torch.inference_mode():
        got = model(ids_BL).codec_logits_BLKV
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_moved_model_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: True)
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model's int8 experts are small: move all
    model = convert_experts(_model(2), "int8", select=False)
    assert hugepages.move_to_hugepages(model) == 0  # moved in convert_experts: nothing left
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = _model(2)
    convert_experts(fp32, None, select=False)
    save_pretrained(fp32, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, fp32.state_dict()[k]), k
    # The int8 model's buffers moved too (the quantised experts are buffers, not parameters).
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    maps = _mappings([*model.parameters(), *model.buffers()])
    int8_maps = {b.untyped_storage().data_ptr() for b in model.buffers() if b.dtype == torch.int8}
    assert int8_maps and int8_maps <= set(maps) and all(low % hugepages.HUGE_PAGE == 0 for low in maps.values())


def test_switch_off_and_bad_value(monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.available()
    model = _model()
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert hugepages.move_to_hugepages(model) == 0
    assert {p.data_ptr() for p in model.parameters()} == ptrs
    monkeypatch.setenv(hugepages.ENV, "sometimes")
    try:
        hugepages.available()
    except ValueError as e:
        assert hugepages.ENV in str(e) and "use 1" in str(e)
    else:
        raise AssertionError("a bad UNIMOE_HUGEPAGES value must be refused")
