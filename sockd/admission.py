"""Admission: which connections are let in, when accepting pauses, and when one is timed out.

Owns the access rules (``AccessRules``: allow/deny CIDRs, the per-peer key), the
per-peer connection rates (``PeerRates``), and the ``Hub`` every listener shares: the
live settings, the check run on each accepted connection before any handler code
(``Hub.admit``: rules, limits, then the ``Connection`` registered), the capacity that
pauses accepting (``Hub.capacity_reason``: connections wait in the backlog), and the
idle and max-duration sweeps (``Hub.sweep``) run by the daemon's housekeeping.

May import ``sockd.connections``, ``sockd.config`` and ``sockd.workers``; never the
listeners, the accept loop or the daemon, which build on it.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import structlog

from sockd.config import Network, ServerConfig
from sockd.connections import Connection, ConnSocket, Registry, tcp_stats
from sockd.workers import WorkerPool

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


class Hub:
    """What every listener shares: live settings, the registry, the drain flag, the logger.

    Settings are replaced whole on reload (one attribute assignment), so the accept path
    reads a consistent snapshot without a lock. Its collaborators come through the
    constructor: ``log`` (the daemon's logger; structlog's default when standalone) and
    ``listen_sockets``, which returns the listening sockets of the moment (a forked child
    closes its copies of them).
    """

    def __init__(
        self,
        settings: ServerConfig,
        handler_cls: type[socketserver.BaseRequestHandler],
        registry: Registry,
        *,
        log: Any = None,
        listen_sockets: Callable[[], Iterable[socket.socket]] = lambda: (),
    ) -> None:
        self.settings = settings
        self.handler_cls = handler_cls
        self.registry = registry
        #: Set when a graceful stop begins; one per hub (a handler gets it in its
        #: constructor, ``SockdHandler.__init__``), never a class attribute.
        self.draining = threading.Event()
        self.log: Any = log if log is not None else structlog.get_logger()
        self.listen_sockets = listen_sockets
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

    def admit(self, request: ConnSocket, client_address: Any, listen: str) -> bool:
        """Access rules and limits, checked before any handler code runs.

        Admitted: the connection is registered and rides on ``request.sockd_conn`` to
        the thread or child that serves it. Refused: counted, nothing registered.
        """
        settings = self.settings
        registry = self.registry
        host: str = client_address[0]
        if self.rules.active and not self.rules.permits(host):
            registry.refused("denied")
            return False
        if (
            settings.on_limit == "refuse"
            and settings.max_connections
            and registry.count() >= settings.max_connections
        ):
            registry.refused("max_connections")
            return False
        per_peer = settings.max_per_ip or settings.rate_per_ip
        key = self.rules.peer_key(host) if per_peer else host
        if settings.max_per_ip and registry.peer_count(key) >= settings.max_per_ip:
            registry.refused("max_per_ip")
            return False
        if settings.rate_per_ip and not self.rates.allow(
            key, settings.rate_per_ip, settings.rate_burst, time.monotonic()
        ):
            registry.refused("rate_per_ip")
            return False
        conn = Connection(
            registry.next_id(),
            request,
            client_address,
            listen,
            key,
            self.handler_cls,
            dict(settings.handler_options),
            self.log,
        )
        request.sockd_conn = conn
        registry.add(conn)
        return True

    def sweep(self) -> None:
        """Cut connections idle for ``idle_timeout`` or older than ``max_connection_duration``.

        Idleness is the kernel's (``tcp_stats``): data moving either way counts, so a
        client reading a long download is not idle.
        """
        settings = self.settings
        if settings.idle_timeout:
            self._cut_idle(settings.idle_timeout * 1000)
        if settings.max_connection_duration:
            self._cut_expired(settings.max_connection_duration)

    def _cut_idle(self, limit_ms: float) -> None:
        now = time.monotonic()
        for conn in self.registry.snapshot():
            if conn.close_reason is not None or (now - conn.started) * 1000 < limit_ms:
                continue
            stats = tcp_stats(conn.sock)
            if stats is not None and stats.idle_ms >= limit_ms:
                conn.cut("idle_timeout")

    def _cut_expired(self, limit_s: float) -> None:
        now = time.monotonic()
        for conn in self.registry.snapshot():
            if conn.close_reason is None and now - conn.started >= limit_s:
                conn.cut("max_duration")


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
