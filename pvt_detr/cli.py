"""Command-line plumbing shared by main.py, slurm/submit.py, `pvt_detr.predict` and `pvt_detr.export`: a parser
whose errors are one `error:` line with exit code 1 (the usage only with --help), and flag types that reject NaN,
inf and out-of-range values where they are parsed."""

from __future__ import annotations

import argparse
import math
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors print one line, `error: <message>`, and exit with code 1."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(1)


def number(kind: type = float, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: an int or a finite float within [low, high] (`*_open`: that end excluded)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def expand_path(text: str) -> str:
    """`~` and `$VARS` expanded, as a shell would (also for paths given in config files)."""
    return os.path.expandvars(os.path.expanduser(text)) if text else text
