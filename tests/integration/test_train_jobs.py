"""The curriculum as a user runs it: `ray job submit` of stage 1 → 2 → 3 against a Ray head
this test starts (`ray start --head --block` on free ports; stopped by killing the process
group it started, never `ray stop`, which would stop other clusters on the machine). Each
stage reads the previous stage's output folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from unimoe_ray.checkpoint import load_pretrained
from unimoe_ray.model.unimoe_audio import UniMoEAudio
from unimoe_ray.text.tokenizer import build_test_tokenizer
from unimoe_ray.train.state import read_meta
from unimoe_ray.train.synthetic import write_synthetic_shards

from cluster_head import BIN, HeadPorts, ray_start_head

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # `python` in the job = this interpreter
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60: the head writes ~/.ray/auth_token, clients send it
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ports = HeadPorts.allocate()
    root = tmp_path_factory.mktemp("head")
    log = open(root / "head.log", "w")
    temp_dir = Path(tempfile.mkdtemp(prefix="unimoe_head_"))  # short: Ray's socket paths
    proc = subprocess.Popen(
        ray_start_head(temp_dir, ports, block=True),
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{ports.dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            ok = (
                subprocess.run(
                    [str(BIN / "ray"), "job", "list", "--address", address],
                    env=_env(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).returncode
                == 0
            )
            if ok:
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Ray head did not come up: {Path(log.name).read_text()[-3000:]}")
            time.sleep(2)
        yield address
    finally:
        # Stop only the head this test started: its `ray start --block` process group.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)  # its graceful stop outlasted 10 s too (measured): SIGKILL below
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(address: str, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout[-4000:], done.stderr[-3000:])
    return done.stdout


# Three job submissions, three TorchTrainer runs (stages 2-3 on two workers): 3-5 min under
# `make test` on 2 cores (287 s on the slowest day measured); the timeout is a hang guard.
@pytest.mark.timeout(1500)
def test_curriculum_stage1_2_3_as_ray_jobs(head, tmp_path):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, {"v2m": 8})
    tok = build_test_tokenizer(tmp_path / "tok")
    common = [
        "--shards",
        str(shards),
        "--tokenizer",
        str(tok),
        "--storage-path",
        str(tmp_path / "store"),
        "--max-steps",
        "3",
        "--checkpoint-every",
        "3",
        "--val-every",
        "3",
        "--max-tokens",
        "512",
        "--warmup-steps",
        "1",
        "--num-workers",
        "1",
    ]
    spec = tmp_path / "specialists"
    # One specialist (v2m) → tiny's 4 routed experts, 4 proto-experts of its FFN: a TorchTrainer
    # run costs tens of CPU-seconds of Ray Train start-up on 2 cores (the product test trains four
    # specialists and merges them; tests/unit/test_train_integrate.py checks the merge).
    _submit(
        head,
        "jobs/train_stage1.py",
        "--task",
        "v2m",
        "--num-specialists",
        "1",
        "--preset",
        "tiny",
        "--out",
        str(spec),
        *common,
    )
    s2, s3 = tmp_path / "stage2", tmp_path / "stage3"
    # Stages 2 and 3 expert-parallel: two workers, each holding 2 of the 4 routed experts.
    ep = [*common[:-2], "--num-workers", "2", "--expert-parallel", "2"]
    _submit(head, "jobs/train_stage2.py", "--specialists", str(spec / "v2m"), "--tasks", "v2m", "--out", str(s2), *ep)
    out = _submit(head, "jobs/train_stage3.py", "--init", str(s2), "--tasks", "v2m", "--out", str(s3), *ep)
    assert "final model" in out

    specialist = load_pretrained(spec / "v2m", dtype=torch.float32)
    assert specialist.cfg.moe.mode == "dense" and specialist.cfg.moe.dense_intermediate == 128
    m2 = load_pretrained(s2, dtype=torch.float32)
    m3 = load_pretrained(s3, dtype=torch.float32)
    assert isinstance(m3, UniMoEAudio) and m3.cfg.moe.mode == "top_p" and m3.cfg.moe.num_routed == 4
    # Stage 2 started from the specialist: expert 2 = rows 64..95 of its FFN (frozen in stage 2,
    # so still bit-identical in its output), the vision tower is the specialist's.
    p = "language_model.layers.0.mlp"
    torch.testing.assert_close(
        m2.state_dict()[f"{p}.routed_experts.2.gate_proj.weight"],
        specialist.state_dict()[f"{p}.gate_proj.weight"][64:96],
        rtol=0,
        atol=0,
    )
    vis = next(n for n in m2.state_dict() if n.startswith("visual.") and n.endswith("weight"))
    assert torch.equal(m2.state_dict()[vis], specialist.state_dict()[vis])
    # Stage 3 read stage 2's output and trained everything.
    assert read_meta(s3)["init"] == str(s2.resolve()) and read_meta(s3)["step"] == 3
    name = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(m3.state_dict()[name], m2.state_dict()[name])
    metrics = [
        json.loads(x) for x in (tmp_path / "store" / "stage3" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["aux_weight"] for m in metrics] == pytest.approx([m3.cfg.moe.aux_weight(s) for s in range(3)])
    assert all("val/v2m" in m for m in metrics if m["step"] == 3)
    # Each rank reported its exchange: tokens it sent to every expert, per rank.
    assert all(f"ep/rank{r}/sent_e0" in m for m in metrics for r in (0, 1)), sorted(metrics[0])
