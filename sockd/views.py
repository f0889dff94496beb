"""The daemon's read views: what the control channel's read endpoints answer.

Owns the answers of ``GET /v1/status``, ``/v1/connections``, ``/v1/config``, ``/metrics``
and ``/v1/logs`` (history and follow), built from the connection registry, the hub (the
serving settings, the worker pool), the acceptor's listeners, the log system and the
daemon's own state (``DaemonState``: generation, lifecycle state, last reload), which it
only reads: the daemon's main thread is the one writer. ``Daemon`` delegates the read
half of ``sockd.control.ControlBackend`` here and implements the state-changing half.

Secret settings are hidden where the daemon records them (``last_reload``, for every
role) and, for readers, by the control API (``GET /v1/config``): this module shows the
effective configuration whole, as an admin sees it.

Imports from the package only what it reads: config, logs, metrics, protocol and the
serving modules. Never ``sockd.daemon`` (which composes it) nor ``sockd.control``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from sockd import __version__, metrics
from sockd.admission import REFUSAL_REASONS, THROTTLE_REASONS
from sockd.config import Config, to_dict
from sockd.protocol import API_VERSION, State, iso_time

if TYPE_CHECKING:
    from sockd.acceptor import Acceptor
    from sockd.admission import Hub
    from sockd.connections import Registry
    from sockd.logs import LogSystem, Subscription


class Record(Protocol):
    """A reload as ``GET /v1/status`` shows it (secret settings already hidden)."""

    def as_dict(self) -> dict[str, Any]: ...


class DaemonState(Protocol):
    """The daemon's own state that the views read."""

    @property
    def config(self) -> Config: ...

    @property
    def config_path(self) -> str | None: ...

    @property
    def generation(self) -> int: ...

    @property
    def state(self) -> State: ...

    @property
    def started_wall(self) -> float:
        """``time.time()`` at start."""
        ...

    @property
    def started(self) -> float:
        """``time.monotonic()`` at start."""
        ...

    @property
    def last_reload(self) -> Record | None: ...

    @property
    def reloads(self) -> dict[str, int]:
        """Reloads by result (``applied``, ``rejected``)."""
        ...

    @property
    def supervisor(self) -> str | None:
        """``"systemd"`` when systemd started us, else None."""
        ...


class Views:
    """The read half of the control backend, over the daemon's parts and state."""

    def __init__(
        self,
        daemon: DaemonState,
        registry: Registry,
        hub: Hub,
        acceptor: Acceptor,
        logs: LogSystem,
    ) -> None:
        self._daemon = daemon
        self._registry = registry
        self._hub = hub
        self._acceptor = acceptor
        self._logs = logs

    def status(self) -> dict[str, Any]:
        daemon, registry = self._daemon, self._registry
        counters = registry.counters
        last_reload = daemon.last_reload
        return {
            "api_version": API_VERSION,
            "pid": os.getpid(),
            "version": __version__,
            "state": str(daemon.state),
            "started_at": iso_time(daemon.started_wall),
            "uptime_s": round(time.monotonic() - daemon.started, 3),
            "mode": self._hub.settings.mode,
            "handler": daemon.config.server.handler,
            "listen": [lst.label for lst in self._acceptor.listeners.values()],
            "config_path": daemon.config_path,
            "generation": daemon.generation,
            "log_level": self._logs.level_name,
            "connections": {
                "active": registry.count(),
                "total": counters.total,
                "refused": sum(counters.refused.values()),
            },
            "last_reload": last_reload.as_dict() if last_reload else None,
            "supervisor": daemon.supervisor,
        }

    def connections(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [c.describe(now) for c in sorted(self._registry.snapshot(), key=lambda c: c.id)]

    def effective_config(self) -> dict[str, Any]:
        daemon = self._daemon
        return {
            "path": daemon.config_path,
            "generation": daemon.generation,
            "config": to_dict(daemon.config),
        }

    def metrics_text(self) -> str:
        registry, hub = self._registry, self._hub
        counters = registry.counters
        return metrics.render(
            [
                metrics.gauge("sockd_connections_open", "Connections open now.", registry.count()),
                metrics.counter("sockd_connections_total", "Connections accepted.", counters.total),
                metrics.labelled_counter(
                    "sockd_connections_refused_total",
                    "Connections refused by a limit or access rule.",
                    "reason",
                    # Every reason from the start, at 0: rate() alerts work before the
                    # first refusal, and a typo in one shows as a missing series.
                    {**dict.fromkeys(REFUSAL_REASONS, 0), **counters.refused},
                ),
                metrics.counter(
                    "sockd_bytes_received_total",
                    "Bytes received on closed connections.",
                    counters.bytes_in,
                ),
                metrics.counter(
                    "sockd_bytes_sent_total",
                    "Bytes sent on closed connections.",
                    counters.bytes_out,
                ),
                metrics.counter(
                    "sockd_handler_errors_total",
                    "Connections whose handler raised.",
                    counters.handler_errors,
                ),
                metrics.counter(
                    "sockd_accept_errors_total", "accept() failures.", counters.accept_errors
                ),
                metrics.labelled_counter(
                    "sockd_throttled_total",
                    "Times accepting paused at a limit (new connections wait in the backlog).",
                    "reason",
                    {**dict.fromkeys(THROTTLE_REASONS, 0), **counters.throttled},
                ),
                metrics.counter(
                    "sockd_threads_started_total",
                    "Threading mode: connection threads started (other connections reused one).",
                    hub.workers.started,
                ),
                metrics.gauge(
                    "sockd_threads_spare",
                    "Threading mode: finished threads waiting to serve the next connection.",
                    hub.workers.spare,
                ),
                metrics.counter(
                    "sockd_children_killed_total",
                    "Forked children that ended by a signal.",
                    counters.children_killed,
                ),
                metrics.labelled_counter(
                    "sockd_reloads_total", "Reloads by result.", "result", self._daemon.reloads
                ),
                metrics.gauge(
                    "sockd_uptime_seconds",
                    "Seconds since start.",
                    round(time.monotonic() - self._daemon.started, 3),
                ),
                metrics.gauge(
                    "sockd_info",
                    "Version and mode.",
                    1,
                    version=__version__,
                    mode=hub.settings.mode,
                ),
            ]
        )

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]:
        return self._logs.ring.history(n, min_level)

    def log_subscribe(self, min_level: str) -> Subscription:
        return self._logs.ring.subscribe(min_level)
