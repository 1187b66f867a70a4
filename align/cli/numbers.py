"""Argument types for numbers that have a range: argparse refuses a value outside it, naming the option
(`argument --seq-len: expected a whole number of at least 2, got 0`), before any work starts."""

from __future__ import annotations

import argparse
import math


def count(minimum: int = 1, maximum: int | None = None):
    """A whole number in [minimum, maximum]."""
    wanted = (
        f"a whole number of at least {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    parse.__name__ = "count"  # argparse names the type in its own messages
    return parse


def amount(
    minimum: float | None = None, maximum: float | None = None, above: float | None = None, below: float | None = None
):
    """A finite number with bounds: `minimum`/`maximum` included, `above`/`below` excluded."""
    bounds = []
    if minimum is not None:
        bounds.append(f"at least {minimum:g}")
    if above is not None:
        bounds.append(f"above {above:g}")
    if maximum is not None:
        bounds.append(f"at most {maximum:g}")
    if below is not None:
        bounds.append(f"below {below:g}")
    wanted = "a number" + (" " + " and ".join(bounds) if bounds else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (above is not None and value <= above)
            or (maximum is not None and value > maximum)
            or (below is not None and value >= below)
        ):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    parse.__name__ = "amount"
    return parse
