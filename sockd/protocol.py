"""Vocabulary shared by the daemon and ``sockctl``: API version, error codes, exit codes.

This is a leaf module: it imports nothing from the package, so ``sockctl`` can use it
without pulling in the daemon (``sockctl`` imports nothing else of ``sockd`` but the
version; a test checks which modules ``import sockctl.cli`` loads). Presentation
(messages, tables) lives elsewhere; this module only fixes the names and numbers other
tools depend on: the answers' shapes (``TypedDict``: the daemon's views return them and
``sockctl``'s client is typed by them, so mypy checks both ends against one
declaration), the HTTP status of each error code (``STATUS_OF``), the metric catalogue
(``METRICS``: name, kind, help, labels; ``GET /metrics`` and ``GET /v1/stats`` are both
built from it), log levels, the default paths, the ranges of every
number the control API accepts (both ends check them, so ``sockctl`` refuses locally
what the daemon would refuse), and ``path_entries``, the walk over the directories a
control-socket path passes through that both ends judge it by (sockd refuses to create
its socket where another user could replace it; sockctl trusts a directory's owner only
where root handed that directory out).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, Final, Literal, TypedDict

#: Bumped on any incompatible change to an endpoint's request or response shape.
API_VERSION: Final = 1
API_PREFIX: Final = "/v1"
#: Every control response carries this header; ``sockctl`` refuses to talk to a daemon
#: whose value differs from its own ``API_VERSION``.
API_VERSION_HEADER: Final = "X-Sockd-Api-Version"

DEFAULT_CONTROL_SOCKET: Final = "/run/sockd/control.sock"
DEFAULT_CONFIG_PATH: Final = "/etc/sockd/sockd.toml"
CONTROL_SOCKET_ENV: Final = "SOCKD_CONTROL_SOCKET"
#: Bodies larger than this are refused with 413 before they are read.
MAX_REQUEST_BODY: Final = 64 * 1024
#: ``POST /v1/stop {"timeout": T}``: seconds, 0 to this (a day, as ``server.shutdown_timeout``).
MAX_STOP_TIMEOUT: Final = 86400.0
#: ``DELETE /v1/connections/{id}``: ids are 0 to this (a signed 64-bit integer).
MAX_CONNECTION_ID: Final = 2**63 - 1
#: ``GET /v1/logs?n=N``: 0 to this many events of history.
LOGS_MAX_N: Final = 100_000

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: Other spellings ``sockctl`` accepts for a level (``warn``, as syslog, journalctl and
#: Python's own ``logging.WARN`` spell it). It sends the canonical name: the control API
#: knows only ``LOG_LEVELS``.
LOG_LEVEL_ALIASES: Final = {"warn": "warning"}


class State(StrEnum):
    """What the daemon is doing, as ``GET /v1/status`` reports it."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    RELOADING = "reloading"
    DRAINING = "draining"
    STOPPED = "stopped"


class ErrorCode(StrEnum):
    """Stable codes in ``{"error": {"code": ..., "message": ...}}`` bodies."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TIMEOUT = "timeout"
    CONFLICT = "conflict"
    LENGTH_REQUIRED = "length_required"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_CONFIG = "invalid_config"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


#: The HTTP status of each error code (docs/control-api.md lists the same table).
STATUS_OF: Final[Mapping[ErrorCode, int]] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.TIMEOUT: 408,
    ErrorCode.CONFLICT: 409,
    ErrorCode.LENGTH_REQUIRED: 411,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.INVALID_CONFIG: 422,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class ExitCode(IntEnum):
    """Exit statuses of ``sockd`` and ``sockctl``, in the LSB/``systemctl`` tradition."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_RUNNING = 3
    PERMISSION = 4
    VERSION_MISMATCH = 5
    CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop


MetricKind = Literal["counter", "gauge"]


# --------------------------------------------------------------------------- answers
# The shapes of the control API's JSON answers (docs/control-api.md). ``sockd.views``
# returns them, ``sockctl.client`` checks an answer has every required key of its shape.
# A key a daemon may lack is declared in a ``total=False`` base: ``NotRequired`` written
# as a string annotation (``from __future__ import annotations``) is still counted as
# required by Python 3.11's ``__required_keys__``, which the client's check reads.


class ConnectionCounts(TypedDict):
    active: int
    total: int
    refused: int


class Change(TypedDict):
    key: str
    old: Any
    new: Any


class _OptionalLastReload(TypedDict, total=False):
    changes: list[Change]
    errors: list[str]


class LastReload(_OptionalLastReload):
    at: str
    result: str
    generation: int


class _OptionalStatus(TypedDict, total=False):
    #: ``"systemd"`` when systemd started the daemon (``$NOTIFY_SOCKET`` or
    #: ``$INVOCATION_ID`` in its environment), else None.
    supervisor: str | None


class Status(_OptionalStatus):
    """``GET /v1/status``."""

    api_version: int
    pid: int
    version: str
    state: str
    started_at: str
    uptime_s: float
    mode: str
    handler: str
    listen: list[str]
    config_path: str | None
    generation: int
    log_level: str
    connections: ConnectionCounts
    last_reload: LastReload | None


class Connection(TypedDict):
    """One entry of ``GET /v1/connections``."""

    id: int
    peer: str
    listen: str
    started_at: str
    age_s: float
    bytes_in: int | None  # None when the kernel's TCP_INFO could not be read
    bytes_out: int | None
    pid: int | None


class ConnectionList(TypedDict):
    connections: list[Connection]


class Closed(TypedDict):
    closed: int


class ConfigDump(TypedDict):
    """``GET /v1/config``."""

    path: str | None
    generation: int
    config: dict[str, dict[str, Any]]


class ReloadResult(TypedDict):
    result: str
    generation: int
    changes: list[Change]


class _OptionalStopResult(TypedDict, total=False):
    #: As in ``Status``: ``"systemd"`` when systemd started the daemon.
    supervisor: str | None


class StopResult(_OptionalStopResult):
    state: str
    timeout: float
    active: int


class StateResult(TypedDict):
    state: str


class LogLevelResult(TypedDict):
    level: str
    previous: str


class ReopenResult(TypedDict):
    reopened: bool
    output: str


class StatSample(TypedDict):
    #: Empty for an unlabelled metric; ``{"reason": "max_connections"}`` for a labelled one.
    labels: dict[str, str]
    value: float


class Stat(TypedDict):
    """One metric of ``GET /v1/stats``: its catalogue entry and its current samples."""

    name: str
    kind: MetricKind
    help: str
    samples: list[StatSample]


class Stats(TypedDict):
    """``GET /v1/stats``: the numbers of ``GET /metrics``, as JSON, in catalogue order."""

    metrics: list[Stat]


#: One structured log event as the daemon's ring buffer holds it (``event``, ``level``,
#: ``timestamp`` and free-form fields).
LogEvent = dict[str, Any]


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric as ``GET /metrics`` declares it (``# HELP``, ``# TYPE``) and its labels."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()


#: Every metric the daemon exports, in the order it exports them. Adding one here and a
#: value for it in ``sockd.views`` is all it takes (a test checks they agree).
METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("sockd_connections_open", "gauge", "Connections open now."),
    MetricSpec("sockd_connections_total", "counter", "Connections accepted."),
    MetricSpec(
        "sockd_connections_refused_total",
        "counter",
        "Connections refused by a limit or access rule.",
        ("reason",),
    ),
    MetricSpec("sockd_bytes_received_total", "counter", "Bytes received on closed connections."),
    MetricSpec("sockd_bytes_sent_total", "counter", "Bytes sent on closed connections."),
    MetricSpec("sockd_handler_errors_total", "counter", "Connections whose handler raised."),
    MetricSpec("sockd_accept_errors_total", "counter", "accept() failures."),
    MetricSpec(
        "sockd_throttled_total",
        "counter",
        "Times accepting paused at a limit (new connections wait in the backlog).",
        ("reason",),
    ),
    MetricSpec(
        "sockd_threads_started_total",
        "counter",
        "Threading mode: connection threads started (other connections reused one).",
    ),
    MetricSpec(
        "sockd_threads_spare",
        "gauge",
        "Threading mode: finished threads waiting to serve the next connection.",
    ),
    MetricSpec("sockd_children_killed_total", "counter", "Forked children that ended by a signal."),
    MetricSpec("sockd_reloads_total", "counter", "Reloads by result.", ("result",)),
    MetricSpec("sockd_uptime_seconds", "gauge", "Seconds since start."),
    MetricSpec("sockd_info", "gauge", "Version and mode.", ("mode", "version")),
)
METRICS_BY_NAME: Final[Mapping[str, MetricSpec]] = {spec.name: spec for spec in METRICS}


# --------------------------------------------------------------------------- paths


def relative_to_config(value: str, config_path: str) -> str:
    """A relative file path made absolute against the config file's directory.

    Not against the working directory: that is "/" after --daemon, and sockctl, which
    reads ``control.socket`` from the same file, runs from anywhere. Absolute paths and
    empty strings are returned as they are.
    """
    if not value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config_path)), value))


def iso_time(ts: float) -> str:
    """A wall-clock time as the control API writes it: UTC, microseconds, ``Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


# --------------------------------------------------------------------------- socket paths


@dataclass(frozen=True, slots=True)
class PathEntry:
    """A directory or symbolic link that looking up a path goes through (``lstat``)."""

    path: str
    info: os.stat_result

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.info.st_mode)


_MAX_LINKS: Final = 40  # as the kernel's ELOOP limit


def path_entries(path: str) -> tuple[list[PathEntry], bool]:
    """Every directory and symlink the lookup of ``path``'s parent directory goes through.

    Walked from ``/`` as the kernel resolves it: a symlink's target is walked in its
    place and ``..`` applies after resolution. Whoever can replace any of these entries
    can make ``path`` name another file. Returns the entries in order (the last
    directory is the one that would hold ``path``'s final component) and whether the
    walk reached that directory: False when a component does not exist yet. Raises
    ``OSError`` for a component that is not a directory, or a symlink loop.
    """
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    pending = [p for p in path.split("/")[:-1] if p and p != "."]
    current = "/"
    entries = [PathEntry("/", os.lstat("/"))]
    links = 0
    while pending:
        name = pending.pop(0)
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return entries, False
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), candidate)
            entries.append(PathEntry(candidate, info))
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending[:0] = [p for p in target.split("/") if p and p != "."]
            continue
        if not stat.S_ISDIR(info.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), candidate)
        entries.append(PathEntry(candidate, info))
        current = candidate
    return entries, True


def writable_by_others(info: os.stat_result) -> bool:
    """Group or world write permission (a user other than the owner may change entries)."""
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def sticky(info: os.stat_result) -> bool:
    """The sticky bit: only an entry's owner (or the directory's) may rename or remove it."""
    return bool(info.st_mode & stat.S_ISVTX)


def untrusted_entry(
    entries: list[PathEntry], owners: Collection[int], sticky_ok: Callable[[int], bool]
) -> tuple[PathEntry, Literal["owner", "writable"]] | None:
    """The first entry another user could replace, and why, as sshd's StrictModes judges.

    An entry must belong to one of ``owners``; a directory may be writable by group or
    others only with the sticky bit, and only where ``sticky_ok(index)`` allows it (the
    control socket's own directory never: anyone could plant a socket in it). Returns
    the entry and what is wrong with it (its owner, or others' write permission), or
    None when the whole path is trusted; callers word the refusal for their file.
    """
    for index, entry in enumerate(entries):
        info = entry.info
        if info.st_uid not in owners:
            return entry, "owner"
        if (
            not entry.is_link
            and writable_by_others(info)
            and not (sticky(info) and sticky_ok(index))
        ):
            return entry, "writable"
    return None
