"""`unimoe-ray`: the command-line entry point, a dispatcher over subcommand groups.

    unimoe-ray experts status [--json]
    unimoe-ray experts scale --expert 3 --replicas 2

Ray token authentication: the CLI sends the cluster's token when one is configured on this
machine (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; RAY_AUTH_MODE, if set, is
honoured as is).
    unimoe-ray generate tts|t2m|v2m ...      (unimoe_ray/apps/cli_generate.py)

Each group adds itself in `build_parser` through an `add_<group>_parser(subparsers)` function
and handles its commands with thin adapters over library functions. Library imports happen
inside the handlers, so `--help` does not pay for importing torch and Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path


class CliError(Exception):
    """A failure the CLI reports as one line (exit 2)."""


# Ray token authentication (on by default for `ray start --head` wherever ~/.ray/auth_token
# exists, e.g. after any local `ray.init()`): Ray's client sends the token only with
# RAY_AUTH_MODE=token, and sets that itself only for a cluster it finds by "auto", never for an
# explicit address. The CLI sends the token whenever one is configured here; a cluster without
# authentication ignores it.
AUTH_HINT = (
    "if the cluster uses Ray token authentication, give this machine its token: copy the head's "
    "~/.ray/auth_token here (`ray get-auth-token` on the head prints it) or export RAY_AUTH_TOKEN"
)


def token_configured() -> bool:
    """Whether Ray would find a token here (its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token)."""
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def use_token_if_available() -> None:
    """RAY_AUTH_MODE=token when a token is configured and the mode was not set explicitly
    (before Ray reads its config, i.e. before connecting)."""
    if "RAY_AUTH_MODE" not in os.environ and token_configured():
        os.environ["RAY_AUTH_MODE"] = "token"


def _resolve_address(address: str) -> str:
    """host:port of the cluster: --address, else RAY_ADDRESS, else the last `ray start` on this
    machine. (Ray's own "auto" would also pick any Ray process found by `ps`, silently, and
    wait for it without end if it is not a cluster head.)"""
    import ray._private.services as services
    from ray._private.utils import read_ray_address

    if address == "auto":
        address = os.environ.get("RAY_ADDRESS") or read_ray_address() or ""
        if not address:
            raise CliError(
                "no Ray cluster found: none started with `ray start` on this machine and RAY_ADDRESS "
                "is unset; start one (`ray start --head`) or pass --address HOST:PORT"
            )
    try:
        return services.canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as err:
        raise CliError(f"bad cluster address {address!r}: {err}") from None


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail in `timeout_s` where Ray's client would wait for minutes: nothing listens there."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise CliError(
            f"no Ray cluster answers at {address} ({err.strerror or err}): is the cluster up? "
            "(`ray status` on the head shows it; a cluster that was stopped left its address behind)"
        ) from None


def _connect(args: argparse.Namespace) -> None:
    """Join the cluster within args.timeout, or fail with one line."""
    import ray

    if ray.is_initialized():
        return
    address = _resolve_address(args.address)
    _check_reachable(address, args.timeout)
    hint = "" if token_configured() else f"; {AUTH_HINT}"

    # Ray's C++ client logs each failed attempt to stderr (no setting silences it): keep the
    # terminal for our one line by pointing fd 2 elsewhere while connecting.
    stderr_fd = os.dup(2)

    def give_up() -> None:  # Ray's client retries for minutes: end the process here
        os.write(
            stderr_fd,
            f"unimoe-ray: error: the Ray cluster at {address} did not accept a connection "
            f"within {args.timeout:g}s{hint}\n".encode(),
        )
        os._exit(2)

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.daemon = True
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    watchdog.start()
    try:
        ray.init(address=address, namespace=args.namespace, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:
        chain = f"{err} {err.__cause__}"
        if "AuthenticationError" in chain or "InvalidAuthToken" in chain:
            raise CliError(f"the Ray cluster at {address} rejected this machine's token; {AUTH_HINT}") from None
        raise CliError(f"could not connect to the Ray cluster at {address}: {str(err).splitlines()[0]}{hint}") from None
    finally:
        watchdog.cancel()
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)


def _experts_status(args: argparse.Namespace) -> None:
    from unimoe_ray.parallel.admin import expert_status
    from unimoe_ray.parallel.status import format_status

    _connect(args)
    status = expert_status(args.group, args.namespace, timeout_s=args.timeout)
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
    cluster.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="seconds to wait for the cluster to accept the connection and the controller to answer",
    )

    experts = subparsers.add_parser("experts", help="inspect and scale the routed-expert actors of a running cluster")
    commands = experts.add_subparsers(dest="experts_command", required=True, metavar="{status,scale}")
    status = commands.add_parser(
        "status",
        parents=[cluster],
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
    from unimoe_ray.apps.cli_generate import add_generate_parser

    add_generate_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    use_token_if_available()  # before anything imports Ray (it reads the mode once)
    try:
        args.handler(args)
    except (CliError, LookupError, ValueError, RuntimeError, OSError) as err:
        # One line naming the cause (admin.call_controller unwraps the controller's errors);
        # ExpertUnavailableError and ControllerUnavailableError are RuntimeErrors.
        parser.exit(2, f"unimoe-ray: error: {' '.join(str(err).split())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
