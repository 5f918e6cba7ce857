"""DeepSpeed entry script: one process per rank.

    deepspeed --num_gpus 2 launch/train.py --config logs/<name>/config.yaml [--resume latest]

`limoe train` prepares the run directory and prints this command; it can also
be run by hand with any config and the same override flags (the tokenizer
file must exist then: `limoe tokenizer train`, or let `limoe train` make it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`deepspeed launch/train.py`), Python puts launch/ first on the path,
    # where our module names (export, trainer...) could shadow others'. Put the
    # repository root there instead, which also works where the package is not installed.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv: list[str] | None = None) -> int:
    from launch.train_config import ConfigError, add_override_flags, check_files, load_config, overrides_from_args

    parser = argparse.ArgumentParser(description="LIMoE training rank (started by the deepspeed launcher).")
    parser.add_argument("--config", required=True, help="training config YAML (or a shipped name)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    add_override_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, overrides_from_args(args), fill_name=False)
        check_files(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from launch.trainer import train

    return train(config, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
