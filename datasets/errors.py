"""Errors raised while locating or reading a dataset, with messages meant to be printed as-is."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be used as configured (missing path or file, foreign folder); one-line message."""


class UnreadableImageError(OSError):
    """An image file exists in the annotations but cannot be decoded; the message names the file."""
