"""`align serve | agent`: argument parsing only; the handlers call `align.serve` and `align.tools.agent`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> None:
    from align.serve import serve

    serve(str(args.model), args.host, args.port, args.name)


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (chat with tools, completions, streaming)")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model name it answers to (default: the folder's name)")
    p.set_defaults(func=cmd_serve)
