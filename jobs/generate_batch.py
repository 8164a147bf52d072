r"""Batch generation on Ray Data: a task file in the released `examples/test_tasks.json` form
(or JSONL) → WAVs plus a result manifest (JSONL, one row per task: status ok | failed, reason).

    python jobs/generate_batch.py tasks.json --checkpoint /ckpt --dac-path dac_16khz.pth \\
        --voice-library UniMoE-Audio/examples/prompt_audios.json --voice-root UniMoE-Audio \\
        --actors 2 --manifest outputs/batch/manifest.jsonl
    ray job submit --working-dir . -- python jobs/generate_batch.py tasks.json --checkpoint /ckpt ...

Starts a local Ray in-process when RAY_ADDRESS is unset. A bad item fails alone with its
reason; the exit status is 1 when any item failed. The manifest gets each item's row as it
finishes; after a crash, the same command with --resume runs only the items not yet done.
"""

import argparse
import sys

import ray

from unimoe_ray.data.batch_generate import BatchConfig, run_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", help="task file (.json list or .jsonl)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint folder")
    p.add_argument("--dac-path", default=None, help="DAC 16 kHz .pth (default: $UNIMOE_DAC_PATH)")
    p.add_argument("--voice-library", default=None, help="prompt_audios.json-style voice library")
    p.add_argument("--voice-root", default=None, help="folder the library's relative paths start from")
    p.add_argument("--manifest", default="outputs/batch/manifest.jsonl")
    p.add_argument("--actors", type=int, default=1, help="generator actors (each loads the model once)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: the checkpoint's torch_dtype")
    p.add_argument("--expert-dtype", default=None, choices=["fp32", "bf16", "int8"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="cap every item's audio length")
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip the tasks --manifest already records as ok (WAV on disk); failed ones run again",
    )
    a = p.parse_args()
    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # joins RAY_ADDRESS when set, else a local Ray
    rows = run_batch(
        a.tasks,
        a.manifest,
        BatchConfig(
            checkpoint=a.checkpoint,
            tokenizer=a.tokenizer,
            dac_path=a.dac_path,
            voice_library=a.voice_library,
            voice_root=a.voice_root,
            actors=a.actors,
            cpus_per_actor=a.cpus_per_actor,
            gpus_per_actor=a.gpus_per_actor,
            device=a.device,
            dtype=a.dtype,
            expert_dtype=a.expert_dtype,
            seed=a.seed,
            max_seconds=a.max_seconds,
        ),
        resume=a.resume,
    )
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
