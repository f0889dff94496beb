"""The daemon's read views: what the control channel's read endpoints answer.

Owns the answers of ``GET /v1/status``, ``/v1/connections``, ``/v1/config``, ``/metrics``,
``/v1/stats`` and ``/v1/logs`` (history and follow), typed by the shapes
``sockd.protocol`` declares for ``sockctl`` too, built from the connection registry, the hub (the
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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from sockd import __version__, metrics
from sockd.admission import REFUSAL_REASONS, THROTTLE_REASONS
from sockd.config import Config, to_dict
from sockd.protocol import (
    API_VERSION,
    METRICS,
    METRICS_BY_NAME,
    ConfigDump,
    Connection,
    LastReload,
    State,
    Stats,
    Status,
    iso_time,
)

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

    def status(self) -> Status:
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
            "last_reload": cast(LastReload, last_reload.as_dict()) if last_reload else None,
            "supervisor": daemon.supervisor,
        }

    def connections(self) -> list[Connection]:
        now = time.monotonic()
        conns = sorted(self._registry.snapshot(), key=lambda c: c.id)
        return [cast(Connection, c.describe(now)) for c in conns]

    def effective_config(self) -> ConfigDump:
        daemon = self._daemon
        return {
            "path": daemon.config_path,
            "generation": daemon.generation,
            "config": to_dict(daemon.config),
        }

    def _metrics(self) -> list[metrics.Metric]:
        """Every metric of the catalogue (``sockd.protocol.METRICS``) with its samples now."""
        registry, hub, counters = self._registry, self._hub, self._registry.counters
        uptime = round(time.monotonic() - self._daemon.started, 3)
        # Labelled counters list every reason from the start, at 0: rate() alerts work
        # before the first refusal, and a typo in one shows as a missing series.
        values: dict[str, float | Mapping[str, float]] = {
            "sockd_connections_open": registry.count(),
            "sockd_connections_total": counters.total,
            "sockd_connections_refused_total": {
                **dict.fromkeys(REFUSAL_REASONS, 0),
                **counters.refused,
            },
            "sockd_bytes_received_total": counters.bytes_in,
            "sockd_bytes_sent_total": counters.bytes_out,
            "sockd_handler_errors_total": counters.handler_errors,
            "sockd_accept_errors_total": counters.accept_errors,
            "sockd_throttled_total": {**dict.fromkeys(THROTTLE_REASONS, 0), **counters.throttled},
            "sockd_threads_started_total": hub.workers.started,
            "sockd_threads_spare": hub.workers.spare,
            "sockd_children_killed_total": counters.children_killed,
            "sockd_reloads_total": self._daemon.reloads,
            "sockd_uptime_seconds": uptime,
        }
        info = {"version": __version__, "mode": hub.settings.mode}
        out: list[metrics.Metric] = []
        for spec in METRICS:
            if spec.name == "sockd_info":
                samples: tuple[metrics.Sample, ...] = (metrics.Sample(1, info),)
            else:
                value = values[spec.name]
                if isinstance(value, Mapping):
                    (label,) = spec.labels
                    samples = tuple(metrics.Sample(v, {label: k}) for k, v in sorted(value.items()))
                else:
                    samples = (metrics.Sample(value),)
            out.append(metrics.Metric(spec.name, spec.kind, spec.help, samples))
        return out

    def metrics_text(self) -> str:
        return metrics.render(self._metrics())

    def stats(self) -> Stats:
        return {
            "metrics": [
                {
                    "name": m.name,
                    "kind": METRICS_BY_NAME[m.name].kind,
                    "help": m.help,
                    "samples": [
                        {"labels": dict(sample.labels), "value": sample.value}
                        for sample in m.samples
                    ],
                }
                for m in self._metrics()
            ]
        }

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]:
        return self._logs.ring.history(n, min_level)

    def log_subscribe(self, min_level: str) -> Subscription:
        return self._logs.ring.subscribe(min_level)
