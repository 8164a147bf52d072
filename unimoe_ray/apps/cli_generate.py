"""`unimoe-ray generate tts|t2m|v2m`: the released `examples/inference.py`, in-process.

    unimoe-ray generate tts --checkpoint /ckpt --text "Hello there." \\
        --voice english_male --voice-library UniMoE-Audio/examples/prompt_audios.json --voice-root UniMoE-Audio
    unimoe-ray generate tts --checkpoint /ckpt --text "Hello." --ref-audio me.wav --ref-text "What I said."
    unimoe-ray generate t2m --checkpoint /ckpt --caption "A calm piano piece" --output calm.wav
    unimoe-ray generate v2m --checkpoint /ckpt --caption "Epic strings" --video clip.mp4

The tokenizer is read from the checkpoint folder unless --tokenizer names another; the DAC
16 kHz weights from --dac-path or UNIMOE_DAC_PATH. Sampling defaults are the released ones per
task (inference/sampling.py); every knob can be overridden.
"""

from __future__ import annotations

import argparse
import time


def _run(args: argparse.Namespace) -> None:
    import torch

    from unimoe_ray.audio.codec import FRAME_RATE
    from unimoe_ray.inference.pipeline import AudioGenerator
    from unimoe_ray.inference.tasks import TaskRequest, run_task
    from unimoe_ray.inference.video import VideoSampling
    from unimoe_ray.inference.voices import VoiceLibrary

    text = args.text if args.task == "tts" else args.caption
    overrides = {
        "guidance_scale": args.guidance_scale,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "eos_factor": args.eos_factor,
        "min_frames": args.min_frames,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "max_frames": None if args.max_seconds is None else max(1, round(args.max_seconds * FRAME_RATE)),
        "greedy": True if args.greedy else None,
    }
    req = TaskRequest(
        task=args.task,
        task_id=args.task,
        text=text or "",
        voice=getattr(args, "voice", None),
        reference_audio=getattr(args, "ref_audio", None),
        reference_text=getattr(args, "ref_text", None),
        video_path=getattr(args, "video", None),
        output_path=args.output or f"output/{args.task}.wav",
        sampling={k: v for k, v in overrides.items() if v is not None},
    )
    voices = (
        VoiceLibrary.load(args.voice_library, root=args.voice_root) if getattr(args, "voice_library", None) else None
    )
    req.check(voices)  # bad input fails here, before the model loads
    if args.seed is not None:
        torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    gen = AudioGenerator.load(
        args.checkpoint,
        args.tokenizer or args.checkpoint,
        args.dac_path,
        device=args.device,
        dtype=args.dtype,
        expert_dtype=args.expert_dtype,
    )
    t_load = time.perf_counter() - t0
    video_sampling = (
        VideoSampling(fps=args.video_fps, max_frames=args.video_max_frames) if args.task == "v2m" else VideoSampling()
    )
    row = run_task(gen, req, voices, video_sampling)
    print(
        f"wrote {row['output']}: {row['seconds_audio']:.2f} s of audio ({row['frames']} frames) "
        f"in {row['seconds_wall']:.1f} s (model load {t_load:.1f} s)"
    )


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + safetensors)")
    common.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    common.add_argument("--dac-path", default=None, help="DAC 16 kHz .pth (default: $UNIMOE_DAC_PATH)")
    common.add_argument("--output", "-o", default=None, help="output .wav (default: output/<task>.wav)")
    common.add_argument("--seed", type=int, default=None)
    common.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 | npu")
    common.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: the checkpoint's torch_dtype)")
    common.add_argument(
        "--expert-dtype",
        default=None,
        choices=["fp32", "bf16", "int8"],
        help="store the routed/shared experts in this dtype (int8: weight-only, per-channel scales)",
    )
    s = common.add_argument_group("sampling (default: the released values for the task)")
    s.add_argument("--guidance-scale", type=float, default=None)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument(
        "--eos-factor", type=float, default=None, help="x codebook 0's EOS logit (released: speech 1.0, music 0.6)"
    )
    s.add_argument("--min-frames", type=int, default=None, help="no EOS before this many frames (50 = 1 s)")
    s.add_argument(
        "--max-tokens", type=int, default=None, help="released length rule: frames <= max_tokens - max_delay - 1"
    )
    s.add_argument("--max-seconds", type=float, default=None, help="cap on the audio length")
    s.add_argument("--greedy", action="store_true", help="argmax instead of sampling")

    gen = subparsers.add_parser(
        "generate", help="generate speech or music in this process (released examples/inference.py)"
    )
    tasks = gen.add_subparsers(dest="task", required=True, metavar="{tts,t2m,v2m}")
    tts = tasks.add_parser("tts", parents=[common], help="voice-cloned text-to-speech")
    tts.add_argument("--text", "-i", required=True, help="the words to speak")
    tts.add_argument("--voice", default=None, help="a voice name from --voice-library (e.g. english_male)")
    tts.add_argument("--voice-library", default=None, help="prompt_audios.json-style file")
    tts.add_argument("--voice-root", default=None, help="folder the library's relative audio paths start from")
    tts.add_argument("--ref-audio", default=None, help="reference WAV (any sample rate) ...")
    tts.add_argument("--ref-text", default=None, help="... and its transcript")
    t2m = tasks.add_parser("t2m", parents=[common], help="text-to-music")
    t2m.add_argument("--caption", "-i", required=True, help="describe the music")
    v2m = tasks.add_parser("v2m", parents=[common], help="video-to-music")
    v2m.add_argument("--caption", "-i", required=True, help="describe the music")
    v2m.add_argument("--video", required=True, help="video file")
    v2m.add_argument("--video-fps", type=float, default=1.0, help="frames sampled per second (released: 1)")
    v2m.add_argument("--video-max-frames", type=int, default=1, help="frame cap (released: 1)")
    for p in (tts, t2m, v2m):
        p.set_defaults(handler=_run)
