"""dcluster's Python API: DuckDB's shape over a cluster port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import dcluster
from query.port import WriteRefused
from tests.unit.query.fake_port import FakePort

ROOT = Path(__file__).resolve().parents[3]


def test_importing_dcluster_needs_no_cluster() -> None:
    code = "import sys, dcluster; assert 'cluster.session' not in sys.modules; print('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_relations_look_like_duckdbs(port: FakePort, capsys: pytest.CaptureFixture[str]) -> None:
    plain = duckdb.connect()
    with dcluster.connect(port=port) as con:
        for sql in (
            "CREATE TABLE t (k INTEGER, v VARCHAR, d DECIMAL(8,2)) PARTITION BY HASH(k)",
            "INSERT INTO t VALUES (1, 'a', 1.5), (2, 'b', NULL), (3, NULL, -2.25)",
        ):
            relation = con.sql(sql)
            expected = plain.sql(sql.split(" PARTITION")[0])
            assert relation is not None and expected is not None
            assert relation.fetchall() == expected.fetchall()
        query = "SELECT k, v, d FROM t ORDER BY k"
        relation = con.sql(query)
        expected = plain.sql(query)
        assert relation is not None
        assert relation.columns == expected.columns
        assert relation.types == [str(t) for t in expected.types]
        assert relation.fetchall() == expected.fetchall()
        assert relation.fetchone() == (1, "a", expected.fetchall()[0][2])
        assert relation.arrow().equals(expected.to_arrow_table())
        assert len(relation) == 3
        relation.show()
        ours = capsys.readouterr().out
        expected.show()
        assert ours == capsys.readouterr().out
        params = con.sql("SELECT v FROM t WHERE k = ?", params=[2])
        assert params is not None and params.fetchall() == [("b",)]
        stale = con.sql("SELECT count(*) FROM t", consistency="stale")
        assert stale is not None and stale.fetchall() == [(3,)]


def test_execute_makes_the_connection_a_cursor(port: FakePort) -> None:
    con = dcluster.connect(port=port)
    plain = duckdb.connect()
    setup = "CREATE TABLE t (k INTEGER); INSERT INTO t SELECT * FROM range(5);"
    con.execute(setup.replace("(k INTEGER)", "(k INTEGER) PARTITION BY HASH(k)"))
    plain.execute(setup)
    assert con.rowcount == plain.rowcount == 5
    for cursor in (
        con.execute("SELECT k FROM t ORDER BY k"),
        plain.execute("SELECT k FROM t ORDER BY k"),
    ):
        assert cursor.fetchone() == (0,)
        assert cursor.fetchmany(2) == [(1,), (2,)]
        assert cursor.fetchall() == [(3,), (4,)]
        assert cursor.fetchone() is None
        assert cursor.fetchall() == []
    assert con.execute("SELECT k FROM t WHERE k > ?", [2]).fetchall() == [(3,), (4,)]
    assert con.description == [("k", "INTEGER", None, None, None, None, None)]
    assert con.rowcount == -1
    con.execute("SELECT k FROM t ORDER BY k").fetchone()
    rest = con.arrow()
    assert rest is not None and rest.column("k").to_pylist() == [1, 2, 3, 4]
    con.executemany("INSERT INTO t VALUES (?)", [[10], [11]])
    assert con.execute("SELECT count(*) FROM t").fetchall() == [(7,)]
    con.close()
    con.close()
    with pytest.raises(RuntimeError, match="closed"):
        con.sql("SELECT 1")


def test_errors_share_one_base(port: FakePort) -> None:
    with dcluster.connect(port=port) as con:
        with pytest.raises(dcluster.Error, match="Parser Error"):
            con.sql("SELEC 1")
        con.sql("CREATE TABLE t (k INTEGER) PARTITION BY HASH(k)")
        port.refuse_stages = 1
        with pytest.raises(dcluster.Error) as raised:
            con.sql("INSERT INTO t VALUES (1)")
        assert isinstance(raised.value, WriteRefused)
        assert con.sql("SELECT count(*) FROM t").fetchall() == [(0,)]  # type: ignore[union-attr]


def test_connect_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="needs a cluster"):
        dcluster.connect()
    port = FakePort()
    with pytest.raises(ValueError, match="not both"):
        dcluster.connect("name", port=port)
    with pytest.raises(ValueError, match="'strong' or 'stale'"):
        dcluster.connect(port=port, consistency="eventual")
    port.close()
