r"""Does the curriculum pay off? Four variants from one init per seed, the same training-FLOP
budget and the same data; per-task validation loss over whole held-out clips, several seeds
(the recipe and its rules: unimoe_ray/train/experiment.py; results: benchmarks/README.md).

    python jobs/curriculum_experiment.py --shards data/mini_shards \
        --tokenizer data/mini/assets/tokenizer --preset small --budget-flops 2e14 --seeds 0 1 2

Writes --out (JSON: per-seed runs, the summary, routing, the FLOP and data figures) and, next
to it, <stem>_loss_curves.png and <stem>_<variant>_{experts_per_token,experts_per_token_by_task,
expert_share_by_task}.png for each MoE variant. One process, no Ray; not a CI job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unimoe_ray.eval.plots import plot_loss_curves, plot_routing
from unimoe_ray.presets import get_preset
from unimoe_ray.text.prompts import config_for_tokenizer
from unimoe_ray.text.tokenizer import load_tokenizer
from unimoe_ray.train.experiment import (
    VARIANTS,
    ExperimentConfig,
    load_rows,
    loss_curves,
    markdown_table,
    run_experiment,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--preset", default="small", help="the MoE target (a preset name or a config.json)")
    p.add_argument("--init-from", help="a local Qwen2.5-VL folder: the common init of every variant")
    p.add_argument("--budget-flops", type=float, required=True, help="training FLOPs per variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3, help="joint variants and stage 1")
    p.add_argument("--stage2-lr-scale", type=float, default=0.3, help="paper: 0.3 (3e-5 / 1e-4)")
    p.add_argument("--stage3-lr-scale", type=float, default=0.1, help="paper: 0.1 (1e-5 / 1e-4)")
    p.add_argument("--stage-shares", type=float, nargs=3, default=[0.5, 0.125, 0.375])
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--evals-per-phase", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/curriculum_experiment.json")
    args = p.parse_args(argv)

    tok = load_tokenizer(args.tokenizer)
    target = config_for_tokenizer(get_preset(args.preset), tok)
    ecfg = ExperimentConfig(
        budget_flops=args.budget_flops,
        seeds=tuple(args.seeds),
        variants=tuple(args.variants),
        max_tokens=args.max_tokens,
        lr=args.lr,
        stage2_lr_scale=args.stage2_lr_scale,
        stage3_lr_scale=args.stage3_lr_scale,
        stage_shares=tuple(args.stage_shares),
        val_fraction=args.val_fraction,
        evals_per_phase=args.evals_per_phase,
        init_from=args.init_from,
    )
    result = run_experiment(target, tok, load_rows(args.shards), ecfg)
    result["args"] = vars(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    pngs = [plot_loss_curves(loss_curves(result), ecfg.budget_flops, out.with_name(f"{out.stem}_loss_curves.png"))]
    for v, report in result["routing"].items():
        pngs += plot_routing(report, out.parent, prefix=f"{out.stem}_{v}_")
    print(f"wrote {out} and {', '.join(p.name for p in pngs)}; wall {result['wall_s_total']:.0f} s")
    print(markdown_table(result))


if __name__ == "__main__":
    main()
