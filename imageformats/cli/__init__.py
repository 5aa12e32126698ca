"""The ``imageformats`` command: one module per subcommand, qemu-img conventions.

Each module in COMMAND_MODULES has ``register(subparsers)`` that adds its parser
with ``set_defaults(func=run)``; the command is named after its module (``_`` as
``-``: ``nbdkit_plugin`` is ``nbdkit-plugin``), so a command line imports only the
module of the command it runs.  User errors print one line on stderr and exit
with the error class's ``exit_code``; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import ImageFormatError

COMMAND_MODULES = [
    "imageformats.cli.info",
    "imageformats.cli.map",
    "imageformats.cli.cat",
    "imageformats.cli.convert",
    "imageformats.cli.luks",
    "imageformats.cli.create",
    "imageformats.cli.serve",
    "imageformats.cli.nbdkit_plugin",
]


def command_name(module: str) -> str:
    """The command a module of COMMAND_MODULES registers: ``imageformats.cli.nbdkit_plugin`` -> ``nbdkit-plugin``."""
    return module.rsplit(".", 1)[-1].replace("_", "-")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser.  Given the arguments, it holds only the command they name
    (start-up imports one command module, not all of them); otherwise, or when they name
    no known command (``--help``, a typo), every command."""
    parser = argparse.ArgumentParser(
        prog="imageformats",
        description="Disk-image format codecs as stackable block devices.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    wanted = [m for m in COMMAND_MODULES if command_name(m) == first] or COMMAND_MODULES
    for name in wanted:
        importlib.import_module(name).register(sub)
    return parser


def run_command(func, args, debug: bool = False) -> int:
    """Run a command function, mapping errors to one line and an exit code."""
    try:
        return func(args) or 0
    except ImageFormatError as exc:
        if debug:
            raise
        print(f"{_prog()}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # Reader went away (`imageformats cat x | head`): not an error of ours.
        try:
            sys.stdout = None  # keep the interpreter from flushing the dead pipe again
        except Exception:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"{_prog()}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{_prog()}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 10


def _prog() -> str:
    # "partial-deflate: error: ..." for the sibling console scripts; "python -m imageformats" -> imageformats
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "imageformats" if name in ("", "__main__.py", "-c") or name.endswith(".py") else name


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return run_command(args.func, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
