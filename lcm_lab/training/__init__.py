"""Training: one accelerate loop (:mod:`.trainer`) and per-method tasks (:mod:`.lcd`, :mod:`.rg_lcd`, ...).

:func:`run` is what ``lcm-lab train METHOD`` and ``scripts/train_<method>.py`` call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["METHODS", "USER_ERRORS", "load_method_config", "run", "script_main"]

# Errors whose message is written for the user (bad config or input, missing file or optional package, NaN):
# the command line prints them as one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, ImportError)


def _lcd():
    from .lcd import LCDRunConfig, train_lcd

    return LCDRunConfig, train_lcd


def _rg_lcd():
    from .rg_lcd import RGLCDRunConfig, train_rg_lcd

    return RGLCDRunConfig, train_rg_lcd


METHODS = {"lcd": _lcd, "rg_lcd": _rg_lcd}


def load_method_config(method: str, config: str | os.PathLike | None, overrides: Sequence[str] = ()):
    """The config dataclass of ``method`` from a YAML file plus ``key=value`` overrides."""
    from .config import load_config

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cls, _ = METHODS[method]()
    return load_config(cls, config, overrides)


def run(method: str, config: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Path:
    """Train ``method`` with a YAML config and overrides; returns the output folder."""
    cfg = load_method_config(method, config, overrides)
    _, train_fn = METHODS[method]()
    return train_fn(cfg)


def script_main(method: str, doc: str | None = None) -> None:
    """``scripts/train_<method>.py``: ``--config FILE`` plus ``section.key=value`` overrides."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args()
    try:
        out = run(method, args.config, args.overrides)
    except USER_ERRORS as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"done: {out}")
