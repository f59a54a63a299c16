"""Files and folders written whole or not at all: into a temporary name next to the target, then renamed.

A crash leaves the previous version (or nothing), never a half-written file that a later run would read.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "check_out_folder", "install_folder", "read_json_object",
           "recover_swaps", "scratch_folder", "write_folder_atomically"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on ``<path>.tmp-<host>-<pid>``, then rename it over ``path``; a failed write leaves no
    temp file, and concurrent writers of ``path`` each write their own (the last rename wins, whole).

    ``write`` gets the temp path and must write the whole file there, in the format ``path`` names (the temp
    name has no image or JSON suffix, so writers that guess the format from it need the format passed
    explicitly). A writer killed mid-write leaves its temp file, never a partial ``path``; nothing looks for
    those, because a scan of the folder per file would make writing N images into one folder O(N^2).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _side_path(out, "tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temp file next to ``path``, then rename it over ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _side_path(out: Path, kind: str) -> Path:
    # The host in the name: on a shared filesystem another machine's live writer has a pid unknown here.
    return out.with_name(f"{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # alive under another user, or not a pid: leave its folder alone
        return True
    return True


def _dead_side_folders(parent: Path, pattern: str, kind: str) -> list[tuple[Path, Path]]:
    """``(folder, target)`` for every ``<target>.<kind>-<host>-<pid>`` in ``parent`` (targets matching the glob
    ``pattern``) whose writer, a process of this host, no longer exists."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return []
    marker = f".{kind}-{socket.gethostname()}-"
    found = []
    for folder in parent.glob(f"{pattern}{glob.escape(marker)}*"):
        target, _, pid = folder.name.rpartition(marker)
        if target and pid.isascii() and pid.isdigit() and not _process_exists(int(pid)):
            found.append((folder, parent / target))
    return found


def recover_swaps(parent: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Tidy what killed writers of this host left in ``parent`` beside folders matching the glob ``pattern``.

    A writer killed between the two renames of :func:`install_folder` left the previous version only as its
    ``old`` folder: that goes back under its name (the newest, if several), and is returned. Other ``old``
    folders of dead writers are removed (their ``partial`` folders are :func:`scratch_folder`'s to remove).
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    restored = []
    olds = sorted(_dead_side_folders(parent, pattern, "old"), key=lambda pair: pair[0].stat().st_mtime, reverse=True)
    for folder, target in olds:
        if not target.exists():
            os.replace(folder, target)
            restored.append(target)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # another writer may be removing it too
    return restored


def scratch_folder(parent: str | os.PathLike, name: str) -> Path:
    """A new, empty folder ``<parent>/<name>.partial-<host>-<pid>`` that only this process writes, on ``parent``'s
    filesystem, so that what is finished there can be renamed into ``parent``. The folders that killed writers
    of this host left under the same ``name`` are removed first; the caller removes its own when done."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for folder, _ in _dead_side_folders(parent, glob.escape(name), "partial"):
        shutil.rmtree(folder, ignore_errors=True)
    tmp = _side_path(parent / name, "partial")
    shutil.rmtree(tmp, ignore_errors=True)  # this pid's, from a process before it
    tmp.mkdir()
    return tmp


def install_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` so that one complete copy always exists: an existing ``out``
    is first moved aside (``<out>.old-<host>-<pid>``), then deleted; if the rename fails it is put back. A crash
    between the two renames leaves the old copy for :func:`recover_swaps`."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _side_path(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_folder_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into ``<out>.partial-<host>-<pid>``, then :func:`install_folder` it as ``out_dir``.

    What killed writers of ``out_dir`` left is tidied first (:func:`recover_swaps`, :func:`scratch_folder`).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_swaps(out.parent, glob.escape(out.name))
    tmp = scratch_folder(out.parent, out.name)
    try:
        write(tmp)
        install_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_out_folder(path: str | os.PathLike) -> Path:
    """``path`` as a folder to write results into: an existing file there is a ``ValueError`` now, before the
    work whose results would have nowhere to go."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the results")
    return out


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """The JSON object in a UTF-8 file; invalid text or JSON, or another JSON type, is a ``ValueError`` naming
    ``what`` and the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid UTF-8 JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data
