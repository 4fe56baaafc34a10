"""What SQL clients and workers say to each other, and the SQL commands of the cluster log.

The client is the statement's coordinator (see query/coordinator.py): it binds the
statement against its copy of the shadow catalog, reads what it needs at a read barrier,
runs the statement in its own DuckDB, stages the rows that change on every holder of each
partition, and appends ONE `SqlCommand` to the cluster log through the leader. Workers
apply the command in log order; each changes only the partitions it holds.

Log entries: an SQL entry's data is `SQL_ENTRY_MARK` followed by the msgpack `SqlCommand`.
0xc1 is the one byte msgpack never uses, so an SQL entry can never be mistaken for a
key-value command (whose data is a msgpack array).

Messages (client -> worker unless said otherwise; every request carries `request_id`):

- `SqlRequest(command)` -> `SqlResponse`: the leader appends the command and answers once
  it is applied there (others answer 'not leader' with a hint).
- `CatalogRequest` -> `CatalogResponse`: the worker's applied catalog, placements and
  table versions, and an estimate of each table's rows (from its own partitions).
- bulk `StageHeader` + rows -> `StageAck`: the holder wrote the rows to its staging area
  and fsynced them; only then is the ack sent.
- `ScanRequest` -> bulk `ScanHeader` + rows, or `ScanError`: one partition's rows at the
  read barrier `index` (0: what is applied now, the 'stale' consistency).
- `FragmentRequest` -> bulk `FragmentHeader` + rows, or `ScanError`: the rows of one
  read-only SELECT over the physical partition tables `reads` names, run inside the
  snapshot of barrier `index` (0: what is applied now). A `ScanError` with `duckdb_error`
  set (and `retryable` False) means DuckDB refused the SQL: every holder would. Not
  retryable either, with `duckdb_error` empty: SQL that is not exactly one SELECT, that
  names a file or URL (workers' DuckDB has external access off), or that ran past the
  worker's fragment time limit and was interrupted (`DCLUSTER_FRAGMENT_TIME_LIMIT_MS`).
  A fragment may carry named Arrow tables (`inputs`, each one Arrow IPC stream) that its
  SQL reads by name; inputs with a name not matching `FRAGMENT_INPUT_NAME`, a name twice,
  bytes that are not exactly one intact stream, or more than `FRAGMENT_INPUTS_BYTES_MAX`
  bytes in all are refused (not retryable) before any SQL runs.
- `OpenRead(reader, at_least, linearize)` -> `ReadOpened`, or `ScanError`: a read point
  without a log entry. The worker waits until it has applied `at_least` (and, with
  `linearize`, a ReadIndex point confirmed by the leader's quorum), then opens (or joins)
  the snapshot of its state as of `state_index`: the last entry that changed the SQL state
  (a write or a DDL, wherever its partitions are), the same index on every worker for the
  same state. Reads at that index then use it like a barrier's. The client checks that
  every worker named the same state and that every worker's applied index covers the
  ReadIndex point (see `cluster.session.TransportPort.open_read`).
- `ReleaseRead(index, reader)`: the client is done with the barrier's snapshots (they also
  expire); `reader` names the `OpenRead` hold it drops (0: a log barrier's snapshot).
- worker -> worker `FetchStage` -> bulk `StageHeader` + rows, or `StageAck(ok=False)`: a
  holder that missed a staged batch fetches it from another holder before applying.

Invariant: a command names every staged batch by id, row count and checksum; a worker
applies a batch only if its copy matches both.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

import msgspec
import pyarrow as pa

from cluster.protocol import Address
from ipc.codec import FRAME_BYTES_MAX_DEFAULT

SQL_ENTRY_MARK = b"\xc1"
"""First byte of every SQL log entry (never the first byte of valid msgpack)."""
STATEMENT_TEXT_CHARS_MAX = 200
"""Statement text kept in a command (for logs); longer statements are cut."""
FRAGMENT_INPUT_NAME = re.compile(r"dcluster_(?:keys|rows)_[0-9]+", re.ASCII)
"""What a fragment input's name must match, whole: a plain lower-case identifier, needing
no quotes, that no partition table (`<table>__p<n>`) can be."""
FRAGMENT_INPUTS_BYTES_MAX = FRAME_BYTES_MAX_DEFAULT - (8 << 20)
"""The encoded inputs of one fragment, all together. A `FragmentRequest` is one control
frame (at most FRAME_BYTES_MAX_DEFAULT): this leaves room for the SQL (at most
`cluster._applier.FRAGMENT_SQL_CHARS_MAX` characters) and the envelope."""
_IPC_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
"""The marker an Arrow IPC stream writer ends every stream with."""


class CommandKind(enum.IntEnum):
    DDL = 0
    """A catalog change (`ddl`), maybe with rows (`writes`, CREATE TABLE … AS)."""
    WRITE = 1
    """Rows deleted and inserted (`writes`), one statement, atomic."""
    BARRIER = 2
    """A read barrier: every worker opens a snapshot of its partitions when it applies it."""


class StagedBatch(msgspec.Struct, frozen=True, array_like=True):
    """Rows staged on the holders of one partition, named by the commit record."""

    stage_id: str
    partition: int
    rows: int
    crc: int
    """CRC32 of the staged file's bytes (every holder writes the same bytes)."""
    holders: tuple[int, ...]
    """Node numbers that acknowledged a durable copy; a holder without one fetches it."""
    delete: bool = False
    """True: delete every row equal (IS NOT DISTINCT FROM, all columns) to one of these
    rows. False: insert these rows."""


class TableWrite(msgspec.Struct, frozen=True, array_like=True):
    table: str
    """The table key, `schema.name` in lower case (see `table_key`)."""
    batches: tuple[StagedBatch, ...]
    """Applied in order; the coordinator lists a partition's deletes before its inserts."""


class SqlCommand(msgspec.Struct, frozen=True, array_like=True):
    client_id: int
    request_id: int
    kind: CommandKind
    ddl: bytes | None = None
    """DDL: the msgpack of a `storage.catalog.Ddl` change."""
    writes: tuple[TableWrite, ...] = ()
    expected_versions: tuple[tuple[str, int], ...] = ()
    """(table key, version) pairs that must still hold when the command is applied: the
    tables the statement read. Otherwise the command is refused as a conflict, everywhere."""
    expected_schemas: tuple[tuple[str, int], ...] = ()
    """(table key, schema version) that must still hold: the tables written without being
    read (their rows were shaped by that schema)."""
    text: str = ""


class SqlResult(msgspec.Struct, frozen=True, array_like=True):
    """What applying one command did, the same on every worker."""

    ok: bool
    error: str | None = None
    error_kind: str | None = None
    """'conflict' (a version moved: plan again), 'catalog' (a DDL no longer applies; the
    message is DuckDB's), 'refused' (malformed or expired command)."""


class SqlRequest(msgspec.Struct, frozen=True):
    request_id: int
    command: bytes
    """msgpack of a `SqlCommand` whose client_id/request_id are the sender's."""
    reply_address: Address | None = None


class SqlResponse(msgspec.Struct, frozen=True):
    request_id: int
    ok: bool
    index: int = 0
    """The log index the command was applied at."""
    error: str | None = None
    error_kind: str | None = None
    versions: tuple[tuple[str, int], ...] = ()
    """BARRIER: every table's version at `index`."""
    catalog_version: int = 0
    """The index of the last DDL applied at or before `index`."""
    leader_hint: int | None = None
    retryable: bool = False


class CatalogRequest(msgspec.Struct, frozen=True):
    request_id: int
    reply_address: Address | None = None


class CatalogResponse(msgspec.Struct, frozen=True):
    request_id: int
    ok: bool
    index: int = 0
    """The applied index the catalog is at."""
    catalog_version: int = 0
    catalog: bytes = b""
    """`storage.catalog.Catalog.snapshot()`."""
    placements: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()
    """(table key, holders of each partition, primary first)."""
    versions: tuple[tuple[str, int], ...] = ()
    schema_versions: tuple[tuple[str, int], ...] = ()
    members: tuple[int, ...] = ()
    """Node numbers of every member (voters and learners) at `index`."""
    error: str | None = None
    table_rows: tuple[tuple[str, int], ...] = ()
    """(table key, estimated rows): the answering worker's row counts of the partitions it
    holds, scaled to the table's partition count; tables it holds nothing of are left out.
    Refreshed some time after writes, so possibly stale."""


class StageHeader(msgspec.Struct, frozen=True):
    """Header of a bulk transfer of staged rows (client -> holder, or holder -> holder in
    answer to `FetchStage`)."""

    request_id: int
    stage_id: str
    table: str
    partition: int
    reply_address: Address | None = None
    forward_to: tuple[int, ...] = ()
    """Node numbers the receiver passes the rows on to (the partition's other holders), so
    the sender ships them once; its ack then lists every holder that stored them."""


class StageAck(msgspec.Struct, frozen=True):
    request_id: int
    stage_id: str
    ok: bool
    rows: int = 0
    crc: int = 0
    error: str | None = None
    retryable: bool = False
    holders: tuple[int, ...] = ()
    """Node numbers holding a durable copy: the receiver and those it forwarded to."""


class FetchStage(msgspec.Struct, frozen=True):
    request_id: int
    stage_id: str
    table: str
    partition: int
    rows: int
    crc: int


class ScanRequest(msgspec.Struct, frozen=True):
    request_id: int
    index: int
    """The read barrier's log index; 0 reads what is applied now (stale)."""
    table: str
    partition: int
    columns: tuple[str, ...] | None = None
    """Only these columns (None: all)."""
    reply_address: Address | None = None


class ScanHeader(msgspec.Struct, frozen=True):
    request_id: int
    table: str
    partition: int
    index: int
    """The barrier index the rows were read at (or the applied index, for stale)."""


class ScanError(msgspec.Struct, frozen=True):
    """A scan or fragment this node did not answer with rows."""

    request_id: int
    error: str
    retryable: bool = True
    """True: another holder (or a new barrier) may serve it."""
    duckdb_error: str = ""
    """Fragments: DuckDB's exception class name when DuckDB refused the SQL itself (then
    `error` is DuckDB's message unchanged and `retryable` is False)."""
    snapshot_missing: bool = False
    """This node holds no snapshot at the read's index (never opened here: it did not
    answer the read point in time and has moved past it; or closed): a read at a new
    point may be served here."""


class FragmentRequest(msgspec.Struct, frozen=True):
    request_id: int
    index: int
    """The read barrier's log index; 0 runs on what is applied now (stale)."""
    sql: str
    """Exactly one SELECT statement over physical partition tables (see
    `storage.partitions.partition_table_sql`); anything else is refused."""
    reads: tuple[tuple[str, int], ...]
    """Every (table key, partition) the SQL reads: each must be held here."""
    reply_address: Address | None = None
    inputs: tuple[tuple[str, bytes], ...] = ()
    """(name, Arrow IPC stream) pairs: tables the SQL may read by those names, registered
    on the snapshot's cursor only while it runs (see `encode_fragment_input`,
    `decode_fragment_inputs`)."""
    explain: bool = False
    """Plan the SELECT, do not run it: the answer is DuckDB's `EXPLAIN (FORMAT json)` of
    it in that snapshot (columns explain_key, explain_value), whose operators carry the
    optimizer's estimated cardinality from the partitions' own statistics."""


class FragmentHeader(msgspec.Struct, frozen=True):
    """Header of a fragment's rows (worker -> client)."""

    request_id: int
    index: int
    """The barrier index the fragment ran at (or the applied index, for stale)."""
    elapsed_us: int = 0
    """Microseconds on the node from the read's start (its turn in the scan lane, the
    snapshot, the SQL) until its rows were in hand; not the sending (EXPLAIN ANALYZE)."""


class OpenRead(msgspec.Struct, frozen=True):
    request_id: int
    reader: int
    """Who holds the snapshot until `ReleaseRead(index, reader)` (unique per read)."""
    at_least: int
    """Open only once this node has applied this index (the client's own writes)."""
    linearize: bool
    """Also wait for a ReadIndex point of the leader (asked by this node) to be applied."""
    reply_address: Address | None = None


class ReadOpened(msgspec.Struct, frozen=True):
    request_id: int
    state_index: int
    """The snapshot's key: the last index whose entry changed the SQL state."""
    catalog_version: int
    applied: int
    """This node's applied index when the snapshot opened (its state is the state at every
    index from `state_index` to `applied`)."""
    read_index: int = 0
    """The ReadIndex point it waited for (0: not asked to linearize)."""


class ReleaseRead(msgspec.Struct, frozen=True):
    index: int
    reader: int = 0


SQL_MESSAGES: dict[str, type[msgspec.Struct]] = {
    "sql.request": SqlRequest,
    "sql.response": SqlResponse,
    "sql.catalog": CatalogRequest,
    "sql.catalog_response": CatalogResponse,
    "sql.stage": StageHeader,
    "sql.stage_ack": StageAck,
    "sql.fetch_stage": FetchStage,
    "sql.scan": ScanRequest,
    "sql.scan_header": ScanHeader,
    "sql.scan_error": ScanError,
    "sql.fragment": FragmentRequest,
    "sql.fragment_header": FragmentHeader,
    "sql.release": ReleaseRead,
    "sql.open_read": OpenRead,
    "sql.read_opened": ReadOpened,
}

_command_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(SqlCommand)


def write_quorum(replicas: int) -> int:
    """Holders of a partition that must durably stage a batch before it is committed: a
    majority of its replicas (all of them when R <= 2)."""
    return replicas // 2 + 1


def table_key(schema: str, name: str) -> str:
    """The key a table is known by in the log and the partition store."""
    return f"{schema.lower()}.{name.lower()}"


def encode_command(command: SqlCommand) -> bytes:
    """The request payload (no entry mark)."""
    return _command_encoder.encode(command)


def decode_command(data: bytes) -> SqlCommand:
    """Raises msgspec.DecodeError on a malformed command."""
    return _command_decoder.decode(data)


class FragmentInputError(ValueError):
    """A fragment's inputs are not acceptable: a bad or repeated name, bytes that are not
    exactly one intact Arrow IPC stream, or too many bytes. `str(error)` says which."""


def encode_fragment_input(rows: pa.Table) -> bytes:
    """`rows` as one Arrow IPC stream (ended by the end-of-stream marker)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def check_fragment_inputs(inputs: Sequence[tuple[str, bytes]]) -> None:
    """Raise `FragmentInputError` unless every name matches `FRAGMENT_INPUT_NAME`, no name
    repeats and the bytes are at most `FRAGMENT_INPUTS_BYTES_MAX` in all. Reads no stream."""
    seen: set[str] = set()
    total_bytes = 0
    for name, data in inputs:
        if not isinstance(name, str) or FRAGMENT_INPUT_NAME.fullmatch(name) is None:
            raise FragmentInputError(
                f"a fragment input's name must match {FRAGMENT_INPUT_NAME.pattern}, not {name!r}"
            )
        if name in seen:
            raise FragmentInputError(f"the fragment input {name} is given twice")
        seen.add(name)
        total_bytes += len(data)
    if total_bytes > FRAGMENT_INPUTS_BYTES_MAX:
        raise FragmentInputError(
            f"the fragment inputs may be at most {FRAGMENT_INPUTS_BYTES_MAX} bytes in all, "
            f"these are {total_bytes}"
        )


def decode_fragment_inputs(inputs: Sequence[tuple[str, bytes]]) -> dict[str, pa.Table]:
    """Name -> rows, after `check_fragment_inputs`. Each input must read back as exactly
    one Arrow IPC stream, intact (its end marker present, nothing after it) and valid
    throughout (offsets and lengths checked, so DuckDB never reads out of bounds); else
    `FragmentInputError`. The tables share memory with the given bytes."""
    check_fragment_inputs(inputs)
    return {name: _read_stream(name, data) for name, data in inputs}


def _read_stream(name: str, data: bytes) -> pa.Table:
    if not data.endswith(_IPC_END_OF_STREAM):
        raise FragmentInputError(
            f"the fragment input {name} is not a whole Arrow IPC stream (no end marker: "
            f"truncated?), {len(data)} bytes"
        )
    source = pa.BufferReader(pa.py_buffer(data))
    try:
        rows = pa.ipc.open_stream(source).read_all()
        rows.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise FragmentInputError(
            f"the fragment input {name} is not a valid Arrow IPC stream: {error}"
        ) from error
    if source.tell() != len(data):
        raise FragmentInputError(
            f"the fragment input {name} has {len(data) - source.tell()} bytes after its "
            "Arrow IPC stream; exactly one stream is expected"
        )
    return rows


def entry_data(command: bytes) -> bytes:
    """Log entry data for an encoded command."""
    return SQL_ENTRY_MARK + command


def is_sql_entry(data: bytes) -> bool:
    return data[:1] == SQL_ENTRY_MARK
