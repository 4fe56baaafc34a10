"""A coordinator over a FakePort beside one plain DuckDB, fed the same statements.

`Pair.run(sql)` runs a statement on both and asserts the same outcome: the same error
message, or the same columns, DuckDB types, Arrow types and rows (as a multiset, or in
order when the statement's ORDER BY fixes it). After every statement it compares every
table's full contents — the fake cluster's stored partitions against DuckDB's table — as
multisets of DuckDB's text for each value (so -0.0, NaN, NULL, time zones and nested
values are told apart), checks the stored Arrow types are DuckDB's exact ones, and that
every stored row is in the partition its key maps to.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import duckdb
import pyarrow as pa

from cluster.sql_protocol import table_key
from query.coordinator import Coordinator, SqlError, StatementResult
from storage import ddl
from storage.placement import partition_expression
from tests.unit.query.fake_port import FakePort

TextRow = tuple[str | None, ...]


_ROW_VALUE = re.compile(r'(Duplicate key|duplicate key) "[^"]*"')


@contextmanager
def beside_duckdb(
    setup: Sequence[str],
) -> Iterator[tuple[Coordinator, FakePort, duckdb.DuckDBPyConnection]]:
    """A coordinator over a fake cluster and a plain DuckDB, both given `setup` (DuckDB
    without the partitioning clauses); closed on leaving."""
    port = FakePort()
    coordinator = Coordinator(port, rng=random.Random(0), sleep=lambda _seconds: None)
    reference = duckdb.connect()
    try:
        for statement in setup:
            coordinator.execute(statement)
            reference.execute(re.sub(r"PARTITION BY.*|REFERENCE", "", statement))
        yield coordinator, port, reference
    finally:
        coordinator.close()
        port.close()
        reference.close()


def same_error(ours: SqlError, theirs: duckdb.Error) -> bool:
    """The same DuckDB error class and message. Which row a duplicate-key error names
    depends on row order, which the cluster does not keep: that value is masked."""
    if getattr(ours, "duckdb_error", None) not in (None, type(theirs).__name__):
        return False
    if str(ours) == str(theirs):
        return True
    masked = [_ROW_VALUE.sub(r'\1 "…"', str(error)) for error in (ours, theirs)]
    return "uplicate key" in masked[0] and masked[0] == masked[1]


def sort_key(row: TextRow) -> tuple[tuple[bool, str], ...]:
    return tuple((value is None, value or "") for value in row)


class Pair:
    def __init__(self, members: tuple[int, ...] = (1, 2, 3), seed: int = 0) -> None:
        self.port = FakePort(members)
        self.coordinator = Coordinator(
            self.port, rng=random.Random(seed), sleep=lambda _seconds: None
        )
        self.reference = duckdb.connect(":memory:", config={"arrow_lossless_conversion": True})
        self.text = duckdb.connect(":memory:")

    @classmethod
    @contextmanager
    def loaded(cls, setup: Sequence[str]) -> Iterator[Pair]:
        """A pair that ran every statement of `setup` (compared), with the catalog's row
        estimates refreshed after them; closed on leaving."""
        pair = cls()
        try:
            for statement in setup:
                pair.run(statement)
            pair.port.catalog(refresh=True)
            yield pair
        finally:
            pair.close()

    def close(self) -> None:
        self.coordinator.close()
        self.port.close()
        self.reference.close()
        self.text.close()

    def run(
        self, sql: str, params: Any = None, *, ordered: bool = False, fails: bool | None = False
    ) -> StatementResult | None:
        """Run on both and compare. `fails`: DuckDB must succeed (False), must raise (True),
        or either (None)."""
        expected, expected_error = self._reference(sql, params)
        if fails is not None:
            assert (expected_error is not None) == fails, (sql, expected_error)
        scans, releases = len(self.port.scans), len(self.port.releases)
        ours: StatementResult | None = None
        error: SqlError | None = None
        try:
            ours = self.coordinator.execute(sql, params)
        except SqlError as caught:
            error = caught
        if expected_error is not None:
            assert error is not None, f"DuckDB raised {expected_error!r}; dcluster ran: {sql}"
            assert same_error(error, expected_error), (sql, str(error), str(expected_error))
        else:
            assert error is None, f"dcluster raised {error!r}; DuckDB ran: {sql}"
            assert ours is not None
            self.compare(ours, expected, ordered=ordered)
        scanned = {index for index, _ in self.port.scans[scans:]}
        assert scanned <= set(self.port.releases[releases:]), "every read is released"
        assert self.port.open_barriers() == []
        if not sql.lstrip().upper().startswith("SELECT"):
            self.check_tables()
        return ours

    def _reference(
        self, sql: str, params: Any
    ) -> tuple[tuple[list[str], pa.Table] | None, duckdb.Error | None]:
        try:
            text = ddl.parse(sql).sql
        except ddl.DdlError:
            text = sql
        try:
            relation = self.reference.sql(text, params=params)
            if relation is None:
                return None, None
            return ([str(t) for t in relation.types], relation.to_arrow_table()), None
        except duckdb.Error as error:
            return None, error

    def compare(
        self,
        ours: StatementResult,
        expected: tuple[list[str], pa.Table] | None,
        *,
        ordered: bool,
    ) -> None:
        if expected is None:
            assert ours.table is None
            return
        types, table = expected
        assert ours.table is not None
        assert ours.columns == table.column_names
        assert ours.types == types
        assert ours.table.schema.types == table.schema.types
        mine, theirs = self.text_rows(ours.table), self.text_rows(table)
        if not ordered:
            mine, theirs = sorted(mine, key=sort_key), sorted(theirs, key=sort_key)
        assert mine == theirs

    def text_rows(self, table: pa.Table) -> list[TextRow]:
        renamed = table.rename_columns([f"c{i}" for i in range(table.num_columns)])
        self.text.register("rows_as_text", renamed)
        try:
            casts = ", ".join(f"CAST(c{i} AS VARCHAR)" for i in range(table.num_columns))
            return [
                tuple(row) for row in self.text.sql(f"SELECT {casts} FROM rows_as_text").fetchall()
            ]
        finally:
            self.text.unregister("rows_as_text")

    def check_tables(self) -> None:
        names = self.reference.sql(
            "SELECT schema_name, table_name FROM duckdb_tables() ORDER BY ALL"
        ).fetchall()
        assert sorted(table_key(schema, name) for schema, name in names) == self.port.tables()
        for schema, name in names:
            key = table_key(schema, name)
            parts = self.port.partitions(key)
            stored = pa.concat_tables(parts)
            columns = ", ".join(ddl.quote_identifier(c) for c in stored.column_names)
            expected = self.reference.sql(
                f'SELECT {columns} FROM "{schema}"."{name}"'
            ).to_arrow_table()
            assert stored.schema.types == expected.schema.types, key
            mine = sorted(self.text_rows(stored), key=sort_key)
            assert mine == sorted(self.text_rows(expected), key=sort_key), key
            self.check_placement(key)

    def check_placement(self, key: str) -> None:
        """Every stored row is in the partition its key maps to."""
        parts = self.port.partitions(key)
        held = pa.concat_tables(
            [
                rows.append_column("held_in", pa.repeat(p, rows.num_rows).cast(pa.int32()))
                for p, rows in enumerate(parts)
            ]
        )
        self.text.register("placed_rows", held)
        try:
            expression = partition_expression(self.port.spec(key))
            misplaced = self.text.sql(
                f"SELECT count(*) FROM placed_rows WHERE held_in <> {expression}"
            ).fetchall()
        finally:
            self.text.unregister("placed_rows")
        assert misplaced == [(0,)], key

    def table_rows(self, key: str) -> list[TextRow]:
        return sorted(self.text_rows(pa.concat_tables(self.port.partitions(key))), key=sort_key)
