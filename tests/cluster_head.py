"""`ray start --head` as a user starts a cluster, for the tests that need a real head (job
submission, the CLI, `serve run` against it): every port on a free loopback port, so a test's
head never meets another cluster on the machine, and its own short `--temp-dir` (Ray's socket
paths must fit; `ray start` records the head in <temp-dir>/ray_current_cluster, where a plain
`ray.init()` elsewhere would otherwise find and join it). Ray 2.60 turns token auth on: the
head writes `$HOME/.ray/auth_token`, and clients need it (`RAY_AUTH_MODE=token`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from unimoe_ray.apps.ports import free_ports

BIN = Path(sys.executable).parent  # this interpreter's `ray`, `serve` and `python`


@dataclass(frozen=True)
class HeadPorts:
    gcs: int
    dashboard: int
    client: int
    agent_http: int
    agent_grpc: int
    metrics: int
    runtime_env: int
    node_manager: int
    object_manager: int
    extra: tuple[int, ...] = ()  # more free ports for the test's own servers (all distinct)

    @classmethod
    def allocate(cls, extra: int = 0) -> "HeadPorts":
        ports = free_ports(9 + extra)
        return cls(*ports[:9], extra=tuple(ports[9:]))


def ray_start_head(temp_dir: str | Path, ports: HeadPorts, *, num_cpus: int = 2, block: bool = False) -> list[str]:
    """The `ray start --head` command line (dashboard on, for `ray job submit` and the state API)."""
    return [
        str(BIN / "ray"),
        "start",
        "--head",
        *(["--block"] if block else []),
        f"--port={ports.gcs}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports.dashboard}",
        f"--ray-client-server-port={ports.client}",
        f"--dashboard-agent-listen-port={ports.agent_http}",
        f"--dashboard-agent-grpc-port={ports.agent_grpc}",
        f"--metrics-export-port={ports.metrics}",
        f"--runtime-env-agent-port={ports.runtime_env}",
        f"--node-manager-port={ports.node_manager}",
        f"--object-manager-port={ports.object_manager}",
        "--disable-usage-stats",
    ]
