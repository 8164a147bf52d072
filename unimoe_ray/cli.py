"""`unimoe-ray`: the command-line entry point, a dispatcher over subcommand groups.

    unimoe-ray experts status [--json]
    unimoe-ray experts scale --expert 3 --replicas 2

Each group adds itself in `build_parser` through an `add_<group>_parser(subparsers)` function
and handles its commands with thin adapters over library functions. Library imports happen
inside the handlers, so `--help` does not pay for importing torch and Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _connect(args: argparse.Namespace) -> None:
    import ray

    if not ray.is_initialized():
        # "auto" joins the running cluster (or RAY_ADDRESS) and never starts a new one.
        ray.init(address=args.address, namespace=args.namespace, logging_level=logging.WARNING,
                 log_to_driver=False)


def _experts_status(args: argparse.Namespace) -> None:
    from unimoe_ray.parallel.admin import expert_status
    from unimoe_ray.parallel.status import format_status

    _connect(args)
    status = expert_status(args.group, args.namespace)
    print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(status))


def _experts_scale(args: argparse.Namespace) -> None:
    from unimoe_ray.parallel.admin import scale_expert
    from unimoe_ray.parallel.status import format_status

    _connect(args)
    print(format_status(scale_expert(args.expert, args.replicas, args.group, args.namespace)))


def add_experts_parser(subparsers: argparse._SubParsersAction) -> None:
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--address", default="auto", help="Ray cluster address (default: auto / RAY_ADDRESS)")
    cluster.add_argument("--namespace", default="unimoe", help="Ray namespace of the expert group")
    cluster.add_argument("--group", default="default", help="expert group (one controller and its replicas)")

    experts = subparsers.add_parser(
        "experts", help="inspect and scale the routed-expert actors of a running cluster"
    )
    commands = experts.add_subparsers(dest="experts_command", required=True, metavar="{status,scale}")
    status = commands.add_parser(
        "status", parents=[cluster],
        help="per expert: replicas, nodes, tokens routed in the last window; mean experts per token per layer",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_experts_status)
    scale = commands.add_parser("scale", parents=[cluster], help="set an expert's replica count, live")
    scale.add_argument("--expert", type=int, required=True, help="routed expert index")
    scale.add_argument("--replicas", type=int, required=True, help="new replica count (>= 1)")
    scale.set_defaults(handler=_experts_scale)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimoe-ray", description="UniMoE-Audio on Ray")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_experts_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except (LookupError, ValueError) as err:
        # A RayTaskError from the controller wraps the ValueError it raised; show that one.
        parser.exit(2, f"unimoe-ray: error: {getattr(err, 'cause', None) or err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
