"""What the examples share: their common flags, and where their recurrent modules come from
(rnn_ext or torch.nn)."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn


def recurrent_modules(backend: str):
    """The namespace the recurrent modules come from: rnn_ext or torch.nn (same class names)."""
    if backend == "torch":
        return nn
    try:
        import rnn_ext
    except ModuleNotFoundError:  # run from a source checkout that was built but not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import rnn_ext
    return rnn_ext


def backend_description(backend: str) -> str:
    if backend == "torch":
        return "torch.nn"
    return f"rnn_ext ({recurrent_modules(backend).backend()} ops)"


class _HelpWithDefaults(argparse.HelpFormatter):
    """--help shows every option's default, also for options without a help text (argparse's
    ArgumentDefaultsHelpFormatter shows it only where there is one); a help text that already
    speaks of the default is left as it is."""

    def _format_action(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default is not argparse.SUPPRESS \
                and "default" not in text:
            action = copy.copy(action)
            action.help = f"{text} (default: %(default)s)".strip()
        return super()._format_action(action)


def example_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags every example takes: --backend, --device, --seed, --smoke."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpWithDefaults)
    parser.add_argument("--backend", choices=("rnn_ext", "torch"), default="rnn_ext",
                        help="where the recurrent modules come from")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (cuda when a GPU is available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes for a quick check (explicit flags still win)")
    return parser


def parse_with_smoke(parser: argparse.ArgumentParser, argv: list[str] | None,
                     smoke_defaults: dict) -> argparse.Namespace:
    """Parses argv; under --smoke, `smoke_defaults` replace the defaults (explicit flags win)."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke_defaults)
        args = parser.parse_args(argv)
    return args
