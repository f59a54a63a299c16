"""Clear errors for model files that exist but cannot be read (a truncated download, the wrong file)."""

from __future__ import annotations

import contextlib
import os
import re


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters; a line ending in ":" with the next one).

    torch's weights-only unpickling error is rewritten: its first line advises ``weights_only=False``, i.e.
    running whatever code the file holds, which is never the fix for a corrupt or foreign file.
    """
    lines = str(error).strip().splitlines() or [""]
    if lines[0].startswith("Weights only load failed"):
        # keep what was refused (e.g. "Unsupported global: GLOBAL numpy..."), not the advice to allow it
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
        detail = [found.group(1)] if found else [
            ln.strip() for ln in lines[1:]
            if ln.strip() and "weights_only" not in ln and not ln.strip().startswith("Check the doc")]
        what = detail[0].split(" Please use")[0].strip() if detail else ""
        return ("not a plain tensor file, refused by torch.load(weights_only=True)" + (f": {what}" if what else ""))[:300]
    rest = [ln.strip() for ln in lines[1:] if ln.strip()]
    if lines[0].rstrip().endswith(":") and rest:  # "Error(s) in loading state_dict for X:" + the first error
        return f"{lines[0].strip()} {rest[0]}"[:300]
    return lines[0][:300]


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str):
    """Re-raise any failure inside the block as a ``ValueError`` that names ``what`` and ``path``.

    Missing files (``FileNotFoundError``, whose messages already say where to get them) and missing
    packages (``ImportError``) pass through unchanged; a folder that diffusers or transformers find
    without weights (their ``OSError`` "no file named ...") becomes a ``FileNotFoundError`` saying
    so. Only the :func:`first_line` of the original message is kept.
    """
    try:
        yield
    except (FileNotFoundError, ImportError):
        raise
    except Exception as e:
        first = first_line(e)
        if isinstance(e, OSError) and "no file named" in first:  # diffusers' and transformers' missing weights
            raise FileNotFoundError(f"{what} {path} has no weights file: {first} Copy the model's weights "
                                    "there (.safetensors preferred), e.g. `huggingface-cli download <repo> "
                                    "--local-dir DIR` once, on a machine with internet access.") from e
        raise ValueError(f"cannot read {what} {path} ({type(e).__name__}: {first}); the file may be truncated "
                         "or not the expected model: download or rebuild it again") from e


def from_pretrained_complete(cls, folder: str | os.PathLike, what: str, **kwargs):
    """``cls.from_pretrained(folder, **kwargs)`` (a diffusers or transformers class) inside :func:`reading`,
    refusing weights that lack some of the model's tensors.

    Both libraries only log missing tensors and initialise them at random (or leave them on the meta device),
    so another model's file, or one with a tensor dropped, would otherwise load "fine". (Tensors of another
    shape are already an error in both.)
    """
    with reading(folder, what):
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
        missing = [str(k) for k in info.get("missing_keys") or ()]
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) of the model missing from its weights, e.g. {missing[:3]}")
    return model
