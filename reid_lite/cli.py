"""What the command-line tools share: their argument parser's common arguments (`tool_parser`, `add_config_arg`,
`add_threads_arg`, `add_malloc_arg`, `add_opts_arg`, `set_threads`, `set_malloc`), which exceptions are a user's
mistake, how they are reported (one line on stderr, no traceback) and the exit codes.

    p = tool_parser(__doc__, summary=True)
    add_config_arg(p, aliases=True)
    add_opts_arg(p)
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_cfg(args.config or None, args.opts)
    except USER_ERRORS as err:
        return cli_error(err)
"""

from __future__ import annotations

import argparse
import sys

import torch

from .data.datasets import DatasetLayoutError
from .deploy.runtime import DeployError
from .utils.checkpoint_file import CheckpointError
from .utils.malloc import retain_freed_memory

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


#: The help of --config where the tool reads any config file.
CONFIG_HELP = "YAML config (a bare name is looked up in configs/)"
#: The help of the trailing overrides.
OPTS_HELP = "config overrides as KEY VALUE pairs"


def tool_parser(doc: str | None, summary: bool = False, epilog: bool = False) -> argparse.ArgumentParser:
    """A tool's parser, described by its module docstring `doc` as written (line breaks kept): all of it, or with
    `summary` its first paragraph only (`epilog`: then the whole docstring after the arguments)."""
    text = doc or ""
    return argparse.ArgumentParser(description=text.split("\n\n")[0] if summary else text,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=text if epilog else None)


def add_config_arg(p: argparse.ArgumentParser, default: str = "", help: str | None = CONFIG_HELP,
                   aliases: bool = False, required: bool = False) -> None:
    """--config (`aliases`: also --config_file, the official TransReID spelling), into `args.config`."""
    names = ("--config", "--config_file") if aliases else ("--config",)
    if required:
        p.add_argument(*names, dest="config", required=True, help=help)
    else:
        p.add_argument(*names, dest="config", default=default, help=help)


def add_threads_arg(p: argparse.ArgumentParser, default: int | None = 0,
                    help: str = "CPU threads for torch (default: torch's choice)") -> None:
    """--threads N (0 or None: leave the count to the library); apply it with `set_threads`."""
    p.add_argument("--threads", type=int, default=default, help=help)


def add_malloc_arg(p: argparse.ArgumentParser) -> None:
    """--system-malloc: keep glibc's default of returning freed buffers to the OS; apply with `set_malloc`."""
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc as it is (default: the process keeps freed tensor buffers for reuse, "
                        "which spares each CPU forward pass its page faults; reid_lite.utils.malloc)")


def set_malloc(system: bool) -> bool:
    """Keep freed memory in the process (`retain_freed_memory`) unless `system` (--system-malloc) is set;
    whether it is kept."""
    return not system and retain_freed_memory()


def add_opts_arg(p: argparse.ArgumentParser, help: str = OPTS_HELP, remainder: bool = False) -> None:
    """The trailing `KEY VALUE` config overrides, into `args.opts`. `remainder`: everything after the last
    option, unparsed (for `parse_args`); otherwise `nargs='*'`, for `parse_intermixed_args`, so that options may
    also follow the pairs."""
    p.add_argument("opts", nargs=argparse.REMAINDER if remainder else "*", help=help)


def set_threads(threads: int | None) -> None:
    """Set torch's CPU thread count to `threads` when it is positive (--threads); otherwise leave torch's."""
    if threads and threads > 0:
        torch.set_num_threads(threads)
