"""Serving: our ``socketserver`` subclasses, the accept loop, and per-connection accounting.

Each listen address is one ``socketserver`` server object: ``ThreadingListener`` (a
``ThreadingTCPServer``) or ``ForkingListener`` (a ``ForkingTCPServer``), so a handler
sees the ``self.server`` the standard library documents. They are extended only
through socketserver's hooks (``get_request``, ``verify_request``, ``process_request``,
``finish_request``, ``shutdown_request``, ``close_request``, ``handle_error``).

One ``Acceptor`` thread serves every listener with one ``selectors`` loop instead of
``serve_forever``'s 0.5 s poll: a self-pipe wakes it at once for a stop, a pause or a
listener swap, so an idle daemon stops in milliseconds. It answers the daemon's
heartbeat (``Acceptor.beat``): the main loop feeds systemd's watchdog only while both
loops turn, so a stuck accept loop or a stuck main loop gets the service restarted.

Byte counts come from the kernel (``TCP_INFO``), not from wrapping the socket: nothing
is added to the data path, and the parent can read live counts of a connection that a
forked child is serving (it keeps its copy of the descriptor until the child exits,
which also lets ``sockctl kick`` close a child's connection with ``shutdown()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import json.encoder
import os
import select
import selectors
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from sockd import logs
from sockd.config import Address, Network, ServerConfig
from sockd.workers import WorkerPool

#: Offsets into Linux's ``struct tcp_info`` (stable ABI: fields are only ever appended).
_TCPI_LEN: Final = 216
_TCPI_LEN_OLD: Final = 136
_TCPI_BYTES_ACKED: Final = 120

#: Connections accepted per readiness event. One, as socketserver does: when more are
#: pending, epoll reports the socket ready again at once, while a speculative second
#: accept() that fails with EAGAIN costs a syscall and an exception on every connection.
ACCEPT_BATCH: Final = 1
_Socket = socket.socket  # inside listener classes, "socket" is the listening socket attribute
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 1.0


@dataclass(slots=True)
class TrafficStats:
    bytes_in: int = 0
    bytes_out: int = 0
    idle_ms: int = 0


#: state @0, last_data_sent @44, last_data_recv @52, bytes_received @128,
#: notsent_bytes @144, bytes_sent @200, bytes_retrans @208: one unpack for everything.
_TCPI_FIELDS: Final = struct.Struct("=B43xI4xI72xQ8xI52xQQ")
_TCPI_FIELDS_OLD: Final = struct.Struct("=B43xI4xI72xQ")
#: A listening socket's accept queue length (``tcpi_unacked`` of a LISTEN socket).
_TCPI_UNACKED: Final = 24


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

    def describe(self, now: float) -> dict[str, Any]:
        stats = tcp_stats(self.sock) if self.sock.fileno() >= 0 else None
        return {
            "id": self.id,
            "peer": self.peer,
            "peer_addr": self.peer_addr,
            "peer_port": self.peer_port,
            "listen": self.listen,
            "started_at": _iso(self.started_wall),
            "age_s": round(now - self.started, 3),
            "bytes_in": stats.bytes_in if stats else None,
            "bytes_out": stats.bytes_out if stats else None,
            "idle_s": round(stats.idle_ms / 1000, 3) if stats else None,
            "pid": self.pid,
            "handler": f"{self.handler_cls.__module__}:{self.handler_cls.__qualname__}",
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


#: Why a connection was closed before its handler ran (``conn.refused``, metrics).
#: ``threads``: no thread (or, forking, no child) could be started for it: the task
#: limit (RLIMIT_NPROC, a cgroup's pids.max) or memory.
REFUSAL_REASONS: Final = ("denied", "max_connections", "max_per_ip", "rate_per_ip", "threads")
#: Which limit paused accepting (``server.throttled``, metrics).
THROTTLE_REASONS: Final = ("max_connections", "max_children", "fd_limit")


class PeerRates:
    """Token buckets for ``server.rate_per_ip``: new connections per second per peer.

    Touched only by the accepting thread, so no lock. A bucket that has filled up again
    holds nothing worth keeping; those are dropped at most once per refill time, which
    bounds memory under a flood from many addresses without a per-connection cost.
    """

    def __init__(self) -> None:
        self._buckets: dict[bytes | str, tuple[float, float]] = {}
        self._next_prune = 0.0

    def allow(self, key: bytes | str, rate: float, burst: int, now: float) -> bool:
        """Take one token from ``key``'s bucket; False (and nothing taken) if it is empty."""
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if now >= self._next_prune:
            self._prune(rate, burst, now)
        return allowed

    def _prune(self, rate: float, burst: int, now: float) -> None:
        self._buckets = {
            key: (tokens, last)
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * rate < burst
        }
        self._next_prune = now + max(1.0, burst / rate)

    def __len__(self) -> int:
        return len(self._buckets)


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

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, Connection] = {}
        self.per_peer: dict[bytes | str, int] = {}
        self.children: dict[int, Connection] = {}
        self.counters = Counters()
        self._ids = itertools.count(1)
        #: Called (outside the lock) whenever a connection closes; wakes whoever waits.
        self.on_close: Callable[[], None] = lambda: None
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


class Hub:
    """What every listener shares: live settings, the registry, the drain flag, the logger.

    Settings are replaced whole on reload (one attribute assignment), so the accept path
    reads a consistent snapshot without a lock.
    """

    def __init__(
        self,
        settings: ServerConfig,
        handler_cls: type[socketserver.BaseRequestHandler],
        registry: Registry,
    ) -> None:
        self.settings = settings
        self.handler_cls = handler_cls
        self.registry = registry
        self.draining = threading.Event()
        self.log: Any = structlog.get_logger()
        self.listen_sockets: Callable[[], Iterable[socket.socket]] = lambda: ()
        self.rules = AccessRules(settings)
        #: Connections that fit in the descriptor limit, leaving a reserve for the
        #: control channel, log files and reload binds (set by the daemon at start).
        self.fd_capacity: int = 1 << 62
        #: Per-peer connection rates (server.rate_per_ip), kept across reloads.
        self.rates = PeerRates()
        #: Threading mode's connection threads; outlives listeners across reloads.
        self.workers = WorkerPool(self._spare_threads(settings))

    def apply(
        self, settings: ServerConfig, handler_cls: type[socketserver.BaseRequestHandler]
    ) -> None:
        self.rules = AccessRules(settings)
        self.handler_cls = handler_cls
        old, self.settings = self.settings, settings
        if (old.rate_per_ip, old.rate_burst) != (settings.rate_per_ip, settings.rate_burst):
            self.rates = PeerRates()  # buckets (and their pruning) follow the new rate
        self.workers.resize(self._spare_threads(settings))

    @staticmethod
    def _spare_threads(settings: ServerConfig) -> int:
        # Forking mode runs no connection threads: let spare ones go.
        return settings.max_spare_threads if settings.mode == "threading" else 0

    def at_capacity(self) -> bool:
        return self.capacity_reason() is not None

    def capacity_reason(self) -> str | None:
        """Which limit stops accepting right now, if any (connections wait in the backlog)."""
        settings = self.settings
        active = self.registry.count()
        if (
            settings.max_connections
            and active >= settings.max_connections
            and settings.on_limit == "wait"
        ):
            return "max_connections"
        if settings.mode == "forking" and active >= settings.max_children:
            return "max_children"
        if active >= self.fd_capacity:
            return "fd_limit"
        return None


class AccessRules:
    """allow/deny CIDR checks and the per-peer key, precomputed as integers for speed."""

    def __init__(self, settings: ServerConfig) -> None:
        self.allow = [self._compile(n) for n in settings.allow]
        self.deny = [self._compile(n) for n in settings.deny]
        self.v6_prefix_bits = settings.ipv6_prefix
        self.active = bool(self.allow or self.deny)

    @staticmethod
    def _compile(net: Network) -> tuple[int, int, int]:
        return (net.version, int(net.network_address), int(net.netmask))

    @staticmethod
    def _as_int(host: str) -> tuple[int, int]:
        if ":" in host:
            if host.startswith("::ffff:") and "." in host:
                return 4, int.from_bytes(socket.inet_aton(host[7:]), "big")
            return 6, int.from_bytes(
                socket.inet_pton(socket.AF_INET6, host.split("%", maxsplit=1)[0]), "big"
            )
        return 4, int.from_bytes(socket.inet_aton(host), "big")

    def permits(self, host: str) -> bool:
        version, value = self._as_int(host)
        for v, net, mask in self.deny:
            if v == version and value & mask == net:
                return False
        if not self.allow:
            return True
        return any(v == version and value & mask == net for v, net, mask in self.allow)

    def peer_key(self, host: str) -> bytes | str:
        """IPv4 peers count by address, IPv6 peers by their configured prefix."""
        if ":" not in host or (host.startswith("::ffff:") and "." in host):
            return host
        raw = socket.inet_pton(socket.AF_INET6, host.split("%", maxsplit=1)[0])
        bits = self.v6_prefix_bits
        value = int.from_bytes(raw, "big") >> (128 - bits) << (128 - bits)
        return value.to_bytes(16, "big")


_FALLBACK_LOG: Any = structlog.get_logger()


class SockdHandler(socketserver.BaseRequestHandler):
    """Base for handlers that want more than ``self.request``.

    Under sockd, before ``setup()`` runs:
    - ``self.options``: the ``[server.handler_options]`` table in force at accept time
      (a copy per connection);
    - ``self.log``: a structlog logger bound to this connection (conn_id, peer_addr,
      peer_port, listen; pid in forking mode), created on first use;
    - ``self.draining``: a ``threading.Event`` set when a graceful stop begins, so a
      long-lived handler can finish early. The rule sockd's own handlers follow: at a
      drain, whatever the client already sent is answered; a connection ends at the
      drain only at a request boundary with nothing pending to read
      (``if self.draining.is_set() and not self.input_pending(): break``). A connection
      taken from the listen queue at a stop starts with the flag already set, and its
      client's request is usually waiting in the socket.
    Run by a bare socketserver, the class defaults apply (empty options, a plain logger,
    a drain flag that is never set). A plain ``BaseRequestHandler`` runs unchanged
    under sockd; it just does not get these.
    """

    options: dict[str, Any] = {}  # noqa: RUF012  # replaced per connection by sockd
    draining: threading.Event = threading.Event()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        """Problems with ``handler_options``, found when the config is loaded.

        Override to validate your options: each returned string becomes a config error
        ``server.handler_options: <string>`` (exit 78 at start, a rejected reload later).
        """
        return []

    def input_pending(self) -> bool:
        """Whether the client sent bytes not read from ``self.request`` yet (or closed).

        Never waits. It sees the socket only: bytes already in a buffered reader of your
        own (``makefile``) are yours to check first.
        """
        return input_pending(self.request)

    _sockd_conn: Connection | None = None
    _log_override: Any = None

    @property
    def log(self) -> Any:
        if self._log_override is not None:
            return self._log_override
        conn = self._sockd_conn
        return conn.log if conn is not None else _FALLBACK_LOG

    @log.setter
    def log(self, value: Any) -> None:
        self._log_override = value


class ListenerMixin:
    """Behaviour shared by both modes; mixed in before the socketserver class."""

    hub: Hub
    address: Address
    label: str
    socket: _Socket
    RequestHandlerClass: Callable[..., socketserver.BaseRequestHandler]
    inherited: bool
    _kind: tuple[int, int, int]

    def __init__(
        self, hub: Hub, address: Address, sock: _Socket | None = None, inherited: bool = False
    ) -> None:
        # The socketserver class after us in the MRO; its own socket is replaced at once
        # by ours (bound here, inherited from systemd, or kept across a mode switch).
        super().__init__(  # type: ignore[call-arg]
            (address.host, address.port), hub.handler_cls, bind_and_activate=False
        )
        self.socket.close()
        self.setup_listener(hub, address, sock, inherited)

    def setup_listener(
        self, hub: Hub, address: Address, sock: _Socket | None, inherited: bool
    ) -> None:
        self.hub = hub
        self.address = address
        self.inherited = inherited
        if sock is None:
            sock = bind_socket(address, hub.settings.request_queue_size, hub.settings.reuse_port)
        sock.setblocking(False)
        self.socket = sock
        bound = sock.getsockname()
        self.label = str(Address(address.host, bound[1]))
        # Plain ints: the socket's family/type properties build enum members on every call.
        self._kind = (int(sock.family), int(sock.type), sock.proto)

    def fileno(self) -> int:
        return self.socket.fileno()

    # socketserver hooks -------------------------------------------------------------
    def get_request(self) -> tuple[ConnSocket, Any]:
        fd, addr = self.socket._accept()  # type: ignore[attr-defined]  # avoids a second socket object
        sock = ConnSocket(*self._kind, fileno=fd)
        sock.sockd_conn = None
        return sock, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Access rules and limits, checked before any handler code runs."""
        hub = self.hub
        settings = hub.settings
        host: str = client_address[0]
        if hub.rules.active and not hub.rules.permits(host):
            hub.registry.refused("denied")
            return False
        if (
            settings.on_limit == "refuse"
            and settings.max_connections
            and hub.registry.count() >= settings.max_connections
        ):
            hub.registry.refused("max_connections")
            return False
        per_peer = settings.max_per_ip or settings.rate_per_ip
        key = hub.rules.peer_key(host) if per_peer else host
        if settings.max_per_ip and hub.registry.peer_count(key) >= settings.max_per_ip:
            hub.registry.refused("max_per_ip")
            return False
        if settings.rate_per_ip and not hub.rates.allow(
            key, settings.rate_per_ip, settings.rate_burst, time.monotonic()
        ):
            hub.registry.refused("rate_per_ip")
            return False
        conn = Connection(
            hub.registry.next_id(),
            request,
            client_address,
            self.label,
            key,
            hub.handler_cls,
            dict(settings.handler_options),
            hub.log,
        )
        request.sockd_conn = conn
        hub.registry.add(conn)
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Instantiate the handler; sockd-aware handlers get options, logger and drain flag."""
        conn: Connection | None = getattr(request, "sockd_conn", None)
        cls = conn.handler_cls if conn is not None else self.RequestHandlerClass
        if conn is not None and isinstance(cls, type) and issubclass(cls, SockdHandler):
            handler = cls.__new__(cls)
            handler.options = conn.options
            handler._sockd_conn = conn
            handler.draining = self.hub.draining
            cls.__init__(handler, request, client_address, self)  # type: ignore[arg-type]
        else:
            cls(request, client_address, self)  # type: ignore[arg-type]

    def handle_error(self, request: Any, client_address: Any) -> None:
        conn: Connection | None = getattr(request, "sockd_conn", None)
        log = conn.log if conn is not None else self.hub.log
        exc = sys.exc_info()[1]
        log.error(
            "handler.error",
            error=f"{type(exc).__name__}: {exc}",
            exc_info=True,
        )

    def refuse(self, request: _Socket) -> None:
        with contextlib.suppress(OSError):
            request.close()

    def shutdown_request(self, request: Any) -> None:
        """socketserver's: end our side with a FIN, then close; during a drain, without a reset.

        Closing a socket whose peer's bytes were never read makes the kernel send a
        reset instead of a FIN, and the client cannot tell whether its request ran. A
        handler that ends at the drain signal before reading the request it was handed
        (a connection taken from the backlog at the stop) must not reset it, so during a
        drain what the peer already sent is read and dropped first (one Event check per
        connection otherwise).
        """
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        if self.hub.draining.is_set():
            discard_input(request)
        self.close_request(request)  # type: ignore[attr-defined]  # the socketserver class's


class ThreadingListener(ListenerMixin, socketserver.ThreadingTCPServer):
    """``mode = "threading"``: socketserver's thread per connection, daemon threads.

    Threads are daemon threads and ``block_on_close`` is off because the daemon drains
    with a deadline itself; the standard library's join on close has none. A thread
    that finished a connection may serve the next one (``server.max_spare_threads``,
    see ``sockd.workers``): starting threads is most of the cost of a short connection.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        conn: Connection = request.sockd_conn
        try:
            self.hub.workers.submit(
                self.process_request_thread, (request, client_address), f"conn-{conn.id}"
            )
        except RuntimeError:
            # "can't start new thread": the process is at its thread limit (RLIMIT_NPROC,
            # a cgroup's pids.max, memory for stacks). A refusal like any other limit:
            # counted, in the rate-limited conn.refused summary, no traceback per peer.
            self.hub.registry.unadmit(conn, "threads")
            close_gently(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn: Connection = request.sockd_conn
        if logs.enabled(logs.DEBUG):
            conn.log.debug("conn.open")
        ended = "closed"
        try:
            self.finish_request(request, client_address)
        except _PEER_GONE:
            ended = "peer_gone"  # the client hung up mid-reply: not a server bug
        except BaseException:
            # SystemExit and KeyboardInterrupt too: raised by a handler they would only
            # end this thread, with the traceback on raw stderr and the connection
            # logged as closed normally.
            ended = "error"
            self.handle_error(request, client_address)
        finally:
            stats = tcp_stats(request)
            self.shutdown_request(request)
            if conn.close_reason is not None:
                ended = conn.close_reason
            registry = self.hub.registry
            if registry.claim(conn):
                # The canonical line is written before the connection stops counting as
                # active: whoever sees it gone can rely on its conn.close being out.
                log_close(conn, stats, ended)
                registry.remove(conn, stats, error=ended == "error")


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


#: The peer went away while the handler was using the socket: an ordinary end.
_PEER_GONE: Final = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
#: How a forked child reports how its connection ended.
_EXIT_PEER_GONE: Final = 3
_ENDED_BY_EXIT: Final = {0: "closed", 1: "error", _EXIT_PEER_GONE: "peer_gone"}

#: Signals whose inherited Python handlers make no sense in a forked child.
_CHILD_SIGNALS: Final = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)


class ForkingListener(ListenerMixin, socketserver.ForkingTCPServer):
    """``mode = "forking"``: socketserver's process per connection, reaped by the daemon.

    ``ForkingMixIn`` waits inside the serving loop when at ``max_children`` and reaps
    only from that loop; that stalls stopping and the watchdog. Here the loop stops
    accepting at the cap instead (connections wait in the backlog), and the daemon's
    main thread reaps on ``SIGCHLD``. The parent keeps its copy of each connection's
    socket until the child exits, to read live byte counts and to close it on demand.
    """

    allow_reuse_address = True
    block_on_close = False

    def service_actions(self) -> None:
        """Reaping is the daemon's job (on SIGCHLD), never a blocking wait in this loop."""

    def process_request(self, request: Any, client_address: Any) -> None:
        conn: Connection = request.sockd_conn
        try:
            pid = os.fork()
        except OSError:
            # EAGAIN/ENOMEM: the task limit (RLIMIT_NPROC, pids.max) that also stops
            # threads; a refusal counted like threading mode's, no traceback per peer.
            self.hub.registry.unadmit(conn, "threads")
            close_gently(request)
            return
        if pid:
            conn.pid = pid
            with self.hub.registry.lock:
                self.hub.registry.children[pid] = conn
            if logs.enabled(logs.DEBUG):
                conn.log.debug("conn.open")
            return
        # Child: this must never return, hence os._exit().
        status = 1
        try:
            self._become_child(conn)
            conn.pid = os.getpid()
            conn.log = None
            try:
                self.finish_request(request, client_address)
                status = 0
            except _PEER_GONE:
                status = _EXIT_PEER_GONE
            except BaseException:  # SystemExit too: a handler error, as in threading mode
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
        except BaseException:
            with contextlib.suppress(BaseException):
                conn.log.exception("server.error", where="forked child")
        finally:
            os._exit(status)

    def _become_child(self, conn: Connection) -> None:
        """Drop what belongs to the parent: its signal handling and other descriptors."""
        signal.set_wakeup_fd(-1)
        for sig in _CHILD_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C reaches the whole process group; the parent decides how to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # SIGTERM (from the parent's drain, or systemd's control-group kill) means
        # "a drain has begun": finish the connection, do not die mid-reply.
        draining = self.hub.draining
        signal.signal(signal.SIGTERM, lambda *_: draining.set())
        for sock in self.hub.listen_sockets():
            with contextlib.suppress(OSError):
                sock.close()
        registry = self.hub.registry
        registry.lock = threading.Lock()  # may have been held by another thread at fork
        for other in list(registry.active.values()):
            if other is not conn:
                with contextlib.suppress(OSError):
                    other.sock.close()

    def close_request(self, request: Any) -> None:
        """The parent keeps the descriptor until the child exits (see the class docstring)."""


def finish_child(registry: Registry, pid: int, status: int) -> None:
    """Account for a reaped child: close the parent's copy and log the canonical line."""
    with registry.lock:
        conn = registry.children.get(pid)
    if conn is None:
        return
    stats = tcp_stats(conn.sock)
    with contextlib.suppress(OSError):
        conn.sock.close()
    extra: dict[str, Any] = {}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        ended = conn.close_reason or "killed"
        extra["signal"] = name
        with registry.lock:
            registry.counters.children_killed += 1
        conn.log.warning("child.exited", signal=name)
    else:
        code = os.WEXITSTATUS(status)
        ended = conn.close_reason or _ENDED_BY_EXIT.get(code, "error")
        if code not in _ENDED_BY_EXIT:
            extra["exit_status"] = code
            conn.log.warning("child.exited", exit_status=code)
    if registry.claim(conn):
        log_close(conn, stats, ended, **extra)
        registry.remove(conn, stats, error=ended == "error")


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
# connection attempts) and passes everything else. For a TCP socket the kernel runs it
# with the packet's data at the TCP header, so byte 13 holds the flags.
_SO_ATTACH_FILTER: Final = 26
_DROP_SYN_PROGRAM: Final = (
    (0x30, 0, 0, 13),  # ldb [13]          A = TCP flags
    (0x54, 0, 0, 0x12),  # and #0x12         A &= SYN|ACK
    (0x15, 0, 1, 0x02),  # jeq #SYN, +0, +1  a bare SYN...
    (0x06, 0, 0, 0),  # ret #0            ...is dropped
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1     everything else passes
)
_DROP_SYN_CODE: Final = ctypes.create_string_buffer(
    b"".join(struct.pack("HBBI", *insn) for insn in _DROP_SYN_PROGRAM)
)


def stop_handshakes(sock: socket.socket) -> bool:
    """Make a listening socket ignore new connection attempts (SYNs); False if unsupported.

    Used at a stop, before the accept queue is emptied: handshakes already complete
    stay in the queue and are taken; a new SYN is dropped, so its client retries and,
    once the socket is closed, is refused (ECONNREFUSED) instead of completing a
    connection that the close would then reset. Handshakes that were half done (the
    SYN-ACK sent, the client's ACK not yet in) still complete: their ACK passes. The
    filter stays until the socket is closed: only for a socket no other process holds.
    """
    program = struct.pack("HP", len(_DROP_SYN_PROGRAM), ctypes.addressof(_DROP_SYN_CODE))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True


def accept_queue_length(sock: socket.socket) -> int:
    """Connections completed by the kernel and waiting in a listening socket's queue."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
    except OSError:
        return 0
    if len(info) < _TCPI_UNACKED + 4:
        return 0
    (queued,) = struct.unpack_from("I", info, _TCPI_UNACKED)
    return int(queued)


def bind_socket(address: Address, backlog: int, reuse_port: bool) -> socket.socket:
    """Bind and listen on ``address``; raise OSError with the address in the message."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "[::]:9000" means IPv6 only; list "0.0.0.0:9000" too for IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock


Listener = ThreadingListener | ForkingListener
LISTENER_CLASSES: Final[dict[str, type[ThreadingListener] | type[ForkingListener]]] = {
    "threading": ThreadingListener,
    "forking": ForkingListener,
}

_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)
_ACCEPT_TRANSIENT_ERRORS: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
)


class Acceptor:
    """The serving loop: one thread, every listener, woken at once by a self-pipe."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.listeners: dict[Address, Listener] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.paused = False
        self._registered = False
        self._backoff = 0.0
        self._backoff_until = 0.0
        self._last_accept_error_log = 0.0
        self._suppressed_accept_errors = 0
        #: Heartbeats the daemon asked for and the last one this loop answered.
        self._beats_asked = 0
        self._beats_answered = 0
        hub.listen_sockets = lambda: [lst.socket for lst in list(self.listeners.values())]

    @property
    def throttled(self) -> bool:
        """Not accepting because of a limit (not a pause): a closing connection must wake us."""
        return not self._registered and not self.paused and bool(self.listeners)

    # ---------------------------------------------------------------- thread control
    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="acceptor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run ``fn`` on the serving thread between accepts and wait for it."""
        if self._thread is None or not self._thread.is_alive():
            fn()
            return
        if not self._post(fn).wait(timeout):
            raise TimeoutError("the serving loop did not answer")

    def _post(self, fn: Callable[[], None]) -> threading.Event:
        """Queue ``fn`` for the serving thread's next turn; the event is set once it ran."""
        done = threading.Event()
        with self._lock:
            self._commands.append((fn, done))
        self.wake()
        return done

    def answers(self, timeout: float) -> bool:
        """Whether the serving loop takes a turn within ``timeout`` s (True if not running).

        Asked before committing a reload: a loop stuck in a call (user code holding a
        lock it needs) would otherwise apply the new listener table whenever it comes
        back, long after the reload was answered.
        """
        if self._thread is None or not self._thread.is_alive() or self._stop:
            return True
        return self._post(lambda: None).wait(timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the loop; called from another thread (from the loop itself it would deadlock).

        False if the loop did not stop within ``timeout`` (stuck in a call): the caller
        goes on without it.
        """
        self._stop = True
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            return self._stopped.wait(timeout)
        return True

    def beat(self) -> bool:
        """Whether this loop answered the previous heartbeat; asks for the next one.

        The daemon's main loop calls this before each watchdog ping: the ping goes out
        only while both loops turn. True when the loop is not running (before start,
        after a stop): there is nothing to wait for.
        """
        if self._thread is None or not self._thread.is_alive() or self._stop:
            return True
        answered = self._beats_answered == self._beats_asked
        self._beats_asked += 1
        self.wake()
        return answered

    # ---------------------------------------------------------------- listeners
    def add(self, listener: Listener) -> None:
        def do() -> None:
            self.listeners[listener.address] = listener
            self._sync_registration(force=True)

        self.call(do)

    def remove(self, address: Address) -> Listener | None:
        removed: list[Listener] = []

        def do() -> None:
            listener = self.listeners.pop(address, None)
            if listener is not None:
                removed.append(listener)
            self._sync_registration(force=True)

        self.call(do)
        return removed[0] if removed else None

    def replace(self, listeners: dict[Address, Listener]) -> None:
        """Swap the listener table without waiting for the serving loop.

        Called in a reload's commit phase, where nothing may block or fail: the table
        (the daemon's view, and what the loop registers from) changes at once, and the
        loop re-registers on its next turn. Until then a listener it still watches but
        that is no longer in the table is skipped, and its socket may be closed under
        it (see ``_accept``); a new one is watched from that turn on.
        """
        self.listeners = dict(listeners)  # a new dict, never mutated: safe to read anywhere
        if self._thread is None or not self._thread.is_alive():
            self._sync_registration(force=True)
            return
        self._post(lambda: self._sync_registration(force=True))

    def set_paused(self, paused: bool) -> None:
        def do() -> None:
            self.paused = paused
            self._sync_registration()

        self.call(do)

    # ---------------------------------------------------------------- the loop
    def _want_accepting(self, now: float) -> bool:
        return not self.paused and now >= self._backoff_until and not self.hub.at_capacity()

    def _sync_registration(self, force: bool = False) -> None:
        want = self._want_accepting(time.monotonic())
        if want == self._registered and not force:
            return
        if not want and not self.paused:
            reason = self.hub.capacity_reason()
            if reason is not None:
                self.hub.registry.throttled(reason)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._selector.unregister(key.fileobj)
        if want:
            for listener in self.listeners.values():
                try:
                    self._selector.register(listener.socket, selectors.EVENT_READ, listener)
                except (OSError, ValueError, KeyError):
                    # Closed by a reload swapping the table under this loop: the swap
                    # has queued a re-registration from the new table already.
                    continue
        self._registered = want

    def _timeout(self, now: float) -> float | None:
        deadlines = []
        if self._backoff_until > now:
            deadlines.append(self._backoff_until - now)
        if not self._registered and self.hub.at_capacity():
            deadlines.append(0.5)  # a safety net: closes also wake us
        return max(0.0, min(deadlines)) if deadlines else None

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._sync_registration(force=True)
            while not self._stop:
                now = time.monotonic()
                ready = self._selector.select(self._timeout(now))
                if self._stop:
                    break
                for key, _ in ready:
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._accept(key.data)
                self.service_actions()
        finally:
            self._stopped.set()

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass
        self._beats_answered = self._beats_asked
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, done in commands:
            try:
                fn()
            except Exception:
                self.hub.log.exception("server.error", where="serving loop command")
            finally:
                done.set()

    def service_actions(self) -> None:
        """Once per loop turn: re-check limits and back-off."""
        self._sync_registration()

    def _accept(self, listener: Listener) -> None:
        if self.listeners.get(listener.address) is not listener:
            # Retired by a reload not yet applied here (``replace``): the daemon takes
            # its queue. Re-register from the new table now.
            self._sync_registration(force=True)
            return
        for _ in range(ACCEPT_BATCH):
            if self.hub.at_capacity():
                self._sync_registration()
                return
            try:
                request, client_address = listener.get_request()
            except (BlockingIOError, InterruptedError):
                self._backoff = 0.0
                return
            except OSError as exc:
                if listener.socket.fileno() < 0:
                    return  # closed by a reload between the check above and the accept
                self._accept_failed(exc)
                return
            self._backoff = 0.0
            try:
                if listener.verify_request(request, client_address):
                    listener.process_request(request, client_address)
                else:
                    listener.refuse(request)
            except Exception:
                self.hub.log.exception("server.error", where="process_request")
                conn = request.sockd_conn
                if conn is not None:
                    self.hub.registry.remove(conn, None)
                listener.refuse(request)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors or buffers: back off instead of spinning, log rate-limited."""
        now = time.monotonic()
        with self.hub.registry.lock:
            self.hub.registry.counters.accept_errors += 1
        if exc.errno in _ACCEPT_RESOURCE_ERRORS:
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
            self._backoff_until = now + self._backoff
            self._sync_registration()
        elif exc.errno not in _ACCEPT_TRANSIENT_ERRORS:
            self._backoff = BACKOFF_MAX
            self._backoff_until = now + self._backoff
            self._sync_registration()
        if now - self._last_accept_error_log >= 1.0:
            self.hub.log.error(
                "accept.error",
                error=os.strerror(exc.errno) if exc.errno else str(exc),
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                suppressed=self._suppressed_accept_errors,
                backoff_s=round(self._backoff, 3),
            )
            self._last_accept_error_log = now
            self._suppressed_accept_errors = 0
        else:
            self._suppressed_accept_errors += 1
