"""What the SQL stores' logic needs of a connection: the shape of Python's sqlite3 one."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection inside one of the store's transactions; SQL with ``?`` placeholders."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, seq: Any) -> Any: ...
