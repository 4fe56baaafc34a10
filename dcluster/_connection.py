"""`dcluster.connect` and the connection and relation objects, shaped like DuckDB's.

`Connection.sql` returns a `Relation` over the last statement's rows (DuckDB's
`DuckDBPyConnection.sql`); `Connection.execute` runs a statement and makes the connection
a cursor over its rows (`fetchone` advances, `fetchall` returns what is left), like
`DuckDBPyConnection.execute`. Rows are held by the client once the statement returns: a
relation here is a result, not a lazy query — calling `fetchall` twice does not run the
statement twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa

from query.coordinator import Coordinator, StatementResult, cluster_error
from query.port import ClusterPort, PortError


def connect(
    name_or_address: str | Path | None = None,
    *,
    consistency: str = "strong",
    data_dir: str | Path | None = None,
    port: ClusterPort | None = None,
) -> Connection:
    """A session with a cluster: by name (its run directory under `data_dir`, default the
    user's data dir) or run directory, or over a given `port` (tests, embedding).
    `consistency` is the session's default, 'strong' or 'stale'. A cluster that cannot be
    reached raises `dcluster.ClusterError`."""
    if port is not None:
        if name_or_address is not None or data_dir is not None:
            raise ValueError("give a cluster name or address, or a port, not both")
        return Connection(port, consistency=consistency, owns_port=False)
    if name_or_address is None:
        raise ValueError("connect() needs a cluster name or address")
    from cluster.session import open_port  # Lazily: importing dcluster needs no cluster.

    target = name_or_address
    if isinstance(target, str) and "/" in target:
        target = Path(target)  # a run directory, not a cluster name
    try:
        opened = open_port(target, data_dir=None if data_dir is None else Path(data_dir))
    except PortError as error:
        raise cluster_error(error) from error
    try:
        return Connection(opened, consistency=consistency, owns_port=True)
    except BaseException:
        opened.close()
        raise


class Relation:
    """The rows of one statement, DuckDB-relation-like."""

    def __init__(self, result: StatementResult) -> None:
        self._result = result

    @property
    def columns(self) -> list[str]:
        return self._result.columns

    @property
    def types(self) -> list[str]:
        return self._result.types

    @property
    def description(self) -> list[tuple[Any, ...]]:
        return _description(self._result)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._result.fetchall()

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._result.fetchone()

    def arrow(self) -> pa.Table:
        table = self._result.arrow()
        assert table is not None
        return table

    to_arrow_table = arrow

    def df(self) -> Any:
        return self._result.df()

    fetchdf = df

    def show(self) -> None:
        self._result.show()

    def __len__(self) -> int:
        return len(self._result)

    def __repr__(self) -> str:
        return f"<dcluster.Relation columns={self.columns} types={self.types} rows={len(self)}>"


class Connection:
    """A session: statements run one at a time, each atomic on its own. Not thread-safe."""

    def __init__(self, port: ClusterPort, *, consistency: str = "strong", owns_port: bool) -> None:
        self._port = port
        self._owns_port = owns_port
        self._coordinator: Coordinator | None = Coordinator(port, consistency=consistency)
        self._result: StatementResult | None = None
        self._position = 0

    # -- statements --------------------------------------------------------------------------

    def sql(
        self, query: str, *, params: object = None, consistency: str | None = None
    ) -> Relation | None:
        """Run every statement of `query`; a relation over the last one's rows (None when
        DuckDB returns no relation for it). `params` go to the last statement."""
        result = self._open().execute_script(query, params, consistency=consistency)
        return None if result.table is None else Relation(result)

    query = sql

    def execute(self, query: str, parameters: object = None) -> Connection:
        """Run `query` and make this connection a cursor over the last statement's rows."""
        self._result = self._open().execute_script(query, parameters)
        self._position = 0
        return self

    def executemany(self, query: str, parameters: Sequence[object]) -> Connection:
        for values in parameters:
            self.execute(query, values)
        return self

    # -- the cursor --------------------------------------------------------------------------

    @property
    def description(self) -> list[tuple[Any, ...]] | None:
        return None if self._result is None else _description(self._result)

    @property
    def rowcount(self) -> int:
        return -1 if self._result is None else self._result.rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self._take(1)
        return rows[0] if rows else None

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        return self._take(size)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._take(None)

    def arrow(self) -> pa.Table | None:
        """The rows not fetched yet, as DuckDB's Arrow."""
        rest = self._rest(None)
        return None if rest is None else rest.arrow()

    to_arrow_table = arrow

    def df(self) -> Any:
        rest = self._rest(None)
        return None if rest is None else rest.df()

    fetchdf = df

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._coordinator is None:
            return
        self._coordinator.close()
        self._coordinator = None
        self._result = None
        if self._owns_port:
            close = getattr(self._port, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self) -> Coordinator:
        if self._coordinator is None:
            raise RuntimeError("the connection is closed")
        return self._coordinator

    def _rest(self, size: int | None) -> StatementResult | None:
        if self._result is None:
            return None
        rest = self._result.slice(self._position, size)
        self._position += len(rest)
        return rest

    def _take(self, size: int | None) -> list[tuple[Any, ...]]:
        rest = self._rest(size)
        return [] if rest is None else rest.fetchall()


def _description(result: StatementResult) -> list[tuple[Any, ...]]:
    """DB-API description: (name, type, None, None, None, None, None) per column."""
    return [
        (name, type_name, None, None, None, None, None)
        for name, type_name in zip(result.columns, result.types, strict=True)
    ]
