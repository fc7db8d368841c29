"""The `mrcnn` command: one subcommand per job, each a function that takes the parsed arguments.

    mrcnn demo --output-dir runs/demo      # writes the demonstration figures and says where

A new command is one `add_<name>_command(subcommands)` function that adds its parser and sets
`run=<function>`, plus one line in `build_parser`. A mistake of the user (a bad argument, an
output path that cannot be written) prints one line and exits with status 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too
        raise UsageError(f"{message} (see {self.prog} --help)")


def output_directory(path: Path) -> Path:
    """Create `path` if needed; a `UsageError` if it is a file or cannot be created."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output-dir {path}: {error.strerror or error}") from None
    return path


def run_demo(args: argparse.Namespace) -> int:
    """Write the demonstration figures into `args.output_dir` and print their paths."""
    directory = output_directory(args.output_dir)
    from mrcnn.visualize import roi_align_figure  # imported late: matplotlib is slow to load

    path = directory / "roi_align.png"
    try:
        roi_align_figure().savefig(path, dpi=120)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
    print(f"RoIAlign figure (sampling points over a feature grid, RoIPool vs RoIAlign): {path}")
    return 0


def add_demo_command(subcommands) -> None:
    parser = subcommands.add_parser("demo", help="write the demonstration figures", description=run_demo.__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="where to write (created; default runs/demo)")
    parser.set_defaults(run=run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mrcnn", description="Mask R-CNN, read and run.")
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True, parser_class=_Parser)
    add_demo_command(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: `sys.argv[1:]`); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except UsageError as error:
        print(f"mrcnn: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # --help and --version end here
        return stop.code if isinstance(stop.code, int) else 0
