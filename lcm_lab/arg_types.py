"""argparse ``type`` functions shared by the ``lcm-lab`` sub-commands: each turns one argument's text into a
checked value or raises ``argparse.ArgumentTypeError`` (argparse then prints the usage and the reason)."""

from __future__ import annotations

import argparse

# Seeds seed per-image torch.Generators (int64): the one range for the CLI and lcm_lab.generation. This module
# imports nothing heavy, so the parsers stay cheap to build.
MAX_SEED = 2**63


def int_list(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. ``--steps 1,2,4``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _int_in(low: int, high: int | None, what: str):
    """An argparse ``type``: an integer in [low, high) (no upper bound for ``high=None``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return value
    return parse


seed_arg = _int_in(0, MAX_SEED, "a seed must be in [0, 2**63)")
positive_int = _int_in(1, None, "expected a positive integer")
non_negative_int = _int_in(0, None, "expected an integer >= 0")


def device_arg(text: str) -> str:
    """An argparse ``type``: a torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA GPU on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"device type {device.type!r} is not supported; use cpu, cuda or mps")
    return text


def str_list(text: str) -> list[str]:
    """A non-empty comma-separated list of names (blanks dropped)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values
