r"""Evaluate a checkpoint per task; writes OUT/eval.json and OUT/eval.md (unimoe_ray.eval).

    python jobs/evaluate.py outputs/stage3 --shards data/mini_shards --dac-path dac.pth \
        --tokenizer data/mini/assets/tokenizer --out outputs/eval
    python jobs/evaluate.py /ckpt/UniMoE-Audio-preview --task-file tasks.json --dac-path dac.pth \
        --asr-model /models/whisper-large-v3 --speaker-model /models/wavlm-base-plus-sv \
        --utmos-model utmos.pt --clap-model /models/clap-htsat-unfused --out outputs/eval

Weight-free metrics always run; each model-based one runs only when its local weights are
given (never downloaded) and is otherwise listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse

from unimoe_ray.data.config import TASKS
from unimoe_ray.eval.evaluate import INPUT_ERRORS, evaluate_checkpoint, sampling_options
from unimoe_ray.eval.harness import EvalConfig

JUDGES = ("asr", "speaker", "utmos", "clap")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model folder (save_pretrained layout or the released checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", nargs="+", help="validation shards (files or folders) from jobs/preprocess.py")
    src.add_argument("--task-file", help="released-style task file (JSON list or JSONL); generation only")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--dac-path", help="DAC 16 kHz weights (default: $UNIMOE_DAC_PATH)")
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--rows-per-task", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per teacher-forced batch")
    p.add_argument("--no-generate", action="store_true", help="teacher-forced metrics only")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--length-slack", type=float, default=2.0, help="frame limit = slack x requested length")
    p.add_argument("--sampling", default="{}", help="JSON SamplingConfig overrides, e.g. '{\"min_frames\": 50}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice-library", help="prompt_audios.json for task files that name voices")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    for judge in JUDGES:
        p.add_argument(f"--{judge}-model", help=f"local {judge} weights (see unimoe_ray/eval/judges.py)")
    a = p.parse_args(argv)

    cfg = EvalConfig(
        tasks=tuple(a.tasks),
        rows_per_task=a.rows_per_task,
        max_tokens=a.max_tokens,
        generate=not a.no_generate,
        gen_batch=a.gen_batch,
        length_slack=a.length_slack,
        sampling=sampling_options(a.sampling),
        seed=a.seed,
    )
    written = evaluate_checkpoint(
        a.checkpoint,
        cfg,
        a.out,
        shards=a.shards,
        task_file=a.task_file,
        tokenizer=a.tokenizer,
        dac_path=a.dac_path,
        judge_paths={j: getattr(a, f"{j}_model") for j in JUDGES},
        voice_library=a.voice_library,
        device=a.device,
        dtype=a.dtype,
    )
    for path in written:
        print(f"wrote {path}")
    print(written[-1].read_text(encoding="utf-8"))


if __name__ == "__main__":
    try:
        main()
    except INPUT_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
