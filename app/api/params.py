"""Query parameters, read strictly: a bad one is a 400 naming it, never a 500."""

from __future__ import annotations


def whole_number(raw: str | None, default: int, low: int, high: int) -> int | None:
    """``raw`` as a whole number from ``low`` to ``high`` (``default`` when absent); None when it is not
    one. ASCII digits only: str.isdigit() also takes '²', which int() refuses, and the length is
    bounded before int() reads a number of thousands of digits."""
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(high)):
        return None
    value = int(raw)
    return value if low <= value <= high else None
