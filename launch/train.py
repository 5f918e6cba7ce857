"""DeepSpeed entry script: one process per rank.

    deepspeed --num_gpus 2 launch/train.py --config logs/<name>/config.yaml [--resume latest]

`limoe train` prepares the run directory and prints this command; it can also
be run by hand with any config and the same override flags (the tokenizer
file must exist then: `limoe tokenizer train`, or let `limoe train` make it).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

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

    try:
        code = train(config, resume=args.resume)
    except BaseException as error:  # noqa: B902 (every way out ends the job here)
        end_rank(error)
    # A finished rank (its work on disk, its own messages logged) ends through os._exit too: the
    # interpreter's teardown once aborted a finished CPU rank ("terminate called without an active
    # exception", exit -6) while native threads were destroyed, failing a job that had succeeded.
    exit_rank(code)


def end_rank(error: BaseException) -> NoReturn:
    """Report a rank's fatal error and end the process now, so the whole job ends within seconds.

    A normal exit after an exception can hang for ever: multiprocessing's atexit hook joins the
    DataLoader workers, which ignore SIGTERM (they are started with it blocked, see
    trainer.data_batches), and the rank's own SIGINT/SIGTERM handler only asks a training loop
    that is no longer running to stop. os._exit skips all of that: the workers see their parent
    gone and exit, and the deepspeed launcher stops the other ranks once this one exits non-zero
    (a rank waiting for this one in a collective fails there and ends here too).
    """
    import logging

    rank = os.environ.get("RANK", "?")
    if isinstance(error, SystemExit) and (error.code is None or isinstance(error.code, int)):
        code, summary = error.code or 0, f"exit code {error.code}"
    elif isinstance(error, SystemExit):  # SystemExit("error: ..."), the trainer's checks
        code, summary = 1, str(error.code).removeprefix("error: ")
    elif isinstance(error, KeyboardInterrupt):  # before the trainer's own handler was installed
        code, summary = 130, "interrupted"
    else:
        traceback.print_exception(error)
        code, summary = 1, one_line(error)
    if code:
        train_log = logging.getLogger("limoe.train")
        if train_log.handlers:  # rank 0's out.log, once the trainer has set it up
            train_log.error("fatal error, ending the job: %s", summary)
        print(f"error: rank {rank}: {summary}", file=sys.stderr)
    exit_rank(code)


def exit_rank(code: int) -> NoReturn:
    """End this rank's process now with `code`: remove its shared-memory buffers, flush the logs
    and the standard streams, then os._exit (no atexit hooks, no interpreter teardown)."""
    import logging

    rank = os.environ.get("RANK", "?")
    try:
        from launch.deepspeed_compat import remove_shm_buffers

        if "MASTER_PORT" in os.environ and rank.isdigit():  # the atexit hook that would do it is skipped
            remove_shm_buffers(os.environ["MASTER_PORT"], int(rank))
    finally:
        logging.shutdown()  # flush and close the log files (an atexit hook os._exit skips)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def one_line(error: BaseException) -> str:
    """`Type: message` on one line; for an error re-raised from a DataLoader worker (whose message
    is the worker's whole traceback), the worker's own last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if "Original Traceback (most recent call last):" in lines:
        return f"in a DataLoader worker: {lines[-1].strip()}"
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


if __name__ == "__main__":
    sys.exit(main())
