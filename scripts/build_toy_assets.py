"""Build the embedded toy world's models into assets/toy (deterministic, resumable).

    python scripts/build_toy_assets.py [--out-dir assets/toy] [--teacher-steps 9000] ...

Finished stages are skipped; an interrupted stage resumes from its last checkpoint in
--work-dir. Delete a stage's output folder to rebuild it. A finished stage, cache or checkpoint made
with other settings than the ones it depends on is refused with an error, not reused.
"""

import argparse
import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lcm_lab.toy.build import BuildConfig, build_all  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(BuildConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    cfg = BuildConfig(**vars(parser.parse_args()))
    manifest = build_all(cfg)
    print(json.dumps(manifest["last_run_seconds"], indent=2))


if __name__ == "__main__":
    main()
