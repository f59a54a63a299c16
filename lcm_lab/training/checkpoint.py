"""Checkpoints: ``accelerator.save_state`` into a temporary folder, renamed when complete.

Layout: ``<output_dir>/checkpoints/checkpoint-<step>/`` holding accelerate's state (student weights,
optimizer, LR schedule, RNG) plus ``extra/*.safetensors`` for state accelerate does not own (EMA
target, reward-model proxies). accelerate reloads its files with ``torch.load(weights_only=True)``; the
extras are safetensors, so nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import load
from safetensors.torch import load_file, save_file

from ..files import install_folder, recover_swaps
from ..readable import first_line

__all__ = ["CheckpointError", "checkpoint_dirs", "find_checkpoint", "check_resumable", "save_checkpoint",
           "load_checkpoint"]

PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: damaged, foreign, or from a different process/batch layout."""


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def _step_of(folder: Path) -> int | None:
    """The step in a ``checkpoint-<step>`` folder's name; None for any other name."""
    digits = folder.name[len(PREFIX):]
    return int(digits) if folder.name.startswith(PREFIX) and digits.isdigit() else None


def recover_interrupted_swap(root: str | os.PathLike) -> list[Path]:
    """Finish what a crash inside :func:`save_checkpoint` left: the previous copy of a re-saved step, moved
    aside by :func:`~lcm_lab.files.install_folder`, goes back under its name if no new copy took it (returned);
    half-written ``.tmp-checkpoint-<step>`` folders are removed. Main process only, before anything reads the
    folder."""
    for tmp in Path(root).glob(f".tmp-{PREFIX}*") if Path(root).is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    return recover_swaps(root, f"{PREFIX}*")


def find_checkpoint(root: str | os.PathLike, spec: str) -> Path:
    """Resolve ``resume_from_checkpoint``: ``"latest"`` or a checkpoint folder."""
    if spec == "latest":
        found = checkpoint_dirs(root)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest but {root} has no checkpoint-<step> folder")
        return found[-1]
    path = Path(spec)
    if not (path / "lcm_lab_state.json").is_file():
        raise FileNotFoundError(f"{path} is not an lcm_lab checkpoint (no lcm_lab_state.json); "
                                "pass a checkpoint-<step> folder or 'latest'")
    return path


def save_checkpoint(accelerator, root: str | os.PathLike, step: int, extra: dict[str, dict[str, torch.Tensor]],
                    total_limit: int | None = None, layout: dict | None = None) -> Path:
    """Save the full training state at ``step``; keep at most ``total_limit`` checkpoints, and none of a later
    step (left by a run that this one, resumed from an earlier checkpoint, replaces).

    All ranks must call this (accelerate saves per-rank RNG states); ``extra`` is only read on the main
    process. ``layout`` (process count, batch size, ...) is stored for :func:`check_resumable` to check. The
    folder appears under its final name only once every file is written, so a crash never leaves a
    checkpoint that ``resume latest`` would pick up half-written.
    """
    root = Path(root)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's RNG file is written before the folder is renamed and pruned
    if accelerator.is_main_process:
        (tmp / "extra").mkdir(exist_ok=True)
        for name, tensors in extra.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "extra" / f"{name}.safetensors")
        (tmp / "lcm_lab_state.json").write_text(json.dumps({"step": step, "layout": layout or {}}))
        install_folder(tmp, final)  # a re-run that reached this step again swaps: one copy always exists
        # Checkpoints after this step belong to a run this one abandoned by resuming from an earlier checkpoint
        # into the same folder: drop them, so that `latest` and the limit only ever see this run's checkpoints.
        found = checkpoint_dirs(root)
        later = [d for d in found if _step_of(d) > step]
        mine = [d for d in found if _step_of(d) <= step]
        for old in later + (mine[:-total_limit] if total_limit is not None else []):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_resumable(path: Path, layout: dict | None = None) -> int:
    """The step of checkpoint ``path``, after checking that it was saved with ``layout`` (process count, batch
    size, accumulation steps, seed): a run resumed with other values would replay neither its data order nor
    its RNG streams. Cheap (reads ``lcm_lab_state.json`` only), so :func:`train` calls it before any set-up.

    Raises:
        CheckpointError: the state file is unreadable, or the layout differs.
    """
    advice = ("If the folder is damaged, delete it to resume from the previous checkpoint (with none left, the run "
              "starts over).")
    try:
        state = json.loads((path / "lcm_lab_state.json").read_text())
        step = int(state["step"])
    except Exception as e:
        raise CheckpointError(f"cannot resume from {path}: unreadable lcm_lab_state.json ({type(e).__name__}: {e}). "
                              + advice) from e
    if step < 0 or _step_of(path) not in (None, step):
        raise CheckpointError(f"cannot resume from {path}: its lcm_lab_state.json records step {step}, not the "
                              f"folder's. " + advice)
    saved = state.get("layout") or {}  # absent in checkpoints written before layouts were recorded
    changed = {k: (saved[k], v) for k, v in (layout or {}).items() if k in saved and saved[k] != v}
    if changed:
        raise CheckpointError(f"cannot resume from {path}: it was saved with "
                              + ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items())
                              + ". Resume with the same settings, or start a new train.output_dir.")
    return step


def load_checkpoint(accelerator, path: Path, restore_extra: Callable[[dict], None]) -> None:
    """Restore accelerate's state from ``path`` (already accepted by :func:`check_resumable`, which gives its
    step) and hand the extra tensors to ``restore_extra``. Any failure, the task's included (a missing or
    mis-shaped extra), raises :class:`CheckpointError` naming the checkpoint."""
    part = f"random_states_{accelerator.process_index}.pkl"
    try:
        # accelerate only logs an unreadable RNG-state file and resumes with the current RNG: read it here first.
        load(path / part)
        part = "accelerate's model, optimizer and scheduler files"
        accelerator.load_state(str(path))
        extra = {}
        for file in sorted((path / "extra").glob("*.safetensors")):
            part = f"extra/{file.name}"
            extra[file.stem] = load_file(file)
        part = "extra/"
        restore_extra(extra)
    except Exception as e:  # a truncated or foreign file: say which checkpoint and which part of it
        raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {first_line(e)} (reading {part}). "
                              "If the model settings changed since it was saved (e.g. model.lora), resume with "
                              "the saved ones; if the folder is damaged, delete it to resume from the previous "
                              "checkpoint (with none left, the run starts over), or start a new "
                              "train.output_dir.") from e
