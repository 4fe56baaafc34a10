"""Transport speed between two processes, each figure beside a baseline from the same run.

Rows:
- control round trip (a small Ping, echoed back) through `LocalTransport` (POSIX mq) and
  `TcpTransport`, p50 and p99, beside a raw posix_ipc / raw socket ping-pong of the same
  bytes with no codec and no transport;
- bulk Arrow throughput (a table of int64, float64 and string columns; 256 MiB by default)
  through shared memory and through TCP, beside one in-process memcpy of the same size.
  A bulk transfer counts from `send_bulk` until the receiver has read every column,
  released the table and its acknowledgement has come back.

Every figure is steady state: warm-up first, then percentiles of the round trips and the
median of the transfers. Each figure and its baseline are measured interleaved (round by
round), so a machine busy with other work slows both alike; the load average is reported
beside them. Targets: shm bulk >= 2x TCP bulk and >= 1/3 of memcpy; mq round trip p50
<= 4x raw mq p50. Both ends run in separate processes ("spawn"); every queue, segment,
socket and process is cleaned up even on failure, and every wait is bounded.

Usage: python -m benchmarks.transport [--pings N] [--rounds K] [--bulk-mib M]
       [--repeats R] [--json] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import json
import os
import pstats
import random
import secrets
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import posix_ipc
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks._processes import child
from clock import Clock, SystemClock
from ipc.codec import Codec, cluster_id_for
from ipc.transport import BulkReceived, Received, Transport

PINGS_DEFAULT = 10_000
PINGS_WARMUP = 200
ROUNDS_DEFAULT = 10
BULK_MIB_DEFAULT = 256
BULK_REPEATS_DEFAULT = 7
BULK_WARMUP = 1

WAIT_S_MAX = 60.0
"""No single wait (a reply, an acknowledgement, a child starting) lasts longer."""
CHILD_LIFETIME_S_MAX = 600.0
"""A child that outlives this stops by itself, whatever its parent does."""
SELECT_S_MAX = 1.0
PAGE_BYTES = 4096
PROFILE_LINES = 25

RAW_MQ_MESSAGES_MAX = 4
RAW_MQ_MESSAGE_BYTES_MAX = 1024

PARENT_NODE = 1
ECHO_NODE = 2
TARGETS = {
    "shm_vs_tcp_bulk": 2.0,
    "shm_vs_memcpy": 1 / 3,
    "mq_rtt_vs_raw": 4.0,
}


class Ping(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    payload: bytes = b""


class BulkHeader(msgspec.Struct, frozen=True, array_like=True):
    seq: int


class BulkDone(msgspec.Struct, frozen=True, array_like=True):
    seq: int
    rows: int


MESSAGES: dict[str, type[msgspec.Struct]] = {
    "bench.ping": Ping,
    "bench.bulk": BulkHeader,
    "bench.done": BulkDone,
}


# ---- processes ----


def _receive(connection: Connection, timeout_s: float = WAIT_S_MAX) -> Any:
    if not connection.poll(timeout_s):
        raise TimeoutError(f"no word from the other process in {timeout_s} s")
    return connection.recv()


def _percentile(samples: list[int], fraction: float) -> float:
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))])


def _ping_bytes() -> int:
    """The size of one encoded Ping frame: raw baselines move exactly as many bytes."""
    codec = Codec(cluster_id_for("bench"), MESSAGES)
    return len(codec.encode(PARENT_NODE, ECHO_NODE, Ping(PINGS_DEFAULT)))


# ---- raw baselines: no codec, no transport ----


def _raw_mq_echo(ping_name: str, pong_name: str, connection: Connection) -> None:
    """Echo every message until an empty one (or a minute of silence)."""
    ping, pong = posix_ipc.MessageQueue(ping_name), posix_ipc.MessageQueue(pong_name)
    try:
        while True:
            message, _priority = ping.receive(WAIT_S_MAX)
            if not message:
                return
            pong.send(message, WAIT_S_MAX)
    except posix_ipc.BusyError:
        return
    finally:
        ping.close()
        pong.close()


class _RawMq:
    """posix_ipc send/receive ping-pong with an echo process: the floor under the local
    transport's round trip."""

    def __init__(
        self, stack: contextlib.ExitStack, cluster: str, message_bytes: int, clock: Clock
    ) -> None:
        assert 0 < message_bytes <= RAW_MQ_MESSAGE_BYTES_MAX, message_bytes
        self.clock = clock
        self.payload = bytes(message_bytes)
        names = (f"/{cluster}-raw-ping", f"/{cluster}-raw-pong")
        queues = [self._create(stack, name) for name in names]
        self.ping, self.pong = queues
        stack.enter_context(child(_raw_mq_echo, *names))
        stack.callback(self._stop)

    @staticmethod
    def _create(stack: contextlib.ExitStack, name: str) -> posix_ipc.MessageQueue:
        queue = posix_ipc.MessageQueue(
            name,
            posix_ipc.O_CREX,
            mode=0o600,
            max_messages=RAW_MQ_MESSAGES_MAX,
            max_message_size=RAW_MQ_MESSAGE_BYTES_MAX,
        )
        stack.callback(queue.unlink)
        stack.callback(queue.close)
        return queue

    def _stop(self) -> None:
        with contextlib.suppress(posix_ipc.Error):
            self.ping.send(b"", 0)

    def rtt_ns(self, pings: int) -> list[int]:
        samples: list[int] = []
        for _ in range(pings):
            began = self.clock.monotonic_ns()
            self.ping.send(self.payload, WAIT_S_MAX)
            self.pong.receive(WAIT_S_MAX)
            samples.append(self.clock.monotonic_ns() - began)
        return samples


def _receive_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False if the peer closed the connection first."""
    received = 0
    while received < len(view):
        count = sock.recv_into(view[received:])
        if count == 0:
            return False
        received += count
    return True


def _raw_tcp_echo(port: int, message_bytes: int, connection: Connection) -> None:
    """Echo fixed-size messages until the other end closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S_MAX) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = memoryview(bytearray(message_bytes))
        while _receive_exactly(sock, buffer):
            sock.sendall(buffer)


class _RawTcp:
    """Raw loopback socket ping-pong with an echo process (TCP_NODELAY both ends)."""

    def __init__(self, stack: contextlib.ExitStack, message_bytes: int, clock: Clock) -> None:
        self.clock = clock
        self.payload = bytes(message_bytes)
        self.reply = memoryview(bytearray(message_bytes))
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        listener.settimeout(WAIT_S_MAX)
        stack.enter_context(child(_raw_tcp_echo, listener.getsockname()[1], message_bytes))
        self.sock, _address = listener.accept()
        stack.enter_context(self.sock)  # closed first: the echo process sees end of file
        self.sock.settimeout(WAIT_S_MAX)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def rtt_ns(self, pings: int) -> list[int]:
        samples: list[int] = []
        for _ in range(pings):
            began = self.clock.monotonic_ns()
            self.sock.sendall(self.payload)
            if not _receive_exactly(self.sock, self.reply):
                raise ConnectionError("the raw TCP echo process went away")
            samples.append(self.clock.monotonic_ns() - began)
        return samples


class _Memcpy:
    """One in-process copy of the bulk size, destination pre-faulted: the best any copy
    can do here. Uses the faster of ctypes.memmove and a bytearray slice copy."""

    def __init__(self, bulk_bytes: int, clock: Clock) -> None:
        self.clock = clock
        self.source = bytearray(os.urandom(1 << 20)) * max(1, bulk_bytes >> 20)
        self.target = bytearray(len(self.source))
        self.bytes = len(self.source)
        source = (ctypes.c_char * self.bytes).from_buffer(self.source)
        target = (ctypes.c_char * self.bytes).from_buffer(self.target)
        copies: list[Callable[[], object]] = [
            lambda: ctypes.memmove(target, source, self.bytes),
            lambda: self.target.__setitem__(slice(None), self.source),
        ]
        self.copy = min(copies, key=lambda copy: min(self._time(copy) for _ in range(3)))

    def _time(self, copy: Callable[[], object]) -> int:
        began = self.clock.monotonic_ns()
        copy()
        return self.clock.monotonic_ns() - began

    def copy_ns(self) -> int:
        return self._time(self.copy)


# ---- the bulk table and how the receiver reads it ----


def bulk_table(bulk_bytes: int) -> pa.Table:
    """int64, float64 and string columns, about `bulk_bytes` in all, one chunk each."""
    rows = 1 << 16
    for _ in range(2):  # strings grow with the row number: size the sample at the end
        sample = _columns(rows, rows + (1 << 16))
        rows = max(1, bulk_bytes * sample.num_rows // sample.nbytes)
    return _columns(0, rows).combine_chunks()


def _columns(start: int, stop: int) -> pa.Table:
    ids = pa.arange(start, stop)
    names = pc.binary_join_element_wise(
        pc.cast(ids, pa.string()), pa.scalar("-row-of-the-benchmark"), ""
    )
    return pa.table(
        {"id": ids, "value": pc.multiply(pc.cast(ids, pa.float64()), 0.5), "name": names}
    )


def read_every_column(table: pa.Table) -> int:
    """Touch every page of every buffer and aggregate each column, as a scan would."""
    touched = 0
    for column in table.columns:
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            pc.sum(column)
        else:
            pc.sum(pc.binary_length(column))
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None and buffer.size:
                    touched += len(bytes(memoryview(buffer)[::PAGE_BYTES]))
    return touched


# ---- transports ----


@dataclass(frozen=True)
class _Setup:
    """What both processes need to build their transport of one kind."""

    kind: str
    cluster: str
    run_dir: str
    secret: bytes
    profile: bool = False


def _profiler(setup: _Setup) -> cProfile.Profile | None:
    return cProfile.Profile() if setup.profile else None


def _profile_path(setup: _Setup, side: str) -> str:
    return os.path.join(setup.run_dir, f"{setup.kind}-{side}.prof")


def _print_profiles(setup: _Setup, lines: int) -> None:
    """The top of each side's profile, by own time, on stderr."""
    for side in ("parent", "echo"):
        path = _profile_path(setup, side)
        if os.path.exists(path):
            print(f"\n==== {setup.kind} transport, {side} process ====", file=sys.stderr)
            stats = pstats.Stats(path, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(lines)


def _make_transport(setup: _Setup, node_id: int, clock: Clock) -> Transport:
    if setup.kind == "local":
        from ipc.local import LocalTransport

        transport: Transport = LocalTransport(
            setup.cluster,
            node_id,
            Path(setup.run_dir),
            clock,
            incarnation=1,
            messages=MESSAGES,
        )
        return transport
    assert setup.kind == "tcp", setup.kind
    from ipc.tcp import TcpTransport

    transport = TcpTransport(
        setup.cluster,
        node_id,
        setup.secret,
        clock,
        random.Random(node_id),
        bind=("127.0.0.1", 0),
        messages=MESSAGES,
    )
    return transport


def _address(transport: Transport) -> Any:
    return getattr(transport, "address", None)


def _connect(transport: Transport, peer: int, address: Any) -> None:
    if address is not None:
        transport.set_peer(peer, address)  # type: ignore[attr-defined]


class _Loop:
    """One transport driven the way a worker drives it: wait on fileno(), then poll()."""

    def __init__(self, transport: Transport, clock: Clock) -> None:
        self.transport = transport
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.selector.register(transport.fileno(), selectors.EVENT_READ)

    def close(self) -> None:
        self.selector.close()

    def wait_s(self) -> float:
        timeout_ns = self.transport.next_timeout_ns()
        if timeout_ns is None:
            return SELECT_S_MAX
        return max(0.0, min(SELECT_S_MAX, timeout_ns / 1e9))

    def until(self, accept: Callable[[Any], bool], timeout_s: float = WAIT_S_MAX) -> Any:
        """Poll until a delivery `accept`s; other deliveries are released and dropped."""
        deadline_ns = self.clock.monotonic_ns() + int(timeout_s * 1e9)
        while True:
            for delivery in self.transport.poll():
                if accept(delivery):
                    return delivery
                if isinstance(delivery, BulkReceived):
                    delivery.release()
            if self.clock.monotonic_ns() > deadline_ns:
                raise TimeoutError(f"no matching delivery within {timeout_s} s")
            for key, _events in self.selector.select(self.wait_s()):
                if key.data is not None:
                    raise ConnectionError(f"the {key.data} process is gone")


def _transport_echo(setup: _Setup, connection: Connection) -> None:
    """The far end: echo every Ping; read, release and acknowledge every bulk table."""
    clock = SystemClock()
    transport = _make_transport(setup, ECHO_NODE, clock)
    loop = _Loop(transport, clock)
    profiler = _profiler(setup)
    try:
        connection.send(("ready", _address(transport)))
        _connect(transport, PARENT_NODE, _receive(connection)[1])
        loop.selector.register(connection.fileno(), selectors.EVENT_READ, data=connection)
        with profiler or contextlib.nullcontext():
            _serve(loop, clock)
    finally:
        loop.close()
        transport.close()
        if profiler is not None:
            profiler.dump_stats(_profile_path(setup, "echo"))


def _serve(loop: _Loop, clock: Clock) -> None:
    """Select, then poll, as a worker does, until told to stop (or the parent is gone:
    its end of the pipe then reads as end of file)."""
    deadline_ns = clock.monotonic_ns() + int(CHILD_LIFETIME_S_MAX * 1e9)
    while clock.monotonic_ns() < deadline_ns:
        for key, _events in loop.selector.select(loop.wait_s()):
            if key.data is not None:
                return
        for delivery in loop.transport.poll():
            _echo(loop.transport, delivery)


def _echo(transport: Transport, delivery: Any) -> None:
    if isinstance(delivery, BulkReceived):
        with delivery:
            read_every_column(delivery.table)
            rows = delivery.table.num_rows
        transport.send(delivery.source, BulkDone(delivery.header.seq, rows))
    elif isinstance(delivery, Received) and isinstance(delivery.message, Ping):
        transport.send(delivery.source, delivery.message)


@contextlib.contextmanager
def _pair(setup: _Setup, clock: Clock) -> Iterator[_Loop]:
    """Our transport and a connected echo process."""
    transport = _make_transport(setup, PARENT_NODE, clock)
    loop = _Loop(transport, clock)
    try:
        with child(_transport_echo, setup) as connection:
            _tag, echo_address = _receive(connection)
            _connect(transport, ECHO_NODE, echo_address)
            connection.send(("peer", _address(transport)))
            # The echo never writes to the pipe again: readable now means it is gone.
            loop.selector.register(connection.fileno(), selectors.EVENT_READ, data="echo")
            yield loop
    finally:
        loop.close()
        transport.close()
        if setup.kind == "local":
            from ipc.local import reclaim_cluster

            reclaim_cluster(setup.cluster, Path(setup.run_dir))


class _Peer:
    """Our end of one transport pair, measured: round trips and bulk transfers. With
    profiling on, only our time inside these calls is profiled."""

    def __init__(self, loop: _Loop, table: pa.Table, profiler: cProfile.Profile | None) -> None:
        self.loop = loop
        self.table = table
        self.profiler = profiler
        self.seq = 0

    def rtt_ns(self, pings: int) -> list[int]:
        clock, transport = self.loop.clock, self.loop.transport
        samples: list[int] = []
        with self.profiler or contextlib.nullcontext():
            for _ in range(pings):
                self.seq += 1
                began = clock.monotonic_ns()
                transport.send(ECHO_NODE, Ping(self.seq))
                self.loop.until(_echoes(self.seq))
                samples.append(clock.monotonic_ns() - began)
        return samples

    def transfer_ns(self) -> int:
        """`send_bulk` until the echo has read every column, released the table and its
        acknowledgement is here."""
        clock = self.loop.clock
        self.seq += 1
        with self.profiler or contextlib.nullcontext():
            began = clock.monotonic_ns()
            self.loop.transport.send_bulk(ECHO_NODE, BulkHeader(self.seq), self.table)
            done = self.loop.until(_acknowledges(self.seq))
            elapsed_ns = clock.monotonic_ns() - began
        assert done.message.rows == self.table.num_rows, (done.message, self.table.num_rows)
        return elapsed_ns


def _echoes(seq: int) -> Callable[[Any], bool]:
    def accept(delivery: Any) -> bool:
        return isinstance(delivery, Received) and delivery.message == Ping(seq)

    return accept


def _acknowledges(seq: int) -> Callable[[Any], bool]:
    def accept(delivery: Any) -> bool:
        return (
            isinstance(delivery, Received)
            and isinstance(delivery.message, BulkDone)
            and delivery.message.seq == seq
        )

    return accept


# ---- the run ----


@contextlib.contextmanager
def _run_dir(cluster: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=f"{cluster}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _transport_peer(
    stack: contextlib.ExitStack, setup: _Setup, clock: Clock, table: pa.Table
) -> _Peer:
    profiler = _profiler(setup)
    if profiler is not None:
        # Runs after the pair is closed (the echo has written its profile by then).
        stack.callback(_print_profiles, setup, PROFILE_LINES)
        stack.callback(lambda: profiler.dump_stats(_profile_path(setup, "parent")))
    return _Peer(stack.enter_context(_pair(setup, clock)), table, profiler)


def measure(
    pings: int, bulk_mib: int, repeats: int, rounds: int, profile: bool = False
) -> dict[str, Any]:
    """Every figure, its baseline measured interleaved with it (round by round), so a
    busy machine slows both alike."""
    assert pings > 0 and bulk_mib > 0 and repeats > 0 and 0 < rounds <= pings, (pings, rounds)
    clock = SystemClock()
    cluster = f"bench-{os.getpid()}"
    message_bytes = _ping_bytes()
    table = bulk_table(bulk_mib << 20)
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        run_dir = stack.enter_context(_run_dir(cluster))
        local, tcp = (
            _transport_peer(
                stack,
                _Setup(kind, f"{cluster}-{kind}", run_dir, secrets.token_bytes(32), profile),
                clock,
                table,
            )
            for kind in ("local", "tcp")
        )
        memcpy = _Memcpy(bulk_mib << 20, clock)
        pingers: dict[str, Callable[[int], list[int]]] = {
            "raw_mq": _RawMq(stack, cluster, message_bytes, clock).rtt_ns,
            "mq": local.rtt_ns,
            "raw_tcp": _RawTcp(stack, message_bytes, clock).rtt_ns,
            "tcp": tcp.rtt_ns,
        }
        movers = {"memcpy": memcpy.copy_ns, "shm": local.transfer_ns, "tcp": tcp.transfer_ns}
        rtt = _interleaved_rtt(pingers, pings, rounds)
        transfer = _interleaved_bulk(movers, repeats)
    figures: dict[str, Any] = {
        "pings": pings,
        "rounds": rounds,
        "bulk_mib": bulk_mib,
        "bulk_repeats": repeats,
        "ping_frame_bytes": message_bytes,
        "bulk_table_bytes": table.nbytes,
        "bulk_table_rows": table.num_rows,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
    }
    for name, samples in rtt.items():
        figures[f"{name}_rtt_us_p50"] = _percentile(samples, 0.5) / 1e3
        figures[f"{name}_rtt_us_p99"] = _percentile(samples, 0.99) / 1e3
    sizes = {"memcpy": memcpy.bytes, "shm": table.nbytes, "tcp": table.nbytes}
    for name, samples in transfer.items():
        figures[f"{name}_bulk_gbps" if name != "memcpy" else "memcpy_gbps"] = (
            sizes[name] / statistics.median(samples)  # bytes per ns = GB/s
        )
    return _with_ratios(figures)


def _interleaved_rtt(
    pingers: dict[str, Callable[[int], list[int]]], pings: int, rounds: int
) -> dict[str, list[int]]:
    for ping in pingers.values():
        ping(PINGS_WARMUP)
    samples: dict[str, list[int]] = {name: [] for name in pingers}
    for round_index in range(rounds):
        count = pings // rounds + (1 if round_index < pings % rounds else 0)
        for name, ping in pingers.items():
            samples[name].extend(ping(count))
    return samples


def _interleaved_bulk(movers: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[int]]:
    for move in movers.values():
        for _ in range(BULK_WARMUP):
            move()
    samples: dict[str, list[int]] = {name: [] for name in movers}
    for _ in range(repeats):
        for name, move in movers.items():
            samples[name].append(move())
    return samples


def _with_ratios(figures: dict[str, Any]) -> dict[str, Any]:
    figures["shm_vs_tcp_bulk"] = figures["shm_bulk_gbps"] / figures["tcp_bulk_gbps"]
    figures["shm_vs_memcpy"] = figures["shm_bulk_gbps"] / figures["memcpy_gbps"]
    figures["mq_rtt_vs_raw"] = figures["mq_rtt_us_p50"] / figures["raw_mq_rtt_us_p50"]
    figures["tcp_rtt_vs_raw"] = figures["tcp_rtt_us_p50"] / figures["raw_tcp_rtt_us_p50"]
    figures["pass_shm_vs_tcp_bulk"] = figures["shm_vs_tcp_bulk"] >= TARGETS["shm_vs_tcp_bulk"]
    figures["pass_shm_vs_memcpy"] = figures["shm_vs_memcpy"] >= TARGETS["shm_vs_memcpy"]
    figures["pass_mq_rtt_vs_raw"] = figures["mq_rtt_vs_raw"] <= TARGETS["mq_rtt_vs_raw"]
    figures["pass"] = all(figures[f"pass_{key}"] for key in TARGETS)
    return {
        key: round(value, 3) if isinstance(value, float) else value
        for key, value in figures.items()
    }


def _table(figures: dict[str, Any]) -> list[tuple[str, ...]]:
    f = figures

    def verdict(key: str) -> str:
        return "pass" if f[f"pass_{key}"] else "FAIL"

    return [
        ("figure", "measured", "baseline (same run)", "ratio", "target"),
        (
            "control round trip p50, LocalTransport (mq)",
            f"{f['mq_rtt_us_p50']:.1f} us",
            f"{f['raw_mq_rtt_us_p50']:.1f} us (raw mq)",
            f"{f['mq_rtt_vs_raw']:.2f}x",
            f"<= 4x: {verdict('mq_rtt_vs_raw')}",
        ),
        (
            "control round trip p99, LocalTransport (mq)",
            f"{f['mq_rtt_us_p99']:.1f} us",
            f"{f['raw_mq_rtt_us_p99']:.1f} us (raw mq)",
            "",
            "",
        ),
        (
            "control round trip p50, TcpTransport",
            f"{f['tcp_rtt_us_p50']:.1f} us",
            f"{f['raw_tcp_rtt_us_p50']:.1f} us (raw socket)",
            f"{f['tcp_rtt_vs_raw']:.2f}x",
            "",
        ),
        (
            "control round trip p99, TcpTransport",
            f"{f['tcp_rtt_us_p99']:.1f} us",
            f"{f['raw_tcp_rtt_us_p99']:.1f} us (raw socket)",
            "",
            "",
        ),
        (
            f"bulk {f['bulk_mib']} MiB Arrow, shm",
            f"{f['shm_bulk_gbps']:.2f} GB/s",
            f"{f['tcp_bulk_gbps']:.2f} GB/s (TcpTransport)",
            f"{f['shm_vs_tcp_bulk']:.2f}x",
            f">= 2x: {verdict('shm_vs_tcp_bulk')}",
        ),
        (
            f"bulk {f['bulk_mib']} MiB Arrow, shm",
            f"{f['shm_bulk_gbps']:.2f} GB/s",
            f"{f['memcpy_gbps']:.2f} GB/s (memcpy)",
            f"{f['shm_vs_memcpy']:.2f}x",
            f">= 0.33x: {verdict('shm_vs_memcpy')}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transport")
    parser.add_argument("--pings", type=int, default=PINGS_DEFAULT)
    parser.add_argument("--bulk-mib", type=int, default=BULK_MIB_DEFAULT)
    parser.add_argument(
        "--repeats",
        type=int,
        default=BULK_REPEATS_DEFAULT,
        help="bulk transfers measured per transport, after warm-up",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS_DEFAULT,
        help="round-trip measurements alternate between kinds this often",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile both ends of each transport (stderr); slows every figure",
    )
    args = parser.parse_args(argv)
    figures = measure(args.pings, args.bulk_mib, args.repeats, args.rounds, args.profile)
    if args.json:
        print(json.dumps(figures))
        return 0
    rows = _table(figures)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        f"\n{figures['pings']:,} pings per kind in {figures['rounds']} interleaved rounds; "
        f"bulk: median of {figures['bulk_repeats']}, {figures['bulk_table_rows']:,} rows, "
        f"{figures['bulk_table_bytes'] / (1 << 20):.0f} MiB; GB/s = 1e9 bytes/s; load "
        f"average {figures['load_avg_1m_before']:.2f} before, "
        f"{figures['load_avg_1m_after']:.2f} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
