"""Which content ids the primary key of a mapped table can hold, and how they travel to SQL.

A content id is text (``"42"``, ``"-5"``, ``"0b8e…"``); a mapped table's key is a number, text or a
UUID. :class:`IdFormat` decides, in pure Python and on every tracked view, whether an id names a
row the column could hold at all, so a view that could never reach the database is refused at the
request instead of being counted and then dropped by the sync.

Each accepted id has exactly one spelling: integers in canonical decimal (``"7"``, never ``"07"``,
``"+7"`` or ``"-0"``), UUIDs in canonical lowercase text with hyphens. Two ids that name one row
would otherwise be two Redis counters for one database count.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import BigInteger, Column, Integer, SmallInteger, String, Uuid

from viewmw.errors import ConfigurationError

_DECIMAL = re.compile(r"-?[1-9][0-9]*|0")
# Bits of the signed integer each declared type holds. SQLite stores every INTEGER in 8 bytes,
# whatever the declared type, so there all integer columns hold 64 bits.
_INTEGER_BITS = ((SmallInteger, 16), (BigInteger, 64), (Integer, 32))

DbId = int | str | uuid.UUID
"""An id as the driver binds it for the column."""


@dataclass(frozen=True, slots=True)
class IdFormat:
    """The ids one primary key column holds.

    Attributes:
        kind: ``integer``, ``text`` or ``uuid``.
        sql_type: the PostgreSQL element type of an array of these ids (``bigint``, ``uuid``, …).
        low, high: the integer range (inclusive), for ``integer``.
        max_length: the longest text the column holds (``None``: no limit), for ``text``.
        as_uuid: whether the column binds :class:`uuid.UUID` objects (else canonical text).
    """

    kind: Literal["integer", "text", "uuid"]
    sql_type: str
    low: int = 0
    high: int = 0
    max_length: int | None = None
    as_uuid: bool = False

    @classmethod
    def of(cls, column: Column[Any], dialect: str, *, content_type: str = "") -> IdFormat:
        """The format of ``column`` on ``dialect`` (``postgresql`` or ``sqlite``).

        Raises:
            ConfigurationError: the column's type is not an integer, string or UUID type.
        """
        column_type = column.type
        if isinstance(column_type, Integer):
            bits = next(bits for kind, bits in _INTEGER_BITS if isinstance(column_type, kind))
            bits = 64 if dialect == "sqlite" else bits
            name = {16: "smallint", 32: "integer", 64: "bigint"}[bits]
            return cls("integer", name, low=-(2 ** (bits - 1)), high=2 ** (bits - 1) - 1)
        if isinstance(column_type, Uuid):
            return cls("uuid", "uuid", as_uuid=bool(column_type.as_uuid))
        if isinstance(column_type, String):
            return cls("text", "text", max_length=column_type.length)
        raise ConfigurationError(
            "content_tables",
            f"{content_type!r}: the primary key {column.table.name}.{column.name} is "
            f"{column_type!r}; viewmw maps integer, string and UUID keys",
        )

    def parse(self, content_id: str) -> DbId | None:
        """The id as the column binds it, or ``None`` if no row of the column can have it.

        ``content_id`` has passed :func:`viewmw.keys.validate_content_id` (1-64 ASCII letters,
        digits, ``-`` or ``_``).
        """
        if self.kind == "integer":
            if not _DECIMAL.fullmatch(content_id):
                return None
            value = int(content_id)
            return value if self.low <= value <= self.high else None
        if self.kind == "uuid":
            if len(content_id) != 36:
                return None
            try:
                value_uuid = uuid.UUID(content_id)
            except ValueError:
                return None
            if str(value_uuid) != content_id:
                return None  # upper case: the database would name the row in lower case
            return value_uuid if self.as_uuid else content_id
        if self.max_length is not None and len(content_id) > self.max_length:
            return None
        return content_id

    def text(self, value: object) -> str:
        """The content id of a value read back from the column (the inverse of :meth:`parse`).

        UUIDs come back as driver objects, or on SQLite as 32 hex digits: both are written in
        canonical form.
        """
        if self.kind == "uuid":
            return str(uuid.UUID(str(value)))
        if self.kind == "text":
            return str(value).rstrip(" ")  # CHAR(n) pads; ids never hold spaces
        return str(value)

    def sql_value(self, value: DbId) -> int | str:
        """``value`` for an array parameter of :attr:`sql_type` (text for UUIDs)."""
        return str(value) if isinstance(value, uuid.UUID) else value
