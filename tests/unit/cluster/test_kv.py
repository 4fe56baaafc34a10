"""The key-value state machine: operations, CAS, exactly-once retries, snapshots, and a
hypothesis run against a dict model (with snapshot/restore at random points)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.kv import (
    EXPIRED,
    RESULTS_PER_CLIENT_MAX,
    KvResult,
    KvStateMachine,
    encode_address,
    encode_command,
)
from cluster.protocol import KEY_BYTES_MAX, KvCommand, KvOp
from raft import ConfChange, ConfChangeKind, ConfState, Entry, EntryKind

FOUNDERS = ConfState(voters=(1, 2, 3))


class Log:
    """Feeds a machine consecutive entries, as the worker's apply step does."""

    def __init__(self, machine: KvStateMachine | None = None) -> None:
        self.machine = machine or KvStateMachine(applied_index=1, conf=FOUNDERS)
        self.request_ids: dict[int, int] = {}

    def entry(self, data: bytes, kind: EntryKind = EntryKind.NORMAL) -> Entry:
        return Entry(term=2, index=self.machine.applied_index + 1, kind=kind, data=data)

    def write(
        self,
        op: KvOp,
        key: str,
        value: bytes | None = None,
        expected: bytes | None = None,
        client: int = 7,
        request_id: int | None = None,
    ) -> KvResult:
        if request_id is None:
            request_id = self.request_ids.get(client, 0) + 1
        self.request_ids[client] = max(request_id, self.request_ids.get(client, 0))
        command = KvCommand(client, request_id, op, key, value, expected)
        result = self.machine.apply(self.entry(encode_command(command)))
        assert result is not None
        return result


def test_put_get_delete() -> None:
    log = Log()
    assert log.machine.get("a") == (None, False)
    assert log.write(KvOp.PUT, "a", b"1") == KvResult(ok=True, found=False)
    assert log.write(KvOp.PUT, "a", b"2") == KvResult(ok=True, found=True)
    assert log.machine.get("a") == (b"2", True)
    assert log.write(KvOp.DELETE, "a") == KvResult(ok=True, found=True)
    assert log.write(KvOp.DELETE, "a") == KvResult(ok=True, found=False)
    assert log.machine.get("a") == (None, False)
    assert log.machine.applied_index == 5


def test_cas_applies_only_on_a_match() -> None:
    log = Log()
    assert log.write(KvOp.CAS, "k", b"v1", expected=None).ok  # absent -> create
    assert log.write(KvOp.CAS, "k", b"v2", expected=None) == KvResult(
        ok=False, found=True, value=b"v1"
    )
    assert log.write(KvOp.CAS, "k", b"v2", expected=b"nope") == KvResult(
        ok=False, found=True, value=b"v1"
    )
    assert log.write(KvOp.CAS, "k", b"v2", expected=b"v1").ok
    assert log.machine.get("k") == (b"v2", True)
    assert log.write(KvOp.CAS, "k", None, expected=b"v2").ok  # a CAS to None deletes
    assert log.machine.get("k") == (None, False)
    assert log.write(KvOp.CAS, "gone", b"x", expected=b"y") == KvResult(ok=False, found=False)


def test_a_retried_write_applies_once_and_returns_the_first_result() -> None:
    log = Log()
    first = log.write(KvOp.PUT, "a", b"1", request_id=10)
    log.write(KvOp.PUT, "a", b"2", client=8)
    again = log.write(KvOp.PUT, "a", b"1", request_id=10)  # the retry, at a later index
    assert again == first
    assert log.machine.get("a") == (b"2", True)  # the retry did not overwrite client 8
    applied_cas = log.write(KvOp.CAS, "a", b"3", expected=b"2", request_id=11)
    assert applied_cas.ok
    assert log.write(KvOp.CAS, "a", b"3", expected=b"2", request_id=11).ok  # cached, not re-run


def test_pipelined_writes_of_one_client_dedupe_out_of_order() -> None:
    log = Log()
    for request_id in (5, 3, 4, 1, 2):
        log.write(KvOp.PUT, f"k{request_id}", b"v", request_id=request_id)
    log.write(KvOp.DELETE, "k3", client=9)
    assert log.write(KvOp.PUT, "k3", b"v", request_id=3) == KvResult(ok=True, found=False)
    assert log.machine.get("k3") == (None, False)


def test_a_request_older_than_the_window_is_refused_not_applied() -> None:
    log = Log()
    for request_id in range(1, RESULTS_PER_CLIENT_MAX + 2):
        log.write(KvOp.PUT, "counter", str(request_id).encode(), request_id=request_id)
    result = log.write(KvOp.PUT, "counter", b"old", request_id=1)
    assert result == KvResult(ok=False, error=EXPIRED)
    assert log.machine.get("counter") == (str(RESULTS_PER_CLIENT_MAX + 1).encode(), True)


def test_bad_commands_are_refused_identically_and_advance_the_index() -> None:
    log = Log()
    assert log.write(KvOp.PUT, "k", None).error == "PUT needs a value"
    assert log.write(KvOp.GET, "k").error == "GET is not a write"
    assert log.write(KvOp.PUT, "x" * (KEY_BYTES_MAX + 1), b"v").error is not None
    garbage = log.machine.apply(log.entry(b"\xc1not msgpack"))
    assert garbage == KvResult(ok=False, error="undecodable command")
    assert log.machine.apply(log.entry(b"")) is None  # a leader's no-op
    assert len(log.machine) == 0
    assert log.machine.applied_index == 6


def test_membership_and_addresses_follow_conf_change_entries() -> None:
    log = Log()
    add = ConfChange(ConfChangeKind.ADD_LEARNER, 4, encode_address(("127.0.0.2", 7000)))
    assert log.machine.apply(log.entry(add.encode(), EntryKind.CONF_CHANGE)) is None
    assert log.machine.conf == ConfState(voters=(1, 2, 3), learners=(4,))
    assert log.machine.addresses == {4: ("127.0.0.2", 7000)}
    promote = ConfChange(ConfChangeKind.ADD_VOTER, 4)
    log.machine.apply(log.entry(promote.encode(), EntryKind.CONF_CHANGE))
    assert log.machine.conf == ConfState(voters=(1, 2, 3, 4))
    assert log.machine.addresses == {4: ("127.0.0.2", 7000)}
    remove = ConfChange(ConfChangeKind.REMOVE, 4)
    log.machine.apply(log.entry(remove.encode(), EntryKind.CONF_CHANGE))
    assert log.machine.conf == FOUNDERS
    assert log.machine.addresses == {}


def test_snapshot_restore_round_trip_keeps_data_sessions_and_membership() -> None:
    log = Log()
    log.write(KvOp.PUT, "a", b"1", request_id=1)
    log.write(KvOp.PUT, "b", b"\x00\xff", client=8)
    add = ConfChange(ConfChangeKind.ADD_LEARNER, 5, encode_address(("10.0.0.5", 9)))
    log.machine.apply(log.entry(add.encode(), EntryKind.CONF_CHANGE))
    machine = log.machine
    image = machine.snapshot()
    restored = KvStateMachine.restore(image, machine.applied_index, machine.conf)
    assert restored.items() == machine.items()
    assert restored.conf == machine.conf
    assert restored.addresses == machine.addresses
    assert restored.snapshot() == image
    again = Log(restored)
    assert again.write(KvOp.PUT, "a", b"1", request_id=1) == KvResult(ok=True, found=False)
    assert restored.get("a") == (b"1", True)


def test_the_bootstrap_snapshot_restores_an_empty_machine() -> None:
    machine = KvStateMachine.restore(b"", 1, FOUNDERS)
    assert machine.applied_index == 1
    assert machine.conf == FOUNDERS
    assert len(machine) == 0


# ---- against a model ----

Command = tuple[KvOp, str, bytes | None, bytes | None, int, bool, bool]
KEYS = st.sampled_from(["a", "b", "c", "d"])
VALUES = st.one_of(st.none(), st.binary(max_size=8))
COMMANDS = st.tuples(
    st.sampled_from([KvOp.PUT, KvOp.CAS, KvOp.DELETE]),
    KEYS,
    VALUES,
    VALUES,
    st.integers(min_value=1, max_value=3),  # client
    st.booleans(),  # retry the previous request of this client instead
    st.booleans(),  # snapshot and restore before applying
)


@settings(max_examples=200, deadline=None)
@given(st.lists(COMMANDS, max_size=60))
def test_the_machine_matches_a_dict_model(commands: list[Command]) -> None:
    log = Log()
    model: dict[str, bytes] = {}
    last: dict[int, tuple[KvCommand, KvResult]] = {}
    for op, key, value, expected, client, retry, snapshot in commands:
        if snapshot:
            machine = log.machine
            log.machine = KvStateMachine.restore(
                machine.snapshot(), machine.applied_index, machine.conf
            )
        if retry and client in last:
            command, first = last[client]
            result = log.machine.apply(log.entry(encode_command(command)))
            assert result == KvResult(ok=first.ok, found=first.found, error=first.error)
            continue
        if op == KvOp.PUT and value is None:
            value = b""
        request_id = log.request_ids.get(client, 0) + 1
        log.request_ids[client] = request_id
        command = KvCommand(client, request_id, op, key, value, expected)
        result = log.machine.apply(log.entry(encode_command(command)))
        assert result is not None
        current = model.get(key)
        if op == KvOp.PUT:
            assert value is not None
            model[key] = value
            assert result == KvResult(ok=True, found=current is not None)
        elif op == KvOp.DELETE:
            model.pop(key, None)
            assert result == KvResult(ok=True, found=current is not None)
        elif current == expected:
            if value is None:
                model.pop(key, None)
            else:
                model[key] = value
            assert result == KvResult(ok=True, found=current is not None)
        else:
            assert result == KvResult(ok=False, found=current is not None, value=current)
        last[client] = (command, result)
        assert log.machine.items() == model
