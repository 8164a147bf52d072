"""`make demo`'s console: one line per stage there, everything else in the log file, including
what child processes write to the inherited descriptors (as Ray's workers and log monitor do).

Each case runs in a fresh interpreter whose stdout/stderr are pipes, as a terminal would be:
under pytest's own capture sys.stdout is not file descriptor 1."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(tmp_path, body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import subprocess, sys
        from pathlib import Path
        from unimoe_ray.apps.product import console_to_log
        log = Path(sys.argv[1])
        print("before", flush=True)
    """) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "demo.log")], capture_output=True, text=True, timeout=120
    )


def test_the_console_gets_the_stage_lines_and_the_log_gets_everything(tmp_path):
    r = _run(
        tmp_path,
        """
        with console_to_log(log) as say:
            say("1/2 first stage")
            print("a driver line")
            print("a driver warning", file=sys.stderr)
            subprocess.run([sys.executable, "-c",
                            "import sys; print('worker out'); print('bar\\\\r' * 3, file=sys.stderr)"], check=True)
            say("2/2 second stage")
        print("after")
    """,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "before" and lines[-1] == "after" and len(lines) == 4
    assert [line.split("] ", 1)[1] for line in lines[1:3]] == ["1/2 first stage", "2/2 second stage"]
    assert lines[1].startswith("[demo ")
    assert r.stderr == ""
    text = (tmp_path / "demo.log").read_bytes().decode()  # bytes: keep the progress bars' \r
    assert (
        text.index("1/2 first stage")
        < text.index("a driver line")
        < text.index("a driver warning")
        < text.index("worker out")
        < text.index("2/2 second stage")
    )
    assert "bar\r" in text and "before" not in text and "after" not in text


def test_a_failure_names_the_log_and_restores_the_console(tmp_path):
    r = _run(
        tmp_path,
        """
        try:
            with console_to_log(log) as say:
                say("1/1 the stage")
                raise RuntimeError("stage broke")
        except RuntimeError as err:
            print(f"console again: {err}")
    """,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2].endswith(f"failed; the full output is in {tmp_path / 'demo.log'}")
    assert lines[-1] == "console again: stage broke"


def test_the_loss_means_take_the_first_and_last_few_steps():
    from unimoe_ray.apps.product import _mean_ends

    assert _mean_ends([9.0]) == (1, 9.0, 9.0)
    assert _mean_ends([9.0, 7.0, 8.0]) == (1, 9.0, 8.0)
    assert _mean_ends([9.0, 8.0, 7.0, 6.0, 5.0, 1.0]) == (3, 8.0, 4.0)
    assert _mean_ends([float(i) for i in range(20, 0, -1)]) == (3, 19.0, 2.0)


def test_the_summary_table_puts_each_stage_and_the_two_models_on_one_line():
    from unimoe_ray.apps.product import format_summary

    stage = {
        "steps": 6,
        "lr": 1e-3,
        "loss_first": 81.3,
        "loss_last": 80.1,
        "loss_first_mean": 81.2,
        "loss_last_mean": 80.4,
        "val_ce_start_mean": 81.5,
        "val_ce_end_mean": 80.9,
        "experts_per_token": 2.5,
    }
    metrics = {
        "random_init": {"t2m": {"ce": 83.2, "accuracy": 0.001, "experts_per_token": 3.0}},
        "stage3": {"t2m": {"ce": 80.9, "accuracy": 0.02, "eos_rate": 0.0, "experts_per_token": 2.5}},
    }
    dense = {k: v for k, v in stage.items() if k != "experts_per_token"}  # a specialist has no router
    s = {
        "stages": {"stage1_t2m": dense, "stage2": stage},
        "eval": {"rows": {"t2m": 2}, "generation": "off", **metrics},
        "requests": {"text_to_music": {"seconds_audio": 2.0, "ttfa_s": 0.5, "latency_s": 3.0, "wav": "music.wav"}},
    }
    lines = format_summary(s).splitlines()
    assert len(lines) == 8
    assert lines[2].split()[:4] == ["stage2", "6", "0.001", "81.30"]
    assert "81.20 →  80.40" in lines[2] and "81.50 →  80.90" in lines[2] and lines[2].endswith("2.5")
    assert lines[1].endswith(" -")
    t2m = next(line for line in lines if line.startswith("t2m "))
    assert " 83.20 →  80.90" in t2m and "0.001 → 0.020" in t2m and "3.00 → 2.50" in t2m
    assert " - " in t2m  # no EOS rate for the random-init model: a dash, not a number
    assert lines[-1].startswith("text_to_music") and lines[-1].endswith("music.wav")
