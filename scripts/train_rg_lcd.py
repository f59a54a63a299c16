"""RG-LCD (reward-guided LCD) under `accelerate launch`:

    accelerate launch scripts/train_rg_lcd.py --config configs/toy/rg_lcd.yaml [train.max_steps=200 ...]

The same run as `lcm-lab train rg_lcd --config ...`; see `lcm_lab.training.rg_lcd` for the config keys.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcm_lab.training import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("rg_lcd", __doc__)
