"""How a `limoe` command reports an error that is the user's to fix: `error: <message>` on one line
of stderr, no traceback, and an exit code that says which kind of error it is, whichever command
met it:

2  the input is not what the command takes: a bad value, file format, data layout or prompt file
   (ValueError: DataLayoutError, PromptError, ...), or a --model folder that is not a limoe export
   (ExportError); the code argparse and training config errors exit with too.
1  the command could not finish with the input given: a file or shard that is not there
   (FileNotFoundError), or something outside the arguments failed (RuntimeError: npm missing or
   offline, no readable samples, ...).
"""
from __future__ import annotations

import functools
import sys

from .checkpoint import ExportError

BAD_INPUT, FAILED = 2, 1
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


def exit_code(error: BaseException) -> int:
    return BAD_INPUT if isinstance(error, (ValueError, ExportError)) else FAILED


def user_errors(run):
    """Decorate a command's `run(args) -> exit code`: USER_ERRORS become one line and their exit code."""

    @functools.wraps(run)
    def wrapper(args):
        try:
            return run(args)
        except USER_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_code(error)

    return wrapper
