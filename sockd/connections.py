"""Connections: what sockd knows of each accepted connection, and how one ends.

Owns the ``Connection`` record and the socket type that carries it (``ConnSocket``), the
``Registry`` of open connections with its ``Counters``, the kernel's byte counts
(``tcp_stats``), the canonical ``conn.close`` line (``log_close``), and the ways a
connection is closed: cut from outside (``Connection.cut``: a kick, a sweep, the drain
deadline) or closed gently (``close_gently``: a FIN, never a reset).

Byte counts come from the kernel (``TCP_INFO``), not from wrapping the socket: nothing
is added to the data path, and the parent can read live counts of a connection that a
forked child is serving (it keeps its copy of the descriptor until the child exits,
which also lets ``sockctl kick`` close a child's connection with ``shutdown()``).

May import ``sockd.logs`` only: admission, the listeners, the accept loop, the handler
base class and the daemon build on this module, never the other way round.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import json.encoder
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sockd import logs
from sockd.protocol import iso_time

#: Offsets into Linux's ``struct tcp_info`` (stable ABI: fields are only ever appended).
_TCPI_LEN: Final = 216
_TCPI_LEN_OLD: Final = 136
_TCPI_BYTES_ACKED: Final = 120


@dataclass(slots=True)
class TrafficStats:
    bytes_in: int = 0
    bytes_out: int = 0
    idle_ms: int = 0


#: state @0, last_data_sent @44, last_data_recv @52, bytes_received @128,
#: notsent_bytes @144, bytes_sent @200, bytes_retrans @208: one unpack for everything.
_TCPI_FIELDS: Final = struct.Struct("=B43xI4xI72xQ8xI52xQQ")
_TCPI_FIELDS_OLD: Final = struct.Struct("=B43xI4xI72xQ")


def tcp_stats(sock: socket.socket) -> TrafficStats | None:
    """Bytes received and written so far, and ms since data last moved, from TCP_INFO.

    ``idle_ms`` counts data either way: a client reading a long download sends nothing,
    yet the connection is busy while data goes out (``tcpi_last_data_sent``).
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
    except (OSError, AttributeError):
        return None
    if len(info) >= _TCPI_LEN:
        state, since_sent, since_recv, received, notsent, sent, retrans = _TCPI_FIELDS.unpack_from(
            info
        )
        written = sent - retrans + notsent
    elif len(info) >= _TCPI_LEN_OLD:
        state, since_sent, since_recv, received = _TCPI_FIELDS_OLD.unpack_from(info)
        (written,) = struct.unpack_from("Q", info, _TCPI_BYTES_ACKED)
    else:
        return None
    if received and _peer_fin_received(sock, state):
        received -= 1  # the peer's FIN takes a sequence number; it is not a byte
    return TrafficStats(received, written, min(since_sent, since_recv))


_FIN_RECEIVED_STATES: Final = frozenset({6, 8, 9, 11})  # TIME_WAIT CLOSE_WAIT LAST_ACK CLOSING
_TCP_CLOSE: Final = 7


def _peer_fin_received(sock: socket.socket, state: int) -> bool:
    if state in _FIN_RECEIVED_STATES:
        return True
    if state != _TCP_CLOSE:
        return False
    # Fully closed: orderly (FIN seen, reads give EOF) or reset (an error, or nothing).
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except OSError:
        return False


class ConnSocket(socket.socket):
    """An accepted socket that carries its ``Connection`` to the worker thread or child."""

    __slots__ = ("sockd_conn",)
    sockd_conn: Connection | None


class Connection:
    """One accepted connection, as the registry, the logs and the control channel see it."""

    __slots__ = (
        "_base_log",
        "_log",
        "claimed",
        "close_reason",
        "handler_cls",
        "id",
        "listen",
        "options",
        "peer_addr",
        "peer_key",
        "peer_port",
        "pid",
        "sock",
        "started",
        "started_wall",
    )

    def __init__(
        self,
        conn_id: int,
        sock: ConnSocket,
        peer: tuple[Any, ...],
        listen: str,
        peer_key: bytes | str,
        handler_cls: type[socketserver.BaseRequestHandler],
        options: dict[str, Any],
        base_log: Any,
    ) -> None:
        self.id = conn_id
        self.sock = sock
        self.peer_addr: str = peer[0]
        self.peer_port: int = peer[1]
        self.listen = listen
        self.peer_key = peer_key
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.pid: int | None = None
        self.close_reason: str | None = None
        self.claimed = False
        self.handler_cls = handler_cls
        self.options = options
        self._base_log = base_log
        self._log: Any = None

    @property
    def log(self) -> Any:
        """A logger bound to this connection, made on first use (most never need one)."""
        log = self._log
        if log is None:
            log = self._log = self._base_log.bind(**self.context())
        return log

    @log.setter
    def log(self, value: Any) -> None:
        self._log = value

    def context(self) -> dict[str, Any]:
        """The fields every event about this connection carries."""
        fields: dict[str, Any] = {
            "conn_id": self.id,
            "peer_addr": self.peer_addr,
            "peer_port": self.peer_port,
            "listen": self.listen,
        }
        if self.pid is not None:
            fields["pid"] = self.pid
        return fields

    @property
    def peer(self) -> str:
        host = self.peer_addr
        return f"[{host}]:{self.peer_port}" if ":" in host else f"{host}:{self.peer_port}"

    def cut(self, reason: str) -> None:
        """End this connection from outside: a kick, a sweep, the drain deadline.

        ``shutdown()``, not ``close()``: the handler's blocked call returns in whichever
        process serves it (a forked child shares the socket), and whoever then ends the
        connection writes its conn.close line with ``reason`` as ``ended``.
        """
        self.close_reason = reason
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def describe(self, now: float) -> dict[str, Any]:
        stats = tcp_stats(self.sock) if self.sock.fileno() >= 0 else None
        return {
            "id": self.id,
            "peer": self.peer,
            "peer_addr": self.peer_addr,
            "peer_port": self.peer_port,
            "listen": self.listen,
            "started_at": iso_time(self.started_wall),
            "age_s": round(now - self.started, 3),
            "bytes_in": stats.bytes_in if stats else None,
            "bytes_out": stats.bytes_out if stats else None,
            "idle_s": round(stats.idle_ms / 1000, 3) if stats else None,
            "pid": self.pid,
            "handler": f"{self.handler_cls.__module__}:{self.handler_cls.__qualname__}",
        }


class Counters:
    """Process-wide totals for /metrics; updated under the registry's lock."""

    def __init__(self) -> None:
        self.total = 0
        self.refused: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.handler_errors = 0
        self.accept_errors = 0
        self.children_killed = 0
        self.throttled: dict[str, int] = {}


class Registry:
    """Every open connection, shared by the listeners, the daemon and the control channel."""

    def __init__(self, on_close: Callable[[], None] = lambda: None) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, Connection] = {}
        self.per_peer: dict[bytes | str, int] = {}
        self.children: dict[int, Connection] = {}
        self.counters = Counters()
        self._ids = itertools.count(1)
        #: Called (outside the lock) whenever a connection closes; wakes whoever waits.
        self.on_close = on_close
        self._pending_refusals: dict[str, int] = {}
        self._pending_throttles: dict[str, int] = {}
        self._last_refusal_log = 0.0
        #: From the start of a drain (None before): connections that ended, not cut,
        #: having received bytes but sent none. Their client got no answer, so the
        #: drain does not count them as finished (server.stopped's ``unanswered``).
        self.unanswered: int | None = None

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, conn: Connection) -> None:
        with self.lock:
            self.active[conn.id] = conn
            self.per_peer[conn.peer_key] = self.per_peer.get(conn.peer_key, 0) + 1
            self.counters.total += 1

    def claim(self, conn: Connection) -> bool:
        """True exactly once per connection: whoever gets it writes the conn.close line."""
        with self.lock:
            if conn.claimed:
                return False
            conn.claimed = True
            return True

    def remove(self, conn: Connection, stats: TrafficStats | None, error: bool = False) -> bool:
        with self.lock:
            if self.active.pop(conn.id, None) is None:
                return False
            left = self.per_peer.get(conn.peer_key, 1) - 1
            if left:
                self.per_peer[conn.peer_key] = left
            else:
                self.per_peer.pop(conn.peer_key, None)
            if conn.pid is not None:
                self.children.pop(conn.pid, None)
            if stats is not None:
                self.counters.bytes_in += stats.bytes_in
                self.counters.bytes_out += stats.bytes_out
                if (
                    self.unanswered is not None
                    and stats.bytes_in
                    and not stats.bytes_out
                    and conn.close_reason is None
                ):
                    self.unanswered += 1
            if error:
                self.counters.handler_errors += 1
        self.on_close()
        return True

    def unadmit(self, conn: Connection, reason: str) -> None:
        """Take back a connection admitted but never served: a refusal, not a close."""
        with self.lock:
            if self.active.pop(conn.id, None) is None:
                return
            left = self.per_peer.get(conn.peer_key, 1) - 1
            if left:
                self.per_peer[conn.peer_key] = left
            else:
                self.per_peer.pop(conn.peer_key, None)
            self.counters.total -= 1
            self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
            self._pending_refusals[reason] = self._pending_refusals.get(reason, 0) + 1
        self.on_close()

    def count(self) -> int:
        return len(self.active)

    def peer_count(self, key: bytes | str) -> int:
        return self.per_peer.get(key, 0)

    def snapshot(self) -> list[Connection]:
        with self.lock:
            return list(self.active.values())

    def get(self, conn_id: int) -> Connection | None:
        return self.active.get(conn_id)

    def throttled(self, reason: str) -> None:
        """Accepting paused at a limit: new connections wait in the backlog."""
        with self.lock:
            self.counters.throttled[reason] = self.counters.throttled.get(reason, 0) + 1
            self._pending_throttles[reason] = self._pending_throttles.get(reason, 0) + 1

    def refused(self, reason: str) -> None:
        with self.lock:
            self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
            self._pending_refusals[reason] = self._pending_refusals.get(reason, 0) + 1

    def flush_refusals(self, log: Any, now: float, every: float = 1.0) -> None:
        """Log refusals and limit hits as one summary line a second at most, never per peer.

        ``every=0`` writes what is pending at once (at the drain, so the last second's
        refusals before a stop are not lost).
        """
        if not (self._pending_refusals or self._pending_throttles):
            return
        if every and now - self._last_refusal_log < every:
            return
        with self.lock:
            refused, self._pending_refusals = self._pending_refusals, {}
            throttled, self._pending_throttles = self._pending_throttles, {}
        self._last_refusal_log = now
        if refused:
            log.warning("conn.refused", counts=refused, total=sum(refused.values()))
        if throttled:
            log.warning("server.throttled", counts=throttled, active=self.count())


def log_close(conn: Connection, stats: TrafficStats | None, ended: str, **extra: Any) -> None:
    """The canonical line: one per connection, with everything an operator needs.

    Written through the log system's renderer, ring and sink like every event, but
    without structlog's per-call context copying; and with JSON output, rendered from a
    template (every value's type is known here), since this runs for every connection.
    """
    if not logs.enabled(logs.INFO):
        return
    duration_ms = round((time.monotonic() - conn.started) * 1000, 3)
    bytes_in = stats.bytes_in if stats else None
    bytes_out = stats.bytes_out if stats else None
    sink = logs.json_line_sink() if not extra else None
    if sink is not None and ended in _ENDED_LITERALS:
        pid = f', "pid": {conn.pid}' if conn.pid is not None else ""
        line = (
            f'{{"timestamp": "{logs.iso_now()}", "level": "info", "event": "conn.close", '
            f'"conn_id": {conn.id}, "peer_addr": {_json_str(conn.peer_addr)}, '
            f'"peer_port": {conn.peer_port}, "listen": {_json_str(conn.listen)}{pid}, '
            f'"duration_ms": {duration_ms!r}, "bytes_in": {_json_int(bytes_in)}, '
            f'"bytes_out": {_json_int(bytes_out)}, "ended": "{ended}"}}'
        )
        sink.emit_line(logs.INFO, line)
        return
    fields = conn.context()
    fields["duration_ms"] = duration_ms
    fields["bytes_in"] = bytes_in
    fields["bytes_out"] = bytes_out
    fields["ended"] = ended
    if extra:
        fields.update(extra)
    logs.emit(logs.INFO, "conn.close", fields)


_ENDED_LITERALS: Final = frozenset(
    {
        "closed",
        "error",
        "peer_gone",
        "kicked",
        "idle_timeout",
        "max_duration",
        "drain_deadline",
        "killed",
    }
)
_json_str = json.encoder.encode_basestring  # C: quotes and escapes one string


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


#: How much a gentle close reads and drops at most: a peer still streaming after
#: that gets the reset it asked for.
_DISCARD_LIMIT: Final = 1 << 20


def discard_input(sock: socket.socket) -> None:
    """Read and drop what the peer already sent, without waiting for more."""
    left = _DISCARD_LIMIT
    with contextlib.suppress(OSError):
        while left > 0:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
            if not chunk:
                return
            left -= len(chunk)


def input_pending(sock: socket.socket) -> bool:
    """Whether reading ``sock`` would return at once: bytes, end-of-stream or an error.

    A zero-timeout ``poll``, whatever the socket's own timeout (``recv`` with
    ``MSG_DONTWAIT`` would first wait out a timeout Python applies itself).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def close_gently(sock: socket.socket) -> None:
    """Close with a FIN, never a reset: the peer reads EOF, whatever it had sent."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    discard_input(sock)
    with contextlib.suppress(OSError):
        sock.close()


# A classic BPF socket filter that drops TCP segments with SYN set and ACK clear (new
