"""LCD distillation under `accelerate launch`:

    accelerate launch scripts/train_lcd.py --config configs/toy/lcd.yaml [train.max_steps=200 ...]

The same run as `lcm-lab train lcd --config ...`; see `lcm_lab.training.lcd` for the config keys.
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
    print(f"done: {run('lcd', args.config, args.overrides)}")
