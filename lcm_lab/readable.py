"""Clear errors for model files that exist but cannot be read (a truncated download, the wrong file)."""

from __future__ import annotations

import contextlib
import os


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters): torch's unpickling error goes on to
    suggest ``weights_only=False``, which is not the fix for a corrupt file."""
    return (str(error).strip().splitlines() or [""])[0][:300]


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
