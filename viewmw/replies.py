"""Redis reply values as text, whether the client decodes replies or hands over bytes."""

from __future__ import annotations


def text_of(value: object) -> str:
    """A reply value as text; a missing value (``None``) is the empty text."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
