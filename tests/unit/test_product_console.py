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
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "demo.log")], capture_output=True, text=True,
                          timeout=120)


def test_the_console_gets_the_stage_lines_and_the_log_gets_everything(tmp_path):
    r = _run(tmp_path, """
        with console_to_log(log) as say:
            say("1/2 first stage")
            print("a driver line")
            print("a driver warning", file=sys.stderr)
            subprocess.run([sys.executable, "-c",
                            "import sys; print('worker out'); print('bar\\\\r' * 3, file=sys.stderr)"], check=True)
            say("2/2 second stage")
        print("after")
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "before" and lines[-1] == "after" and len(lines) == 4
    assert [line.split("] ", 1)[1] for line in lines[1:3]] == ["1/2 first stage", "2/2 second stage"]
    assert lines[1].startswith("[demo ")
    assert r.stderr == ""
    text = (tmp_path / "demo.log").read_bytes().decode()  # bytes: keep the progress bars' \r
    assert (text.index("1/2 first stage") < text.index("a driver line") < text.index("a driver warning")
            < text.index("worker out") < text.index("2/2 second stage"))
    assert "bar\r" in text and "before" not in text and "after" not in text


def test_a_failure_names_the_log_and_restores_the_console(tmp_path):
    r = _run(tmp_path, """
        try:
            with console_to_log(log) as say:
                say("1/1 the stage")
                raise RuntimeError("stage broke")
        except RuntimeError as err:
            print(f"console again: {err}")
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2].endswith(f"failed; the full output is in {tmp_path / 'demo.log'}")
    assert lines[-1] == "console again: stage broke"
