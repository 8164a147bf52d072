"""Ray token authentication against a head started the way a user starts one: `ray start --head`
on a machine where ~/.ray/auth_token exists (any earlier local `ray.init()` writes one), which
turns authentication on. A job submitted with `ray job submit` launches an expert group and
decodes through it; `unimoe-ray` reaches the group by explicit address with the token from
~/.ray/auth_token or RAY_AUTH_TOKEN, and without a token fails in one line saying how to pass it.

The head runs with its own HOME (so its token is the test's, not the user's), its own temp dir
and free ports, and is stopped by killing exactly the processes it started."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster_head import BIN, HeadPorts, ray_start_head

pytestmark = pytest.mark.ray

GROUP = "test-token"


@dataclass(frozen=True)
class Head:
    gcs: str  # host:port
    dashboard: str  # http://host:port (jobs API)
    home: Path  # the HOME holding ~/.ray/auth_token
    env: dict  # a user's environment on this machine: HOME with the token, RAY_AUTH_MODE unset

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()


def stop_ray_started_in(temp_dir: str) -> None:
    """SIGKILL the processes of the Ray started with `temp_dir` (their command lines name it)
    and their children: never `ray stop`, which stops every Ray on the machine."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        procs[int(pid)] = (ppid, cmd)
    mine = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd and pid != os.getpid()}
    while new := {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine:
        mine |= new
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env |= {"HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    ports = HeadPorts.allocate()
    try:
        subprocess.run(ray_start_head(temp_dir, ports), env=env, check=True, capture_output=True, timeout=180)
        yield Head(gcs=f"127.0.0.1:{ports.gcs}", dashboard=f"http://127.0.0.1:{ports.dashboard}", home=home, env=env)
    finally:
        stop_ray_started_in(temp_dir)


JOB = textwrap.dedent(f"""
    import copy
    import ray
    import torch
    from unimoe_ray.presets import get_preset
    from unimoe_ray.inference.generate import SamplingConfig, generate
    from unimoe_ray.model.unimoe_audio import UniMoEAudio
    from unimoe_ray.parallel import ActorResources, ExpertParallelConfig, attach_experts, launch_experts
    from unimoe_ray.text.prompt import Prompt

    ray.init()  # the job's cluster (RAY_ADDRESS, set by `ray job submit`)
    cfg = ExpertParallelConfig(group={GROUP!r}, exchange="plain", expert_resources=ActorResources(num_cpus=0))
    model = UniMoEAudio(get_preset("tiny").replace(vision=None)).init_weights(seed=0).eval()
    launch_experts(model, cfg)
    trunk = copy.deepcopy(model)
    experts = attach_experts(trunk, cfg)
    sampling = SamplingConfig(greedy=True, guidance_scale=0.0, max_frames=4)
    prompt = [Prompt(torch.arange(3, 9))]
    same = torch.equal(generate(trunk, prompt, None, sampling)[0], generate(model, prompt, None, sampling)[0])
    experts.close()
    print("codes identical:", same)
""")


def cli(head, *args, env_changes=None):
    env = {**head.env, **(env_changes or {})}
    run = subprocess.run(
        [str(BIN / "unimoe-ray"), "experts", *args, "--address", head.gcs, "--group", GROUP],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return run.returncode, run.stdout, run.stderr.splitlines()


@pytest.fixture(scope="module")
def job(head, tmp_path_factory):
    """`ray job submit` as the README says: RAY_AUTH_MODE=token in the submitting shell."""
    script = tmp_path_factory.mktemp("job") / "launch_and_decode.py"
    script.write_text(JOB)
    run = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**head.env, "RAY_AUTH_MODE": "token"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_job_launches_a_group_and_decodes_through_it(job):
    assert "codes identical: True" in job


def test_cli_uses_the_token_in_home(head, job):
    code, out, err = cli(head, "status")
    assert code == 0, err
    assert f"group '{GROUP}'" in out


def test_cli_uses_a_token_from_the_environment(head, job, tmp_path):
    code, out, err = cli(head, "status", env_changes={"HOME": str(tmp_path), "RAY_AUTH_TOKEN": head.token})
    assert code == 0, err
    assert f"group '{GROUP}'" in out


def test_cli_without_a_token_says_how_to_pass_it(head, job, tmp_path):
    code, _, err = cli(head, "status", "--timeout", "8", env_changes={"HOME": str(tmp_path)})
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("unimoe-ray: error: ")
    assert "RAY_AUTH_TOKEN" in err[0] and "~/.ray/auth_token" in err[0]


def test_cluster_files_turn_token_auth_on_on_every_node():
    import yaml

    cluster = Path(__file__).resolve().parents[2] / "cluster"
    launcher = yaml.safe_load((cluster / "ray-cluster.yaml").read_text())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts if "ray start" in c)
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token on every node
    kuberay = yaml.safe_load((cluster / "kuberay-raycluster.yaml").read_text())["spec"]
    groups = [kuberay["headGroupSpec"]] + kuberay["workerGroupSpecs"]
    for group in groups:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
