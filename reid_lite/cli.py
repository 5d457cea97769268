"""What the command-line tools share about errors: which exceptions are a user's mistake, how they are
reported (one line on stderr, no traceback) and the exit codes.

    try:
        cfg = load_cfg(args.config or None, args.opts)
    except USER_ERRORS as err:
        return cli_error(err)
"""

from __future__ import annotations

import sys

from .data.datasets import DatasetLayoutError
from .deploy.runtime import DeployError
from .utils.checkpoint_file import CheckpointError

#: Exit code of a run refused for bad input (argparse uses it too).
EXIT_USAGE = 2

#: Exceptions that mean bad input rather than a bug: config and override errors (yacs reports a type
#: mismatch with AssertionError and an unknown key with KeyError), missing files and datasets,
#: output paths that are files or unwritable, unreadable or
#: mismatched checkpoints, an exported model that does not fit its config (MODEL.BACKEND),
#: invalid settings.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError, DatasetLayoutError, DeployError, FileNotFoundError, FileExistsError, IsADirectoryError,
    NotADirectoryError, PermissionError, KeyError, ValueError, AssertionError,
)


def error_text(err: BaseException | str) -> str:
    """The message of a user error: KeyError's repr quotes are dropped, an empty message names the type."""
    if isinstance(err, str):
        return err
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text or type(err).__name__


def cli_error(err: BaseException | str) -> int:
    """Print `error: <message>` to stderr and return the exit code for bad input (2)."""
    print(f"error: {error_text(err)}", file=sys.stderr, flush=True)
    return EXIT_USAGE
