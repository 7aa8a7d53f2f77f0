"""The main job's process runner: at most N jobs at once, failures reported with their logs, stop signals passed on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "e2e"))
import run_default  # noqa: E402

# A job: records its start and end times in FOLDER/NAME.json, sleeps, exits with the status given.
JOB = textwrap.dedent("""
    import json, sys, time
    folder, name, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
    began = time.time()
    time.sleep(0.4)
    print(f"job {name} output")
    open(f"{folder}/{name}.json", "w").write(json.dumps([began, time.time()]))
    sys.exit(status)
""")


def test_jobs_run_at_most_n_at_once_and_failures_are_named(tmp_path, capsys):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    jobs = {f"j{i}": [str(script), str(tmp_path), f"j{i}", "3" if i == 2 else "0"] for i in range(5)}
    failed = run_default.run_jobs(jobs, tmp_path / "logs", 2)
    assert failed == ["j2"]
    spans = [json.loads((tmp_path / f"j{i}.json").read_text()) for i in range(5)]
    starts_and_ends = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, change in starts_and_ends:
        running += change
        most = max(most, running)
    assert most == 2  # two at a time, never three
    assert (tmp_path / "logs" / "j4.log").read_text() == "job j4 output\n"
    err = capsys.readouterr().err
    assert "j2: FAILED (exit status 3)" in err and "job j2 output" in err


def test_a_stop_signal_reaches_the_running_jobs_and_no_new_job_starts(tmp_path):
    job = tmp_path / "polite.py"
    job.write_text(textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("stopping politely", flush=True), sys.exit(0)))
        print("running", flush=True)
        time.sleep(60)
    """))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal, sys, threading
        sys.path.insert(0, {str(ROOT / "examples" / "e2e")!r})
        import run_default
        threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        jobs = {{name: [{str(job)!r}] for name in ("a", "b", "c")}}
        print(run_default.run_jobs(jobs, __import__("pathlib").Path({str(tmp_path / "logs")!r}), 2))
    """))
    result = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "['c']"  # a and b stopped politely (status 0); c never started
    for name in ("a", "b"):
        assert (tmp_path / "logs" / f"{name}.log").read_text() == "running\nstopping politely\n"
    assert not (tmp_path / "logs" / "c.log").exists()
