"""What clients and workers say about fragments and the catalog, through the frame codec.

What is checked: a `FragmentRequest` with inputs comes out of the codec as it went in, and
its inputs decode back to the tables encoded; one built the old way (no inputs) still
does; the largest inputs a worker accepts, with the longest SQL, fit in one frame; a
`CatalogResponse`'s `table_rows` round trip; and the estimate a worker answers with scales
the partitions it holds to the whole table."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cluster._applier import FRAGMENT_SQL_CHARS_MAX
from cluster._worker_sql import estimated_table_rows
from cluster.protocol import Address, PartitionInfo
from cluster.sql_protocol import (
    FRAGMENT_INPUTS_BYTES_MAX,
    SQL_MESSAGES,
    CatalogResponse,
    FragmentInputError,
    FragmentRequest,
    check_fragment_inputs,
    decode_fragment_inputs,
    encode_fragment_input,
)
from ipc.codec import Codec, cluster_id_for

SOURCE, TARGET = 1_000_001, 2


def _codec() -> Codec:
    return Codec(cluster_id_for("sql-protocol-test"), SQL_MESSAGES)


def _round_trip(message: FragmentRequest | CatalogResponse) -> object:
    codec = _codec()
    return codec.decode(codec.encode(SOURCE, TARGET, message)).message


def test_a_fragment_request_with_inputs_round_trips() -> None:
    keys = pa.table({"k": pa.array([1, 2, None, 4], pa.int64())})
    names = pa.table({"name": ["a", "bé", None]})
    inputs = (
        ("dcluster_keys_0", encode_fragment_input(keys)),
        ("dcluster_keys_1", encode_fragment_input(names)),
    )
    request = FragmentRequest(7, 12, "SELECT 1", (("main.t", 0),), None, inputs)
    decoded = _round_trip(request)
    assert decoded == request
    assert isinstance(decoded, FragmentRequest)
    tables = decode_fragment_inputs(decoded.inputs)
    assert list(tables) == ["dcluster_keys_0", "dcluster_keys_1"]
    assert tables["dcluster_keys_0"].equals(keys)
    assert tables["dcluster_keys_1"].equals(names)


def test_a_fragment_request_built_the_old_way_has_no_inputs() -> None:
    reply: Address = ("127.0.0.1", 7000)
    request = FragmentRequest(7, 0, "SELECT 1", (("main.t", 0),), reply)
    assert request.inputs == ()
    assert _round_trip(request) == request


def test_the_largest_inputs_with_the_longest_sql_fit_in_one_frame() -> None:
    inputs = (("dcluster_keys_0", bytes(FRAGMENT_INPUTS_BYTES_MAX)),)
    check_fragment_inputs(inputs)
    with pytest.raises(FragmentInputError, match="at most"):
        check_fragment_inputs((("dcluster_keys_0", bytes(FRAGMENT_INPUTS_BYTES_MAX + 1)),))
    sql = "\U0001f600" * FRAGMENT_SQL_CHARS_MAX  # four bytes each in UTF-8
    request = FragmentRequest(7, 0, sql, (("main.t", 0),), None, inputs)
    _codec().encode(SOURCE, TARGET, request)  # raises MessageTooLarge past one frame


def test_a_catalog_response_carries_table_rows() -> None:
    response = CatalogResponse(3, True, 9, table_rows=(("main.a", 10), ("main.b", 0)))
    assert _round_trip(response) == response
    assert CatalogResponse(3, True).table_rows == ()


PLACEMENTS = {
    "main.big": ((1, 2), (2, 3), (3, 1), (1, 2)),
    "main.ref": ((1, 2, 3),),
    "main.two": ((1,), (2,)),
}


def _held(*partitions: tuple[str, int, int]) -> list[PartitionInfo]:
    return [
        PartitionInfo(table, partition, rows, 0, False) for table, partition, rows in partitions
    ]


def test_the_estimate_scales_held_partitions_to_the_table() -> None:
    held = _held(("main.big", 0, 100), ("main.big", 3, 50), ("main.ref", 0, 7), ("main.two", 1, 3))
    # big: 150 rows in 2 of 4 partitions; ref: one partition; two: 3 rows in 1 of 2.
    assert estimated_table_rows(held, PLACEMENTS) == (
        ("main.big", 300),
        ("main.ref", 7),
        ("main.two", 6),
    )


def test_the_estimate_is_exact_when_every_partition_is_held() -> None:
    held = _held(("main.two", 0, 4), ("main.two", 1, 9))
    assert estimated_table_rows(held, PLACEMENTS) == (("main.two", 13),)


def test_the_estimate_rounds_to_the_nearest_row() -> None:
    # 3 partitions held of 4: 10 rows -> 13.33 -> 13; 11 rows -> 14.67 -> 15.
    three_of_four = [("main.big", 0, 3), ("main.big", 1, 3), ("main.big", 2, 4)]
    assert estimated_table_rows(_held(*three_of_four), PLACEMENTS) == (("main.big", 13),)
    three_of_four[2] = ("main.big", 2, 5)
    assert estimated_table_rows(_held(*three_of_four), PLACEMENTS) == (("main.big", 15),)


def test_the_estimate_leaves_out_what_it_cannot_tell() -> None:
    held = _held(
        ("main.gone", 0, 100),  # dropped since the counts were taken
        ("main.two", 5, 100),  # a partition the table no longer has
        ("main.ref", 0, 0),
    )
    assert estimated_table_rows(held, PLACEMENTS) == (("main.ref", 0),)
    assert estimated_table_rows([], PLACEMENTS) == ()
