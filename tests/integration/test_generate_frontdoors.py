"""The released front doors on the tiny model, end to end through the real loading code:
`unimoe-ray generate tts|t2m|v2m` (voice by name from a released-form voice library, or a WAV
plus transcript; a video file) and `jobs/generate_batch.py` on Ray Data with two bad items."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from unimoe_ray.apps import cli
from unimoe_ray.audio.io import write_wav
from unimoe_ray.audio.synth import reference_voice
from unimoe_ray.builders import ArtifactsConfig, prepare_artifacts
from unimoe_ray.data.mini_corpus import write_mp4

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("frontdoors")
    ckpt, tok, dac = prepare_artifacts(ArtifactsConfig(out_dir=str(d), preset="tiny"))
    (d / "assets").mkdir()
    write_wav(d / "assets" / "en_male.wav", reference_voice(1.0, 16000), 16000)
    write_wav(d / "ref_24k.wav", reference_voice(0.6, 24000), 24000)  # any sample rate
    library = {
        "audio_prompts": {
            "english": {
                "male": {
                    "prompt": "Using script blockers is generally a good idea.",
                    "audio_path": "assets/en_male.wav",
                    "language": "en",
                    "gender": "male",
                }
            }
        }
    }
    (d / "examples").mkdir()
    (d / "examples" / "prompt_audios.json").write_text(json.dumps(library))
    frames = np.zeros((4, 64, 96, 3), np.uint8)
    frames[:, :, :48] = (200, 40, 40)
    write_mp4(d / "clip.mp4", frames, fps=2)
    common = ["--checkpoint", str(ckpt), "--tokenizer", str(tok), "--dac-path", str(dac), "--seed", "0"]
    return d, common


def _wav(path: Path, frames: int) -> None:
    wav, sr = sf.read(path)
    assert sr == 16000 and len(wav) == frames * 320


def test_cli_tts_by_voice_name_and_by_reference_wav(assets, capsys):
    d, common = assets
    lib = ["--voice-library", str(d / "examples" / "prompt_audios.json"), "--voice-root", str(d)]
    out = d / "out" / "named.wav"
    assert (
        cli.main(
            [
                "generate",
                "tts",
                *common,
                "--text",
                "Hello there.",
                "--voice",
                "English Male",
                *lib,
                "--max-seconds",
                "0.1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    line = capsys.readouterr().out
    assert f"wrote {out}: 0.10 s of audio (5 frames)" in line
    _wav(out, 5)
    out2 = d / "out" / "ref.wav"
    assert (
        cli.main(
            [
                "generate",
                "tts",
                *common,
                "--text",
                "Hi.",
                "--ref-audio",
                str(d / "ref_24k.wav"),
                "--ref-text",
                "This is my voice.",
                "--max-seconds",
                "0.08",
                "-o",
                str(out2),
            ]
        )
        == 0
    )
    _wav(out2, 4)


def test_cli_music_and_video_to_music(assets, capsys):
    d, common = assets
    out = d / "out" / "t2m.wav"
    assert (
        cli.main(
            [
                "generate",
                "t2m",
                *common,
                "--caption",
                "calm piano",
                "--max-seconds",
                "0.1",
                "--guidance-scale",
                "3",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    _wav(out, 5)
    out = d / "out" / "v2m.wav"
    assert (
        cli.main(
            [
                "generate",
                "v2m",
                *common,
                "--caption",
                "epic strings",
                "--video",
                str(d / "clip.mp4"),
                "--max-seconds",
                "0.06",
                "--expert-dtype",
                "int8",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    _wav(out, 3)
    assert "v2m.wav: 0.06 s of audio (3 frames)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--voice", "klingon_male"], "unknown voice 'klingon_male'"),
        (["--ref-audio", "/nowhere.wav", "--ref-text", "x"], "does not exist"),
        ([], "needs a voice"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(assets, capsys, extra, message):
    d, common = assets
    lib = ["--voice-library", str(d / "examples" / "prompt_audios.json"), "--voice-root", str(d)]
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "tts", *common, "--text", "Hi.", *lib, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_batch_job_on_ray_data_completes_good_items_and_names_the_bad(assets):
    d, common = assets
    tasks = [
        {"task_type": "text_to_music", "task_id": "m1", "caption": "upbeat synth", "output_path": "batch_out"},
        {"task_type": "text_to_speech", "task_id": "s_bad_voice", "target_text": "Hello.", "voice": "nobody"},
        {
            "task_type": "text_to_speech",
            "task_id": "s1",
            "target_text": "Hello there.",
            "reference_audio": "ref_24k.wav",
            "reference_text": "This is my voice.",
            "output_path": "batch_out",
        },
        {"task_type": "video_text_to_music", "task_id": "v_missing", "caption": "drums", "video_path": "gone.mp4"},
        {
            "task_type": "text_to_speech",
            "task_id": "s2",
            "target_text": "Named voice.",
            "voice": "english_male",
            "output_path": "batch_out",
        },
        {
            "task_type": "video_text_to_music",
            "task_id": "v1",
            "caption": "drums",
            "video_path": "clip.mp4",
            "output_path": "batch_out",
        },
    ]
    (d / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    manifest = d / "batch_out" / "manifest.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "generate_batch.py"),
            str(d / "tasks.jsonl"),
            *common[:6],
            "--voice-library",
            str(d / "examples" / "prompt_audios.json"),
            "--voice-root",
            str(d),
            "--manifest",
            str(manifest),
            "--actors",
            "2",
            "--cpus-per-actor",
            "0.5",
            "--max-seconds",
            "0.1",
            "--seed",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=d,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # some items failed
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [t["task_id"] for t in tasks]  # the file's order
    status = {r["task_id"]: r for r in rows}
    assert {k for k, r in status.items() if r["status"] == "ok"} == {"m1", "s1", "s2", "v1"}
    assert "unknown voice 'nobody'" in status["s_bad_voice"]["error"]
    assert "does not exist" in status["v_missing"]["error"]
    for tid in ("m1", "s1", "s2", "v1"):
        assert status[tid]["frames"] == 5
        _wav(d / "batch_out" / f"{tid}.wav", 5)
    assert "4/6 tasks ok" in proc.stdout


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a job started with start_new_session=True, and
    the Ray processes it spawned, which keep its session after it dies)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            session = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
            if session == sid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def test_batch_job_killed_midway_keeps_finished_items_and_resumes(assets):
    """SIGKILL the job once two items are in its manifest: those rows are there, whole; the
    same command with --resume runs only the rest, and the manifest ends in file order."""
    d, common = assets
    short = [
        {"task_type": "text_to_music", "task_id": f"short{i}", "caption": "soft pads", "output_path": "crash_out"}
        for i in range(3)
    ]
    # Long enough that the kill lands while it runs (one actor takes the items in file order;
    # the kill follows the second short item within a 20 ms poll).
    long = [
        {
            "task_type": "text_to_music",
            "task_id": "long0",
            "caption": "slow drums",
            "output_path": "crash_out",
            "sampling": {"min_frames": 600, "max_frames": 600},
        }
    ]
    tasks = short + long
    (d / "crash_tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    manifest = d / "crash_out" / "manifest.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "generate_batch.py"),
        str(d / "crash_tasks.jsonl"),
        *common[:6],
        "--manifest",
        str(manifest),
        "--actors",
        "1",
        "--max-seconds",
        "0.1",
        "--seed",
        "0",
    ]
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True
    )
    try:
        while job.poll() is None:
            lines = manifest.read_text().splitlines() if manifest.is_file() else []
            if sum('"status": "ok"' in line for line in lines) >= 2:
                job.kill()  # SIGKILL: no handler, no flush, no atexit
                break
            time.sleep(0.02)
        out = job.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        _kill_session(job.pid)  # the local Ray the job started: its agents outlive it a minute
    assert job.returncode == -signal.SIGKILL, out[-3000:]  # killed, not finished
    recorded = [json.loads(line) for line in manifest.read_text().splitlines()]
    done = {r["task_id"] for r in recorded if r["status"] == "ok"}
    assert 2 <= len(done) < len(tasks) and len(recorded) == len(done)
    for r in recorded:
        _wav(Path(r["output"]), r["frames"])  # each recorded item's WAV is complete
    stamps = {tid: Path(r["output"]).stat().st_mtime_ns for tid, r in ((r["task_id"], r) for r in recorded)}

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240, env=env, cwd=d)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resume: {len(done)} tasks already done" in again.stdout
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [t["task_id"] for t in tasks]
    assert all(r["status"] == "ok" for r in rows)
    assert {r["task_id"]: r["frames"] for r in rows} == {
        **{t["task_id"]: 5 for t in short},
        **{t["task_id"]: 600 for t in long},
    }
    for tid, stamp in stamps.items():  # not generated again
        assert (d / "crash_out" / f"{tid}.wav").stat().st_mtime_ns == stamp
