"""Test configuration: offline Hugging Face libraries and the repo root on ``sys.path``.

The environment variables are set at import time, before any test module imports transformers/diffusers.
"""

import os
import sys

# Set, not defaulted: an inherited HF_HUB_OFFLINE=0 must not let a test reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def single_thread_torch():
    """Run a module's torch work on one intra-op thread, restoring the previous setting afterwards.

    The test machine's cores are shared with long-running jobs; OpenMP spin-waiting with 2+ threads on
    busy cores makes tiny UNet forwards ~100x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread_torch")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; start and leave it fresh
    (what accelerate's own test cases do between tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
