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

__all__ = ["atomic_write", "atomic_write_text", "check_out_folder", "read_json_object", "write_folder_atomically"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on ``<path>.tmp``, then rename it over ``path``; a failed write leaves no temp file.

    ``write`` gets the temp path and must write the whole file there, in the format ``path`` names (the temp
    name's suffix is ``.tmp``, so writers that guess the format from it need the format passed explicitly).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to a temp file next to ``path``, then rename it over ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _side_folder(out: Path, kind: str) -> Path:
    # The host in the name: on a shared filesystem another machine's live writer has a pid unknown here.
    return out.with_name(f"{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}")


def _dead_writers(out: Path, kind: str) -> list[Path]:
    """``<out>.<kind>-<host>-<pid>`` folders (``kind`` "partial" or "old") of writers on this host whose process
    no longer exists."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return []
    dead = []
    prefix = f"{out.name}.{kind}-{socket.gethostname()}-"
    for folder in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = folder.name[len(prefix):]
        if not (pid.isascii() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(folder)
        except (OSError, OverflowError):  # alive under another user, or not a pid
            pass
    return dead


def write_folder_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` into ``<out>.partial-<host>-<pid>``, then move the result to ``out_dir``.

    An existing ``out_dir`` is moved aside (``<out>.old-<host>-<pid>``) only after ``write`` succeeded, the new
    folder is renamed into place, and the old one deleted; if the rename fails the old folder is restored.
    What killed writers of this host left is tidied first: a writer killed between its two renames left only
    its ``old`` folder, which is put back; partial folders are removed.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _side_folder(out, "partial"), _side_folder(out, "old")
    dead_olds = _dead_writers(out, "old")
    if dead_olds and not out.exists():  # the last complete version
        newest = max(dead_olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, out)
        dead_olds.remove(newest)
    for stale in (tmp, old, *_dead_writers(out, "partial"), *dead_olds):
        shutil.rmtree(stale, ignore_errors=True)  # another writer may be removing a dead one too
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
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
