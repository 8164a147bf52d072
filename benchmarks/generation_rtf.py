"""End-to-end generation speed of the `small` model in-process (issue 8): time to first frame
(prefill + first sampled step), decode step time, real-time factor (compute seconds per
second of audio at 50 frames/s; < 1 is faster than real time) for speech (voice-cloned TTS,
a 3 s voice prompt) and music, each with and without classifier-free guidance — beside the
memory roofline of one decode step: bytes of the weights that step reads (everything but the
vision tower and the text lm_head, with only the routed experts that step touched) ÷ the read
bandwidth measured in the same run.

Model: random weights through the real save/load path (what `make demo` builds), set up as
AudioGenerator does (weights in huge pages, the machine's measured expert kernels), released
sampling rules with each task's released defaults except guidance (the column) and length.
Step time = (T(n frames) − T(1 frame)) / (n − 1), so prefill and the DAC are not in it; the
DAC is not timed at all (the real 16 kHz decoder is not available here).

    .venv/bin/python benchmarks/generation_rtf.py [--frames 60] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_line, read_probe  # benchmarks/machine.py

from unimoe_ray.audio.codec import FRAME_RATE
from unimoe_ray.builders import ArtifactsConfig, prepare_artifacts
from unimoe_ray.inference.generate import generate
from unimoe_ray.inference.pipeline import AudioGenerator
from unimoe_ray.inference.sampling import task_sampling


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a sum over a buffer much larger than the caches, in huge pages like the
    weights (best of `repeats`)."""
    x = read_probe()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


@torch.inference_mode()
def step_bytes(model, prompts, negatives, guided: bool) -> tuple[int, float]:
    """Weight bytes one decode step reads, and the mean routed experts touched per layer."""
    from unimoe_ray.inference.generate import batch_prompts

    rows = prompts + (negatives if guided else [])
    batch = batch_prompts(model, rows)
    cache = model.new_cache(len(rows), batch["input_ids"].shape[1] + 4)
    model(batch["input_ids"], batch["audio"], attention_mask_BL=batch["mask"], cache=cache, logits_last_only=True)
    ids = torch.full((len(rows), 1), model.cfg.codec_placeholder_id)
    codes = torch.zeros(len(rows), model.cfg.codec_channels, 1, dtype=torch.long)
    out = model(ids, codes, cache=cache, logits_last_only=True)
    el = next(model.parameters()).element_size()
    skip = ("visual.", "lm_head.", "language_model.embed_tokens.", "codec_embed_tokens.")
    total = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(skip) and ".routed_experts." not in n
    )
    touched = []
    for layer, st in zip(model.moe_layers, out.moe_stats):
        used = [k for k, c in enumerate(st.counts) if c > 0]
        touched.append(len(used))
        total += sum(p.numel() for k in used for p in layer.routed_experts[k].parameters())
    # Embedding rows read: one row per codebook per row of the batch (negligible, counted).
    total += len(rows) * model.cfg.codec_channels * model.cfg.hidden_size
    return total * el, statistics.mean(touched)


def time_generate(model, prompts, negatives, sampling, frames: int) -> float:
    t = time.perf_counter()
    out = generate(model, prompts, negatives, sampling.replace(max_frames=frames))
    assert out[0].shape[1] == frames, out[0].shape
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_line())
    with tempfile.TemporaryDirectory() as d:
        # Set up as the CLI, batch generation and serving do (AudioGenerator.load): weights in huge
        # pages, this machine's measured expert kernels (UNIMOE_KERNELS / UNIMOE_HUGEPAGES switch
        # them off).
        gen = AudioGenerator.load(*prepare_artifacts(ArtifactsConfig(out_dir=d, preset="small")))
        model, pb = gen.model, gen.prompts
    bw = read_bandwidth()
    voice = torch.randint(0, 1024, (model.cfg.codec_channels, 150))  # a 3 s voice prompt
    text = "Welcome to the world of UniMoE Audio, where speech and music come from one model."
    cases = {
        "speech": (
            [pb.tts(text, prompt_text="This is my voice.", prompt_codes_KT=voice)],
            [pb.tts_negative(prompt_text="This is my voice.", prompt_codes_KT=voice)],
            "speech",
        ),
        "music": ([pb.music("A calm piano piece in C major at 80 bpm.")], [pb.music_negative()], "music"),
    }
    rows = []
    for name, (prompts, negatives, task) in cases.items():
        for guidance in (0.0, task_sampling(task).guidance_scale):
            s = task_sampling(task, guidance_scale=guidance, seed=0)
            time_generate(model, prompts, negatives, s, 2)  # warm-up
            first, full = [], []
            for _ in range(a.repeats):
                first.append(time_generate(model, prompts, negatives, s, 1))
                full.append(time_generate(model, prompts, negatives, s, a.frames))
            ttff, t_full = statistics.median(first), statistics.median(full)
            step = (t_full - ttff) / (a.frames - 1)
            nbytes, k = step_bytes(model, prompts, negatives, guidance > 0)
            roof = nbytes / bw
            rows.append(
                dict(
                    task=name,
                    guidance=guidance,
                    prompt_tokens=int(prompts[0].input_ids_L.numel()),
                    ttff_ms=round(ttff * 1e3, 1),
                    step_ms=round(step * 1e3, 2),
                    rtf=round(step * FRAME_RATE, 3),
                    roof_ms=round(roof * 1e3, 2),
                    step_over_roof=round(step / roof, 2),
                    experts_per_layer=round(k, 2),
                    step_mb=round(nbytes / 1e6, 1),
                )
            )
            r = rows[-1]
            print(
                f"{name:6s} guidance {guidance:4.1f}  prompt {r['prompt_tokens']:4d} tok  TTFF {r['ttff_ms']:7.1f} ms  "
                f"step {r['step_ms']:6.2f} ms  RTF {r['rtf']:.3f}  roofline {r['roof_ms']:5.2f} ms "
                f"({r['step_mb']} MB @ {bw / 1e9:.1f} GB/s, {r['experts_per_layer']} routed experts/layer)  "
                f"step/roof {r['step_over_roof']:.2f}",
                flush=True,
            )
    print(f"load after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"machine": machine_line(), "bandwidth_GBps": bw / 1e9, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
