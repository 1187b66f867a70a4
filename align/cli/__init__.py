"""The `align` command: one module per command group, each only parsing arguments and calling the library.

Errors the library raises for bad input (a config key, a data line, a checkpoint file) carry their own location and
are printed as `error: …` with exit status 2, as is a path that cannot be read or written (missing, a folder, no
permission); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from align.cli import data, evaluate, label, model, runs, stages, tools
from align.core.config import ConfigError, relative_note

GROUPS = (model, stages, data, label, runs, evaluate, tools)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align", description="RLHF alignment workbench: the Qwen alignment pipeline as commands."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.register(sub)
    return parser


def venv_tools_first() -> None:
    """Inside a virtual environment that was not activated (`.venv/bin/align`), put its own tools first on PATH as
    activation would: DeepSpeed's and torch's C++ extensions are built with the `ninja` found there, and a build
    made by one ninja version is redone in full (half a minute) by another."""
    if sys.prefix == sys.base_prefix:
        return
    bindir = os.path.dirname(sys.executable)
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if not parts or parts[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])


def main(argv: list[str] | None = None) -> int:
    from align.core import distributed

    return distributed.leave(run(argv))


def run(argv: list[str] | None = None) -> int:
    from align.core.records import DataError
    from base_model import CheckpointError
    from base_model.tokenizer import TokenizerFileError
    from rm.tags.taxonomy import TaxonomyError

    venv_tools_first()
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # dotted key=value overrides may come anywhere on the line, also after options
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except (ConfigError, CheckpointError, TokenizerFileError, DataError, TaxonomyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # a path given on the command line (or in a config) that cannot be read or written as asked
        where = f"{e.filename}: " if e.filename is not None else ""
        note = relative_note(e.filename) if isinstance(e, FileNotFoundError) and e.filename is not None else ""
        print(f"error: {where}{(e.strerror or str(e)).lower()}{note}", file=sys.stderr)
        return 2
    return 0
