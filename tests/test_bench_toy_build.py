"""benchmarks/toy_build_rates.py: per-stage rates of a small build, projected onto the default build."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_projection_scales_each_stage_rate_by_the_default_build():
    spec = importlib.util.spec_from_file_location("toy_build_rates", ROOT / "benchmarks" / "toy_build_rates.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure({"vae": 3, "judge": 3, "reward": 3, "teacher": 3})
    full = result["full_build"]
    for stage in ("vae", "judge", "reward", "teacher"):
        rate = result["seconds_per_step"][stage]
        assert rate > 0
        steps = full[f"{stage}_steps"]
        # the report rounds minutes to 0.1 and the rate to 1e-4 s: the bound is those two roundings
        assert result["projected_minutes"][stage] == pytest.approx(rate * steps / 60, abs=0.05 + 5e-5 * steps / 60 + 1e-9)
    assert result["projected_minutes"]["data"] > 0 and result["projected_minutes"]["latents"] > 0
    assert result["projected_total_minutes"] == pytest.approx(sum(result["projected_minutes"].values()), abs=0.35)
