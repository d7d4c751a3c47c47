"""Errors a user can cause: one line that names the input and the fix; and the ranges numbers must lie in."""

from __future__ import annotations

import math
from dataclasses import dataclass


class XlsubError(Exception):
    """Bad user input. Entry points print the message and exit non-zero, without a traceback."""


@dataclass(frozen=True)
class Range:
    """The numbers a parameter accepts: an interval such as `(0, 1]` or `[0, 2**32)`. NaN and +-inf lie
    outside every range. One Range is declared once (in a stage field's metadata, or beside the library
    function that needs it) and checked by everyone with the same message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""  # what the number is, for the message: "a fraction of heads"

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def check(self, name: str, value: object) -> None:
        """XlsubError naming `name` unless `value` lies in the range."""
        if value not in self:
            raise XlsubError(f"{name}: must be {self.meaning + ' ' if self.meaning else ''}in {self}, got {value}")


def _number(value: float) -> str:
    """2**32 rather than 4294967296; 1 rather than 1.0."""
    if float(value).is_integer():
        value = int(value)
        if value >= 2**16 and value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
    return str(value)
