import socket
import subprocess
import sys

import pytest

from pipeline.data.atomic import staged


def test_a_staged_output_appears_whole_or_not_at_all(tmp_path):
    (tmp_path / ".dvc").mkdir()
    final = tmp_path / "data" / "pseudo"
    with staged(final) as tmp:
        assert (tmp_path / ".dvc/tmp/staging") in tmp.parents  # in DVC's scratch, not beside the output
        tmp.mkdir()
        (tmp / "part-0.parquet").write_bytes(b"rows")
        assert not final.exists()
    assert (final / "part-0.parquet").read_bytes() == b"rows"
    with pytest.raises(RuntimeError), staged(final) as tmp:
        tmp.mkdir()
        raise RuntimeError("killed half-way")
    assert (final / "part-0.parquet").read_bytes() == b"rows"  # the previous output stays
    assert list((tmp_path / ".dvc/tmp/staging").iterdir()) == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".dvc", "data", "part-0.parquet", "pseudo", "staging",
                                                           "tmp"]


def test_what_a_killed_writer_left_is_swept_by_the_next_write(tmp_path):
    (tmp_path / ".dvc").mkdir()
    staging = tmp_path / ".dvc/tmp/staging"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    leftover, running = staging / f"{host}-{int(dead.stdout)}-abc", staging / f"{host}-{1}-def"  # pid 1 never dies
    for holder in (leftover, running):
        (holder / "pseudo").mkdir(parents=True)
    with staged(tmp_path / "models" / "teacher.pt") as tmp:
        tmp.write_bytes(b"weights")
    assert not leftover.exists() and running.exists()


def test_outside_a_dvc_project_the_temp_is_a_hidden_sibling(tmp_path):
    with staged(tmp_path / "out.json") as tmp:
        assert tmp == tmp_path / ".out.json.tmp"
        tmp.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
