"""The SQL state machine: placement, versions, refusals, exactly-once, snapshots.

The machine must be a pure function of the command sequence: two workers applying the same
commands hold byte-identical snapshots and compute the same placement; a snapshot restored
mid-way applies the rest exactly as the machine that never stopped.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.sql_machine import SqlStateMachine, StagedRows
from cluster.sql_protocol import CommandKind, SqlCommand, StagedBatch, TableWrite
from storage.catalog import Catalog
from storage.partitions import AddColumn, CreateTable, DropTable

MEMBERS = (0, 1, 2)
CLIENT = 1 << 21


class Log:
    """Builds commands the way a coordinator would, against its own catalog."""

    def __init__(self) -> None:
        self.catalog = Catalog()
        self.request_id = 0

    def ddl(self, sql: str, **expected: object) -> SqlCommand:
        change = self.catalog.prepare(sql, len(MEMBERS))
        assert change is not None
        self.catalog.apply_ddl(change)
        return self._command(CommandKind.DDL, ddl=msgspec.msgpack.encode(change), **expected)

    def write(self, table: str, partitions: list[int], **expected: object) -> SqlCommand:
        batches = tuple(StagedBatch(f"s{self.request_id}-{p}", p, 3, 7, (0, 1)) for p in partitions)
        return self._command(CommandKind.WRITE, writes=(TableWrite(table, batches),), **expected)

    def barrier(self) -> SqlCommand:
        return self._command(CommandKind.BARRIER)

    def _command(self, kind: CommandKind, **fields: object) -> SqlCommand:
        self.request_id += 1
        return SqlCommand(CLIENT, self.request_id, kind, **fields)  # type: ignore[arg-type]


def test_create_table_places_partitions_and_gives_each_node_its_own() -> None:
    log = Log()
    create = log.ddl("CREATE TABLE t (id INTEGER, v VARCHAR) PARTITIONS 3 REPLICAS 2")
    machines = [SqlStateMachine(node) for node in MEMBERS]
    works = [machine.apply(1, create, MEMBERS) for machine in machines]
    assert all(work.result.ok for work in works)
    holders = machines[0].placements["main.t"]
    assert len(holders) == 3 and all(len(set(h)) == 2 for h in holders)
    for node, work in zip(MEMBERS, works, strict=True):
        created = [op for op in work.ops if isinstance(op, CreateTable)]
        assert sorted(op.partition for op in created) == [
            p for p, held_by in enumerate(holders) if node in held_by
        ]
        assert all(op.columns_sql.startswith("id INTEGER") for op in created)
    assert machines[0].versions == {"main.t": 1} == machines[0].schema_versions
    assert len({machine.snapshot() for machine in machines}) == 1


def test_a_write_touches_only_the_holders_of_its_partitions_and_moves_versions() -> None:
    log = Log()
    machine = SqlStateMachine(0)
    machine.apply(1, log.ddl("CREATE TABLE t (id INTEGER) PARTITIONS 3 REPLICAS 1"), MEMBERS)
    work = machine.apply(2, log.write("main.t", [0, 1, 2]), MEMBERS)
    assert work.result.ok
    held = [p for p, h in enumerate(machine.placements["main.t"]) if 0 in h]
    assert [op.partition for op in work.ops if isinstance(op, StagedRows)] == held
    assert machine.versions["main.t"] == 2 and machine.schema_versions["main.t"] == 1
    assert machine.partition_changed["main.t"] == [2, 2, 2]


def test_a_command_whose_expected_version_moved_is_refused_everywhere_alike() -> None:
    log = Log()
    machine = SqlStateMachine(1)
    machine.apply(1, log.ddl("CREATE TABLE t (id INTEGER)"), MEMBERS)
    machine.apply(2, log.write("main.t", [0]), MEMBERS)
    stale = machine.apply(3, log.write("main.t", [1], expected_versions=(("main.t", 1),)), MEMBERS)
    assert not stale.result.ok and stale.result.error_kind == "conflict" and not stale.ops
    old_schema = log.write("main.t", [1], expected_schemas=(("main.t", 2),))
    assert machine.apply(4, old_schema, MEMBERS).result.error_kind == "conflict"
    assert machine.versions["main.t"] == 2
    fresh = machine.apply(5, log.write("main.t", [1], expected_versions=(("main.t", 2),)), MEMBERS)
    assert fresh.result.ok


def test_a_retried_command_applies_once() -> None:
    log = Log()
    machine = SqlStateMachine(0)
    machine.apply(1, log.ddl("CREATE TABLE t (id INTEGER) REPLICAS 3"), MEMBERS)
    write = log.write("main.t", [0])
    first = machine.apply(2, write, MEMBERS)
    again = machine.apply(3, write, MEMBERS)
    assert first.ops and not first.duplicate
    assert again.duplicate and not again.ops and again.result == first.result
    assert machine.versions["main.t"] == 2


def test_drop_and_alter_become_store_work_for_holders_only() -> None:
    log = Log()
    holder, other = SqlStateMachine(0), SqlStateMachine(2)
    create = log.ddl("CREATE TABLE t (id INTEGER) PARTITIONS 1 REPLICAS 1")
    for machine in (holder, other):
        machine.apply(1, create, MEMBERS)
    alter = log.ddl("ALTER TABLE t ADD COLUMN note VARCHAR DEFAULT 'x'")
    drop = log.ddl("DROP TABLE t")
    assert holder.placements["main.t"] == ((0,),)
    altered = holder.apply(2, alter, MEMBERS)
    assert altered.ops == (AddColumn("main.t", "note VARCHAR DEFAULT 'x'"),)
    assert other.apply(2, alter, MEMBERS).ops == ()
    assert holder.apply(3, drop, MEMBERS).ops == (DropTable("main.t"),)
    assert other.apply(3, drop, MEMBERS).ops == ()
    assert holder.placements == {} and holder.catalog_version == 3


def test_a_ddl_that_no_longer_applies_is_refused_with_duckdbs_reason() -> None:
    log = Log()
    machine = SqlStateMachine(0)
    create = log.ddl("CREATE TABLE t (id INTEGER)")
    machine.apply(1, create, MEMBERS)
    again = SqlCommand(CLIENT, 99, CommandKind.DDL, ddl=create.ddl)
    refused = machine.apply(2, again, MEMBERS)
    assert not refused.result.ok and refused.result.error_kind == "catalog"
    assert "already exists" in (refused.result.error or "")
    assert machine.catalog_version == 1


def test_too_many_replicas_for_the_members_is_refused() -> None:
    log = Log()
    machine = SqlStateMachine(0)
    create = log.ddl("CREATE TABLE t (id INTEGER) REPLICAS 3")
    refused = machine.apply(1, create, (0, 1))
    assert refused.result.error_kind == "catalog" and machine.placements == {}
    assert machine.catalog.tables() == []


def test_a_barrier_is_store_work_with_no_operations() -> None:
    work = SqlStateMachine(0).apply(1, Log().barrier(), MEMBERS)
    assert work.barrier and work.result.ok and not work.ops


@st.composite
def command_sequences(draw: st.DrawFn) -> list[SqlCommand]:
    log = Log()
    commands: list[SqlCommand] = []
    tables: list[str] = []
    for step in range(draw(st.integers(1, 25))):
        choice = draw(st.sampled_from(["create", "write", "alter", "drop", "barrier", "stale"]))
        if choice == "create" or not tables:
            name = f"t{step}"
            partitions = draw(st.integers(1, 4))
            commands.append(log.ddl(f"CREATE TABLE {name} (id INTEGER) PARTITIONS {partitions}"))
            tables.append(name)
        elif choice == "write":
            table = draw(st.sampled_from(tables))
            count = log.catalog.table(table).partitions
            parts = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=3, unique=True))
            commands.append(log.write(f"main.{table}", parts))
        elif choice == "alter":
            table = draw(st.sampled_from(tables))
            commands.append(log.ddl(f"ALTER TABLE {table} ADD COLUMN c{step} INTEGER"))
        elif choice == "drop":
            table = draw(st.sampled_from(tables))
            commands.append(log.ddl(f"DROP TABLE {table}"))
            tables.remove(table)
        elif choice == "stale":
            table = draw(st.sampled_from(tables))
            commands.append(log.write(f"main.{table}", [0], expected_versions=((table, 0),)))
        else:
            commands.append(log.barrier())
    return commands


@settings(max_examples=40, deadline=None)
@given(commands=command_sequences(), cut=st.integers(0, 25))
def test_a_restored_snapshot_applies_the_rest_like_the_machine_that_never_stopped(
    commands: list[SqlCommand], cut: int
) -> None:
    cut = min(cut, len(commands))
    straight = SqlStateMachine(1)
    works = [straight.apply(i + 1, c, MEMBERS) for i, c in enumerate(commands)]
    first = SqlStateMachine(1)
    for i, command in enumerate(commands[:cut]):
        first.apply(i + 1, command, MEMBERS)
    restored = SqlStateMachine.restore(first.snapshot(), 1)
    rest = [restored.apply(i + 1, c, MEMBERS) for i, c in enumerate(commands) if i >= cut]
    assert rest == works[cut:]
    assert restored.snapshot() == straight.snapshot()
    other_node = SqlStateMachine(2)
    for i, command in enumerate(commands):
        other_node.apply(i + 1, command, MEMBERS)
    assert other_node.snapshot() == straight.snapshot()


@pytest.mark.parametrize("data", [b"", b"\x00garbage"])
def test_restore_of_empty_is_empty_and_of_garbage_fails_loudly(data: bytes) -> None:
    if not data:
        assert SqlStateMachine.restore(data, 0).placements == {}
        return
    with pytest.raises(msgspec.DecodeError):
        SqlStateMachine.restore(data, 0)
