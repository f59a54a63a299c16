"""RG-LCD (reward-guided LCD) under `accelerate launch`:

    accelerate launch scripts/train_rg_lcd.py --config configs/toy/rg_lcd.yaml [train.max_steps=200 ...]

The same run as `lcm-lab train rg_lcd --config ...`; see `lcm_lab.training.rg_lcd` for the config keys.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcm_lab.training import run  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args()
    print(f"done: {run('rg_lcd', args.config, args.overrides)}")
