"""The main job on its embedded default (`make demo`): the whole product on a local Ray.

    python jobs/demo.py                  # corpus → preprocess → 3 curriculum stages → Serve → HTTP
    python jobs/demo.py --quick          # only: random weights → a Ray actor generates 2 clips
    ray job submit --working-dir . -- python jobs/demo.py --quick --checkpoint /ckpt --tokenizer /tok --dac-path /dac.pth

The full run (unimoe_ray/apps/product.py) generates a mini corpus, preprocesses it with Ray Data,
trains the four stage-1 specialists (all from the same initial weights), integrates them (stage
2) and trains everything (stage 3) with Ray Train at the `small` preset for a few steps each,
evaluates the stage-3 model beside a random-init one on the held-out validation rows
(unimoe_ray.eval), serves the result with Ray Serve and sends one voice-cloned TTS, one
text-to-music and one video-to-music request over HTTP: WAVs and summary.json land in
outputs/demo/, and a summary table is printed (per stage: training loss and validation CE at its
start and end).
"""

import argparse
import json

import torch

from unimoe_ray.apps.demo import DemoConfig, run_demo
from unimoe_ray.apps.product import ProductConfig, format_summary, run_product


def main() -> None:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="generation only (no corpus, training or Serve)")
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--preset", default=d.preset, help="tiny | small | preview (preview needs real weights)")
    p.add_argument("--seed", type=int, default=d.seed)
    f = ProductConfig()
    p.add_argument(
        "--steps",
        type=int,
        nargs=3,
        default=f.steps,
        metavar=("S1", "S2", "S3"),
        help="optimizer steps of stage 1 (each specialist), 2 and 3 (full run; default: %(default)s)",
    )
    p.add_argument(
        "--lrs",
        type=float,
        nargs=3,
        default=f.lrs,
        metavar=("LR1", "LR2", "LR3"),
        help="learning rates of stages 1, 2 and 3 (full run; default: %(default)s)",
    )
    p.add_argument(
        "--eval-frames",
        type=int,
        default=f.eval_frames,
        metavar="N",
        help="the final evaluation also generates N frames per validation row (EOS rate, silence, "
        "clipping) with the stage-3 and the random-init model; 0: teacher-forced metrics only "
        "(full run; default: %(default)s)",
    )
    q = p.add_argument_group("--quick only")
    q.add_argument("--checkpoint", default=None, help="checkpoint folder (config.json + safetensors)")
    q.add_argument("--tokenizer", default=None, help="tokenizer folder (tokenizer.json ...)")
    q.add_argument("--dac-path", default=None, help="DAC 16 kHz .pth (or set UNIMOE_DAC_PATH)")
    q.add_argument("--max-frames", type=int, default=d.max_frames, help="frames per clip (50 = 1 s)")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    if a.quick:
        summary = run_demo(
            DemoConfig(
                out_dir=a.out_dir,
                preset=a.preset,
                checkpoint=a.checkpoint,
                tokenizer=a.tokenizer,
                dac_path=a.dac_path,
                max_frames=a.max_frames,
                seed=a.seed,
            )
        )
        print(json.dumps(summary, indent=2))
        return
    if a.eval_frames < 0:
        p.error(f"--eval-frames {a.eval_frames}: give 0 (no generation) or a frame count (50 frames = 1 s)")
    cfg = ProductConfig(
        out_dir=a.out_dir,
        preset=a.preset,
        seed=a.seed,
        steps=tuple(a.steps),
        lrs=tuple(a.lrs),
        eval_frames=a.eval_frames,
    )
    print(format_summary(run_product(cfg)))


if __name__ == "__main__":
    main()
