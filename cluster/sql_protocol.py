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
  table versions.
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
- `ReleaseRead(index)`: the client is done with the barrier's snapshots (they also expire).
- worker -> worker `FetchStage` -> bulk `StageHeader` + rows, or `StageAck(ok=False)`: a
  holder that missed a staged batch fetches it from another holder before applying.

Invariant: a command names every staged batch by id, row count and checksum; a worker
applies a batch only if its copy matches both.
"""

from __future__ import annotations

import enum

import msgspec

from cluster.protocol import Address

SQL_ENTRY_MARK = b"\xc1"
"""First byte of every SQL log entry (never the first byte of valid msgpack)."""
STATEMENT_TEXT_CHARS_MAX = 200
"""Statement text kept in a command (for logs); longer statements are cut."""


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


class FragmentHeader(msgspec.Struct, frozen=True):
    """Header of a fragment's rows (worker -> client)."""

    request_id: int
    index: int
    """The barrier index the fragment ran at (or the applied index, for stale)."""


class ReleaseRead(msgspec.Struct, frozen=True):
    index: int


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


def entry_data(command: bytes) -> bytes:
    """Log entry data for an encoded command."""
    return SQL_ENTRY_MARK + command


def is_sql_entry(data: bytes) -> bool:
    return data[:1] == SQL_ENTRY_MARK
