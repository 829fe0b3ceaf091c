"""The ``attnflow`` command: one sub-command per module ``attnflow/cli/<name>_cmd.py``.

Each sub-command module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=run`` on it, where ``run(args) -> int`` returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from ..errors import AttnflowError

COMMANDS: tuple[str, ...] = ("stats", "models", "data", "plot", "maps", "run", "demo", "probe", "table", "aggregate",
                             "localize")
"""Sub-commands in the order ``attnflow --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="attnflow",
        description="Information flow through ViT self-attention and selective token aggregation "
                    "(Beyond [cls]).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=version_line(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"{__name__}.{name}_cmd"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).add_parser(sub)
    return parser


def version_line() -> str:
    """``attnflow <version>``, from ``attnflow.__version__`` (the code that runs; ``pyproject.toml`` holds the same
    number, which a test checks)."""
    from .. import __version__

    return f"attnflow {__version__}"


def _asks_version(argv: list[str]) -> bool:
    """Whether the options before the sub-command include ``--version`` (answered before any sub-command module,
    some of which import torch, is loaded)."""
    for arg in argv:
        if arg == "--version":
            return True
        if not arg.startswith("-"):  # the sub-command: what follows is its own
            return False
    return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m attnflow``; returns the exit code."""
    if _asks_version(sys.argv[1:] if argv is None else list(argv)):
        print(version_line())
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .common import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # a cluster's time limit ends a command as Ctrl-C does: state saved, exit 130
            return int(args.func(args) or 0)
    except AttnflowError as err:
        print(f"attnflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine's answer (a full disk, a folder without write permission): one line
        if args.verbose:
            raise
        print(f"attnflow {args.command}: error: {_os_error(err)}", file=sys.stderr)
        return 2 if isinstance(err, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)) else 1


def _os_error(err: OSError) -> str:
    """``cannot write /x/y: Permission denied`` from an OSError."""
    where = f" {err.filename}" if err.filename else ""
    return f"cannot use{where}: {err.strerror or err}"


def _quiet_logging(verbose: bool) -> None:
    """INFO lines of attnflow; torch's compile-time chatter (no CUDA runtime on a CPU machine, deprecations inside
    inductor) only with ``--verbose``."""
    import warnings

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("torch").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
