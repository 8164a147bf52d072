"""The main job on its embedded default: local Ray, `small` preset, generated weights.

    python jobs/demo.py                       # writes outputs/demo/{tts,music}.wav + codes
    ray job submit -- python jobs/demo.py --checkpoint /ckpt --tokenizer /tok --dac-path /dac.pth
"""

import argparse
import json

import torch

from unimoe_ray.demo import DemoConfig, run_demo


def main() -> None:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--preset", default=d.preset, help="tiny | small | preview (preview needs real weights)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (tokenizer.json ...)")
    p.add_argument("--dac-path", default=None, help="DAC 16 kHz .pth (or set UNIMOE_DAC_PATH)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="frames per clip (50 = 1 s)")
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    summary = run_demo(DemoConfig(out_dir=a.out_dir, preset=a.preset, checkpoint=a.checkpoint,
                                  tokenizer=a.tokenizer, dac_path=a.dac_path, max_frames=a.max_frames, seed=a.seed))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
