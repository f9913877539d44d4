"""Argparse types shared by the command lines: checked numbers with clear errors."""

import argparse


def int_at_least(minimum, what):
    """An argparse type: an integer >= `minimum`, named `what` in errors."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "positive integer")
non_negative_int = int_at_least(0, "non-negative integer")


def number(text):
    """An argparse type: any float."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
