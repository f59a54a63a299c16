"""lcm_lab.files: a failed write keeps the previous file or folder and leaves no temp behind."""

import os
import socket

import pytest

from lcm_lab.files import atomic_write, atomic_write_text, write_folder_atomically


def test_atomic_write_replaces_and_keeps_old_on_failure(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"

    def fails_half_way(tmp):
        # this process's own temp file: a concurrent writer of the same path (another pid) writes another one
        assert tmp.name == f"a.json.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails_half_way)
    assert path.read_text() == "first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]

    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_write_folder_atomically_replaces_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "model"
    write_folder_atomically(out, lambda d: (d / "old.txt").write_text("v1"))
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]

    def fails(d):
        (d / "new.txt").write_text("v2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder_atomically(out, fails)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    write_folder_atomically(out, lambda d: (d / "new.txt").write_text("v2"))
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    killed = tmp_path / f"model.partial-{socket.gethostname()}-999999999"  # a killed writer: no such process
    killed.mkdir()
    write_folder_atomically(out, lambda d: (d / "new.txt").write_text("v3"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a writer killed between its two renames left the previous version only as its "old" folder
    os.replace(out, tmp_path / f"model.old-{socket.gethostname()}-999999999")
    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder_atomically(out, fails)
    assert (out / "new.txt").read_text() == "v3"  # put back before the new write began
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_folder_atomically(tmp_path / "file", lambda d: None)
