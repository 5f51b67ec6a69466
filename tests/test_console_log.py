import os
import pty
import subprocess
import sys
from pathlib import Path

from pipeline.runtime.console_log import TeedProcess, failed_stages, new_log

ROOT = Path(__file__).resolve().parent.parent
# Unbuffered, as under PYTHONUNBUFFERED=1: a line reaches the pipe in pieces.
SPEAK = ("import sys; [(sys.stdout.write(w), sys.stderr.write(w.upper()), sys.stdout.flush(), sys.stderr.flush()) "
         "for w in ('to ', 'the ', 'streams', chr(10))]; sys.exit(3)")


def test_off_a_terminal_the_output_reaches_its_own_stream_and_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    teed = TeedProcess([sys.executable, "-c", SPEAK], dict(os.environ), log)
    assert teed.wait() == 3
    teed.write(b"the run's summary\n")
    teed.close()
    out, err = capfd.readouterr()
    assert out == "to the streams\n" and err == "TO THE STREAMS\n"
    assert sorted(log.read_text().splitlines()) == ["TO THE STREAMS", "the run's summary", "to the streams"]
    teed.write(b"after close\n")  # a late reader's chunk is dropped, not an error
    assert "after close" not in log.read_text()


def test_on_a_terminal_the_command_gets_a_terminal_and_the_log_plain_line_ends(tmp_path):
    """Run the tee itself on a pseudo-terminal, as `make run` in a terminal is."""
    log = tmp_path / "run.log"
    probe = "import sys; print('child on a terminal:', sys.stdout.isatty(), sys.stderr.isatty())"
    script = ("import os, sys; from pathlib import Path; from pipeline.runtime.console_log import TeedProcess; "
              f"t = TeedProcess([sys.executable, '-c', {probe!r}], dict(os.environ), Path({str(log)!r})); "
              "sys.exit(t.wait())")
    leader, follower = pty.openpty()
    tee = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert tee.wait(60) == 0, seen
    assert b"child on a terminal: True True" in seen  # what the user's terminal shows
    assert log.read_text() == "child on a terminal: True True\n"  # no \r from the terminal's line ends


def test_a_new_log_is_named_by_time_and_only_the_newest_stay(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    for i in range(5):
        (folder / f"run-2026010{i}-000000.log").write_text(str(i))
    log = new_log(tmp_path, keep=3)
    assert log.parent == folder and log.name.startswith("run-2") and not log.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["run-20260103-000000.log", "run-20260104-000000.log"]
    log.write_text("")
    assert new_log(tmp_path, keep=3) != log  # two runs within one second


def test_failed_stages_are_read_from_dvcs_own_words():
    assert failed_stages("ERROR: failed to reproduce 'teacher_finetune': failed to run: python ...") == \
        ["teacher_finetune"]
    assert failed_stages("ERROR: failed to reproduce stages: 'a', 'study/dvc.yaml:report' and 'b@round1'") == \
        ["a", "study/dvc.yaml:report", "b@round1"]
    assert failed_stages("Running stage 'prepare':\nUpdating lock file 'dvc.lock'\n") == []


def test_the_tee_collects_the_failed_stages_as_dvcs_lines_pass(tmp_path):
    says = ("import sys; print('Running stage ' + repr('first') + ':'); "
            "sys.stderr.write('ERROR: failed to reproduce ' + repr('second') + ': failed to run\\n'); sys.exit(1)")
    teed = TeedProcess([sys.executable, "-c", says], dict(os.environ), tmp_path / "run.log")
    assert teed.wait() == 1
    teed.close()
    assert teed.failed_stages == ["second"]
