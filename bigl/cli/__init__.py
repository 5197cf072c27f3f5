"""The ``bigl`` command line.

Each sub-command lives in its own module of this package with a ``register(subparsers)`` function
that adds its parser and sets ``func`` (a callable taking the parsed arguments and returning an exit
status). Heavy imports (torch) happen inside ``func`` so that ``bigl --help`` stays fast.
User errors (:class:`bigl.errors.BiGLError`) are printed with their fix and exit with status 2; so
is any ``OSError`` that escapes a command (a write the helpers of :mod:`bigl.files` did not cover),
worded by :func:`bigl.files.write_error`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bigl import __version__
from bigl.errors import BiGLError

#: Sub-command modules, in the order ``bigl --help`` lists them.
COMMANDS = ("segment", "train", "export", "evaluate", "score", "demo", "phantoms", "info")


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """--flip / --postprocess / --refine-edges / --invert-view / --contrast-search, shared by the commands that
    segment (default: the model's own setting)."""
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time flips: average each slice's prediction with its left-right mirror's "
                             "(default: as the model's metadata says, else off)")
    parser.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=None,
                        help="drop tumour specks under 10%% of the largest component and relabel an ET under 0.5 mL "
                             "as core (default: as the model's metadata says, else off)")
    parser.add_argument("--refine-edges", action=argparse.BooleanOptionalAction, default=None,
                        help="redraw the whole tumour's edge on the scan itself with a random walker, seeded by the "
                             "predicted tumour's interior and the brain beyond it; about 1-2 s more per scan "
                             "(default: as the model's metadata says, else off)")
    parser.add_argument("--invert-view", action=argparse.BooleanOptionalAction, default=None,
                        help="also average each slice's prediction with that of the slice with its brain intensities "
                             "mirrored, which looks like the source modality (default: as the model's metadata says, "
                             "else off)")
    parser.add_argument("--contrast-search", action=argparse.BooleanOptionalAction, default=None,
                        help="when the model is unsure of a scan (confidence below its floor), also segment it with "
                             "its brain intensities raised to the power 0.7 and 1.4 and keep the view the model is most "
                             "confident of; two or three more passes of the network on those scans only (default: as "
                             "the model's metadata says, else off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigl",
        description="Cross-modality brain tumour segmentation (BiGL domain adaptation).",
    )
    parser.add_argument("--version", action="version", version=f"bigl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"bigl.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bigl.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except BiGLError as exc:
        print(f"bigl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from bigl.files import write_error

        print(f"bigl {args.command}: error: {write_error(exc, known_write=False)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bigl {args.command}: interrupted", file=sys.stderr)
        return 130
