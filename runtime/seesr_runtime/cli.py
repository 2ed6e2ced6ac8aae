"""``seesr``: the runtime command line (torch-free)."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seesr", description="Run SeeSR from an exported bundle, without PyTorch.")
    parser.add_argument("--version", action="version", version=f"seesr-runtime {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("seesr: the runtime commands (upscale, bench) arrive with bundles; see README.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
