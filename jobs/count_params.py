"""Print total and activated-per-token parameters of a preset (built on the meta device).

python jobs/count_params.py --preset preview
"""

import argparse

from unimoe_ray.model.params import count_parameters
from unimoe_ray.presets import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="preview", help="tiny | small | preview | path to config.json")
    args = parser.parse_args()
    counts = count_parameters(get_preset(args.preset))
    b = 1e9
    print(f"preset {args.preset}: total {counts.total / b:.3f}B (vision tower {counts.vision / b:.3f}B)")
    print(f"  one routed expert, all layers: {counts.routed_expert / b:.3f}B")
    print(f"  activated per token, min (1 routed expert): {counts.activated(1) / b:.3f}B")
    print(
        f"  activated per token, max (all {counts.num_routed} routed): {counts.activated(counts.num_routed) / b:.3f}B"
    )
    for k in range(0, counts.num_routed + 1):
        print(f"    {k} routed experts: {counts.activated(k) / b:.3f}B")


if __name__ == "__main__":
    main()
