"""Evaluate a checkpoint per task; writes OUT/eval.json and OUT/eval.md (unimoe_ray.eval).

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
import json

from unimoe_ray.audio.codec import DACCodec
from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.data.config import TASKS
from unimoe_ray.data.shards import ShardPathError
from unimoe_ray.eval.harness import EvalConfig, EvalError, run_eval
from unimoe_ray.eval.judges import load_judges
from unimoe_ray.eval.report import write_report
from unimoe_ray.inference.tasks import TaskError
from unimoe_ray.inference.voices import VoiceLibrary
from unimoe_ray.text.prompts import PromptBuilder
from unimoe_ray.text.tokenizer import load_tokenizer


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
    p.add_argument("--sampling", default="{}", help='JSON SamplingConfig overrides, e.g. \'{"min_frames": 50}\'')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--voice-library", help="prompt_audios.json for task files that name voices")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    for judge in ("asr", "speaker", "utmos", "clap"):
        p.add_argument(f"--{judge}-model", help=f"local {judge} weights (see unimoe_ray/eval/judges.py)")
    a = p.parse_args(argv)

    model = load_pretrained(a.checkpoint, dtype=a.dtype, device=a.device)
    prompts = PromptBuilder(load_tokenizer(a.tokenizer or a.checkpoint), model.cfg)
    judges = load_judges(asr=a.asr_model, speaker=a.speaker_model, utmos=a.utmos_model, clap=a.clap_model,
                         device=a.device)
    cfg = EvalConfig(tasks=tuple(a.tasks), rows_per_task=a.rows_per_task, max_tokens=a.max_tokens,
                     generate=not a.no_generate, gen_batch=a.gen_batch, length_slack=a.length_slack,
                     sampling=json.loads(a.sampling), seed=a.seed)
    voices = VoiceLibrary.load(a.voice_library) if a.voice_library else None
    report = run_eval(model, prompts, DACCodec.load(a.dac_path, device=a.device), judges, cfg,
                      shards=a.shards, task_file=a.task_file, voices=voices)
    report["checkpoint"] = a.checkpoint
    for path in write_report(report, a.out):
        print(f"wrote {path}")
    print(open(path, encoding="utf-8").read())


if __name__ == "__main__":
    try:
        main()
    except (EvalError, ShardPathError, TaskError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
