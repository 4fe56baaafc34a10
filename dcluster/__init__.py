"""dcluster's Python API, in DuckDB's shape.

    import dcluster
    con = dcluster.connect("mycluster")             # a cluster started by `dcluster up`
    con.sql("CREATE TABLE t (id BIGINT, v VARCHAR) PARTITION BY HASH(id)")
    con.execute("INSERT INTO t VALUES (?, ?)", [1, "a"])
    con.sql("SELECT * FROM t").fetchall()

Every statement is atomic on its own and returns what single-node DuckDB returns for it.
Importing this package needs no cluster; `connect` opens the transport lazily. Errors
derive from `dcluster.Error` (query.coordinator.SqlError).
"""

from dcluster._connection import Connection, Relation, connect
from query.coordinator import (
    BindFailed,
    ClusterError,
    ExecutionFailed,
    NotPlaceable,
    ParseFailed,
    Refused,
    SqlError,
    StageRefused,
    Unsupported,
    WriteConflict,
)

Error = SqlError

__all__ = [
    "BindFailed",
    "ClusterError",
    "Connection",
    "Error",
    "ExecutionFailed",
    "NotPlaceable",
    "ParseFailed",
    "Refused",
    "Relation",
    "SqlError",
    "StageRefused",
    "Unsupported",
    "WriteConflict",
    "connect",
]
