"""`unimoe-ray experts status|scale` against a running local Ray cluster: in-process through
`main`, and as the installed console script from another process (found by name, as an admin
would)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from unimoe_ray.apps.cli import build_parser, main
from unimoe_ray.apps.ports import free_port
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, launch_experts, shutdown_experts
from unimoe_ray.presets import get_preset

pytestmark = pytest.mark.ray

GROUP = "test-cli"
CFG = ExpertParallelConfig(group=GROUP, expert_resources=ActorResources(num_cpus=0))
# A group that fills the cluster: each replica takes one of the 4 `cli_slot`s there are.
FULL = ExpertParallelConfig(
    group="test-cli-full",
    expert_resources=ActorResources(num_cpus=0, node_resource="cli_slot"),
    restart_timeout_s=30.0,
    placement_timeout_s=3.0,  # the scale that cannot be placed fails after this
)
SCRIPT = Path(sys.executable).with_name("unimoe-ray")


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, resources={"cli_slot": 4}, include_dashboard=False, log_to_driver=False)
    model = UniMoEAudio(get_preset("tiny").replace(vision=None)).init_weights(seed=0)
    controller = launch_experts(model, CFG)
    launch_experts(model, FULL)
    yield controller
    shutdown_experts(GROUP, CFG.namespace)
    shutdown_experts(FULL.group, FULL.namespace)
    ray.shutdown()


def run_cli(*args, env=None, timeout=120):
    """The console script as an admin runs it; (exit code, stdout, stderr lines)."""
    run = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    return run.returncode, run.stdout, run.stderr.splitlines()


def test_parser_dispatches_experts_commands():
    args = build_parser().parse_args(["experts", "scale", "--expert", "3", "--replicas", "2"])
    assert (args.command, args.experts_command, args.expert, args.replicas) == ("experts", "scale", 3, 2)
    assert (args.address, args.namespace, args.group) == ("auto", "unimoe", "default")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experts", "scale", "--expert", "3"])  # --replicas is required


def test_status_lists_every_expert(cluster, capsys):
    assert main(["experts", "status", "--group", GROUP]) == 0
    out = capsys.readouterr().out
    assert f"group '{GROUP}'" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("0", "1"), ("1", "1"), ("2", "1"), ("3", "1")]


def test_scale_changes_replicas_and_json_status_shows_them(cluster, capsys):
    assert main(["experts", "scale", "--group", GROUP, "--expert", "3", "--replicas", "2"]) == 0
    capsys.readouterr()
    assert main(["experts", "status", "--group", GROUP, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [e["replicas"] for e in status["experts"]] == [1, 1, 1, 2]
    assert len(set(status["experts"][3]["actor_ids"])) == 2
    assert main(["experts", "scale", "--group", GROUP, "--expert", "3", "--replicas", "1"]) == 0
    assert "     3         1" in capsys.readouterr().out


def test_errors_are_one_line_messages(cluster, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["experts", "scale", "--group", GROUP, "--expert", "9", "--replicas", "2"])
    assert exit_info.value.code == 2
    assert "expert 9 does not exist: routed experts are 0..3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experts", "scale", "--group", GROUP, "--expert", "0", "--replicas", "0"])
    assert "at least 1 replica" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experts", "status", "--group", "no-such-group"])
    assert "no expert group 'no-such-group'" in capsys.readouterr().err


def test_console_script_finds_the_group_by_name_from_another_process(cluster):
    address = ray.get_runtime_context().gcs_address
    run = subprocess.run(
        [str(SCRIPT), "experts", "status", "--address", address, "--group", GROUP, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert [e["expert"] for e in json.loads(run.stdout)["experts"]] == [0, 1, 2, 3]


# ---- errors as an admin meets them: one line, exit 2, never a hang ----


def test_no_cluster_is_one_line(tmp_path):
    # No RAY_ADDRESS, and no `ray start` recorded in this (empty) Ray temp dir.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [str(SCRIPT), "experts", "status"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "RAY_TMPDIR": str(tmp_path)},
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "unimoe-ray: error: no Ray cluster found: none started with `ray start` on this machine and "
        "RAY_ADDRESS is unset; start one (`ray start --head`) or pass --address HOST:PORT"
    ]


def test_address_of_a_stopped_cluster_fails_at_once():
    code, _, err = run_cli("experts", "status", "--address", f"127.0.0.1:{free_port()}", timeout=60)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("unimoe-ray: error: no Ray cluster answers at ") and "refused" in err[0]


def test_address_that_never_answers_fails_within_the_timeout():
    with socket.socket() as server:  # accepts TCP connections, never speaks Ray's protocol
        server.bind(("0.0.0.0", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code, _, err = run_cli("experts", "status", "--address", f"127.0.0.1:{port}", "--timeout", "3", timeout=60)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("unimoe-ray: error: the Ray cluster at ")
    assert f":{port} did not accept a connection within 3s" in err[0]


def test_scale_the_cluster_cannot_place_is_one_line(cluster):
    address = ray.get_runtime_context().gcs_address
    code, _, err = run_cli(
        "experts", "scale", "--address", address, "--group", FULL.group, "--expert", "0", "--replicas", "2"
    )
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("unimoe-ray: error: ") and "cli_slot" in err[0]
    assert main(["experts", "status", "--group", FULL.group, "--json"]) == 0  # still serving
