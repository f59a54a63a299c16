"""LCD distillation under `accelerate launch`:

    accelerate launch scripts/train_lcd.py --config configs/toy/lcd.yaml [train.max_steps=200 ...]

The same run as `lcm-lab train lcd --config ...`; see `lcm_lab.training.lcd` for the config keys.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcm_lab.training import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("lcd", __doc__)
