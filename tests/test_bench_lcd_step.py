"""benchmarks/lcd_step_speed.py: lcm_lab's LCD step and the diffusers-script formulation compute the same update.

Toy scale, batch 4: from identical weights (separate copies: ours channels-last, the reference NCHW) and
identical draws, one full step of each (loss, backward, clipping, AdamW, target EMA) gives the same
clipped gradients up to float rounding and the same students, except for the few weights whose gradient
is near AdamW's eps (there a rounding-level change of the gradient moves the first update by up to
2 * lr; see check_one_step). The reference runs the teacher twice per step (batch B) and keeps NCHW
weights; ours runs it once on 2B with channels-last weights and fused AdamW. The CLI times both variants
in subprocesses and writes a JSON.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread_torch")

ROOT = Path(__file__).resolve().parents[1]


def _load_module():
    spec = importlib.util.spec_from_file_location("lcd_step_speed", ROOT / "benchmarks" / "lcd_step_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_module()


def test_one_step_same_update():
    ours, ref = bench.make_pair("toy", batch_size=4, seed=0)
    check = bench.check_one_step(ours, ref, seed=0, keep_grads=True)
    lr = ours.s.loop.learning_rate
    assert check["max_abs_update"] > 0.5 * lr  # the step moved the weights (AdamW's first update ~ lr)
    # away from AdamW's eps the students (and targets) agree to float rounding ...
    assert check["max_abs_diff_student_grad_gt_1e-6"] < 1e-5
    assert check["max_abs_diff_target_grad_gt_1e-6"] < 1e-5
    # ... and the few weights with |g| ~ eps differ by at most a sign flip of lr * g / (|g| + eps)
    assert check["max_abs_diff_student"] <= 2.05 * lr
    assert check["n_student_elements_differ_gt_1e-6"] < 1e-3 * check["n_elements"]
    assert check["abs_diff_loss"] <= 1e-5 * max(1.0, abs(check["loss_ours"]))
    # the clipped gradients the two optimizers received (channels-last vs NCHW rounding, amplified by Huber's 1/c)
    atol = 1e-4 * check["max_abs_grad"]
    for g_ours, g_ref in zip(check["grads"]["ours"], check["grads"]["reference"], strict=True):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=atol)


def test_variant_setups():
    ours, ref = bench.make_pair("toy", batch_size=4, seed=0)
    for net in ("teacher", "student", "target"):  # the trainer's default layout: only the frozen nets channels-last
        assert getattr(ours.s, net).conv_in.weight.is_contiguous(
            memory_format=torch.channels_last if net != "student" else torch.contiguous_format)
        assert getattr(ref.s, net).conv_in.weight.is_contiguous()
        assert getattr(ours.s, net) is not getattr(ref.s, net)
    assert ours.optimizer.defaults.get("fused") is True
    assert not ref.optimizer.defaults.get("fused") and not ref.optimizer.defaults.get("foreach")
    calls = {"teacher": [], "text": 0}

    def on_teacher(module, args, kwargs):
        calls["teacher"].append(args[0].shape[0])

    def on_text(module, args):
        calls["text"] += 1

    hooks = [ref.s.teacher.register_forward_pre_hook(on_teacher, with_kwargs=True),
             ours.s.teacher.register_forward_pre_hook(on_teacher, with_kwargs=True),
             ref.s.text_encoder.register_forward_pre_hook(on_text)]  # shared by both
    try:
        ref(torch.Generator().manual_seed(0))
        assert calls == {"teacher": [4, 4], "text": 0}  # uncond encoded once, before the loop
        calls.update(teacher=[])
        ours(torch.Generator().manual_seed(0))
        assert calls == {"teacher": [8], "text": 0}
    finally:
        for h in hooks:
            h.remove()


def test_cli_subprocess_json(tmp_path):
    out = tmp_path / "r.json"
    result = bench.main(["--scale", "toy", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--rounds", "1",
                         "--threads", "1", "--no-check", "--quiet", "--out", str(out)])
    data = json.loads(out.read_text())
    assert [run["variant"] for run in data["runs"]] == ["ours", "reference"]
    for variant in ("ours", "reference"):
        assert len(data["times"][variant]) == 1 and data["times"][variant][0] > 0
        assert data["row"][f"{variant}_s_per_step"] > 0 and data["row"][f"{variant}_peak_rss_mib"] > 0
        assert data["phase_median_seconds"][variant]["backward"] > 0
    row = data["row"]
    assert row["batch_size"] == 2 and row["latent_size"] == 8 and row["speed_up"] > 0
    assert data["check"] is None and row["max_abs_diff_student"] is None
    assert data["settings"]["ours_channels_last"] == {"teacher": True, "student": False, "target": True}
    assert not any(data["settings"]["reference_channels_last"].values())
    assert "channels-last: ours teacher + target, reference none" in result["markdown"]
    assert row["speed_up_per_round"] == pytest.approx([row["speed_up"]])  # one round: its medians are the overall ones
    assert "| toy | 2 | 8x8 |" in result["markdown"]
    assert data["machine"]["torch"] == torch.__version__


def test_round_speed_ups_pair_each_rounds_own_medians():
    runs = [{"round": 0, "variant": "ours", "median_s_per_step": 0.5},
            {"round": 0, "variant": "reference", "median_s_per_step": 0.6},
            {"round": 1, "variant": "reference", "median_s_per_step": 0.9},
            {"round": 1, "variant": "ours", "median_s_per_step": 0.6}]
    assert bench.round_speed_ups(runs) == pytest.approx([1.2, 1.5])
