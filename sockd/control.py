"""The control channel: a small HTTP/1.1 + JSON API on a Unix stream socket.

This module owns the control socket file (creating it without a window of looser
permissions, replacing a stale one, refusing to clobber a live daemon or a non-socket),
the per-request access check (``SO_PEERCRED``), request parsing and validation, and the
mapping of every endpoint onto a ``ControlBackend`` that the daemon implements. It knows
nothing about how the daemon does any of it: a backend method that must run on the main
thread blocks there, not here.

Endpoints (the contract is ``docs/control-api.md``; ``sockctl`` depends on it):

===========  ==========================  =============================================
method       path                        answer
===========  ==========================  =============================================
GET          /v1/status                  200 ``backend.status()``
GET          /v1/connections             200 ``{"connections": [...]}``
DELETE       /v1/connections/{id}        200 ``{"closed": id}``; 404 unknown id
GET          /v1/config                  200 ``backend.effective_config()``
POST         /v1/reload                  200 ``{"result": "applied", ...}``; 422; 409
POST         /v1/stop                    202 ``backend.stop(timeout)``; body optional
POST         /v1/pause, /v1/resume       200 ``{"state": ...}``; 409 while draining
PUT          /v1/log-level               200 ``{"level": ..., "previous": ...}``
POST         /v1/reopen-logs             200 ``backend.reopen_logs()``
GET          /v1/logs?n=&level=&follow=  200 ``application/x-ndjson``, chunked
GET          /metrics                    200 Prometheus text format 0.0.4
===========  ==========================  =============================================

Request bodies are JSON objects; unknown fields are refused (400) so that a typo such
as ``{"timout": 5}`` fails loudly instead of being ignored. Every number has a range
(``sockd.protocol``: stop timeout 0..86400 s, connection id 0..2**63-1, logs n
0..100000); anything else, including a finite float past it, is a 400. A body must
come with ``Content-Length``, and every ``POST``/``PUT``/``DELETE`` must send one (``0``
for no body): ``Transfer-Encoding``, or no length, is ``411 length_required``. Nothing
is guessed from whether or when bytes follow the head.

Every error is ``{"error": {"code": CODE, "message": TEXT}}`` (``details`` for a
rejected reload) with the status ``docs/control-api.md`` lists for the code; the codes
are ``sockd.protocol.ErrorCode``. Validation raises ``_HTTPError``; backend exceptions
become one in ``_Handler._call`` (``BackendConflict`` 409, ``BackendUnavailable`` 503,
anything else 500 with the traceback logged as ``control.error``, never sent). Every
response carries ``X-Sockd-Api-Version`` and ``Connection: close``: one request per
connection keeps the accounting (deadline, concurrency cap) simple, and control
traffic is tiny.

Access (``SO_PEERCRED``, checked in the accept loop before a thread is spent): root,
the daemon's own uid and members of ``control.group`` may use everything (role
``all``); members of ``control.read_group`` only ``GET`` (role ``read``), and their
``GET /v1/config`` shows the values of settings declared secret (``server.handler_options``)
as ``"<redacted>"`` (``sockd.config.redact``; ``GET /v1/status``'s ``last_reload`` hides
them from every role, the daemon records it so); anyone else gets an
immediate ``403 forbidden`` and the connection is closed, counted in a rate-limited
``control.denied`` line. Each role has its own budget of concurrent connections
(``CONNECTION_BUDGET``) and of log followers (``FOLLOWER_BUDGET``): readers cannot take
the slots an admin needs, and the excess get an immediate ``503``, counted in a
rate-limited ``control.busy`` line. Each request must arrive whole within
``control.request_timeout`` seconds of its accept (one deadline for the head and body,
not per read, so trickling does not extend it).

The socket's directory must be one nobody but root and the daemon's user can change
(``_check_directory``, like sshd's StrictModes); the socket is bound in a private 0700
directory beside it, given its mode and group there through a descriptor that cannot
follow a symlink, then renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import errno
import grp
import http.server
import io
import json
import math
import os
import pwd
import re
import select
import socket
import socketserver
import stat
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

from sockd import __version__
from sockd.config import REDACTED, ControlConfig, redact_config
from sockd.errors import ControlError
from sockd.protocol import (
    API_PREFIX,
    API_VERSION,
    API_VERSION_HEADER,
    LOG_LEVELS,
    LOGS_MAX_N,
    MAX_CONNECTION_ID,
    MAX_REQUEST_BODY,
    MAX_STOP_TIMEOUT,
    ErrorCode,
    path_entries,
    untrusted_entry,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_ACCEPT_BACKOFF: Final = 0.1  # seconds between accept attempts when out of descriptors
#: Concurrent control connections per role, each role from its own budget: readers
#: cannot take an admin's slots, and peers the credential check refuses never get one
#: (they are closed in the accept loop). Each connection holds a thread for at most
#: the request timeout while it sends its request; the excess get an immediate 503
#: written from the accept loop.
CONNECTION_BUDGET: Final[Mapping[str, int]] = {"all": 96, "read": 32}
MAX_CONNECTIONS: Final = CONNECTION_BUDGET["all"]
#: Log followers (``GET /v1/logs?follow=1``) per role, within its connection budget:
#: an admin always keeps ``96 - 64`` slots for requests however many follow.
FOLLOWER_BUDGET: Final[Mapping[str, int]] = {"all": 64, "read": 16}
#: Request line plus headers; control requests are a few hundred bytes.
HEAD_LIMIT: Final = 32 * 1024
#: A client that stops reading our answer (or a log stream) is dropped after this.
WRITE_TIMEOUT: Final = 30.0
#: How long ``close()`` lets in-flight requests finish before cutting their sockets.
CLOSE_GRACE: Final = 2.0
#: Log streaming polls the subscription this often, so a vanished client or a closing
#: server is noticed within this many seconds even when no event arrives.
FOLLOW_POLL: Final = 1.0
#: Denials and 503s are logged as one line per this many seconds at most.
REFUSAL_LOG_EVERY: Final = 1.0

_REQUEST_LINE_LIMIT = 8 * 1024
_LISTEN_BACKLOG = 128
#: Bytes we discard while lingering after answering a request we did not read in full.
_LINGER_BYTES = 256 * 1024
_LINGER_SECONDS = 1.0
#: Events per write when streaming logs.
_BATCH = 500
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_JSON = "application/json"
#: Methods that must say ``Content-Length`` (0 for no body): else ``411``, never a guess.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "DELETE"})
_NDJSON = "application/x-ndjson"
_METRICS = "text/plain; version=0.0.4; charset=utf-8"
_T = TypeVar("_T")

_STATUS_OF: Final[dict[ErrorCode, int]] = {
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


# --------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: applied (new generation, changes) or rejected (errors)."""

    applied: bool
    generation: int
    changes: list[dict[str, Any]]
    errors: list[str]


class BackendConflict(Exception):  # noqa: N818 -- named for the HTTP status it maps to
    """Not possible in the current state; answered ``409 conflict`` with this message."""


class BackendUnavailable(Exception):  # noqa: N818 -- named for the HTTP status it maps to
    """The daemon is stopping and cannot do this any more: ``503 unavailable``."""


class LogSubscription(Protocol):
    """A live feed of log events at or above a level, for ``GET /v1/logs?follow=1``.

    ``read`` returns NDJSON lines (each part ends with a newline), waiting up to
    ``timeout`` seconds for some; an empty list when none came. The feed is bounded
    (``sockd.logs.Subscription``): a follower too slow for it gets a synthetic
    ``logs.dropped`` line where events were lost.
    """

    def read(self, timeout: float) -> list[bytes]: ...

    def close(self) -> None: ...


class ControlBackend(Protocol):
    """What the control channel needs from the daemon; every method is thread-safe."""

    def status(self) -> dict[str, Any]: ...

    def connections(self) -> list[dict[str, Any]]: ...

    def close_connection(self, conn_id: int) -> bool: ...

    def effective_config(self) -> dict[str, Any]: ...

    def reload(self) -> ReloadOutcome: ...

    def reload_check(self) -> ReloadOutcome: ...

    def stop(self, timeout: float | None) -> dict[str, Any]: ...

    def pause(self) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    def set_log_level(self, level: str) -> dict[str, Any]: ...

    def reopen_logs(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]: ...

    def log_subscribe(self, min_level: str) -> LogSubscription:
        """A live feed; ``RuntimeError`` (exactly) when its thread cannot start now."""
        ...


# --------------------------------------------------------------------------- access


Role = Literal["all", "read"]


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a control connection, as the kernel saw it."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return cls(pid, uid, gid)

    def groups(self) -> frozenset[int]:
        """Primary and supplementary gids.

        ``/proc/<pid>/status`` gives the groups the process really has (``setgroups``,
        ``newgrp``, systemd's ``SupplementaryGroups=``); the group database is the
        fallback when the process is gone or its uid no longer matches (the pid may
        have been reused since it connected).
        """
        gids = {self.gid}
        from_proc = _proc_groups(self.pid, self.uid)
        if from_proc is not None:
            return frozenset(gids | from_proc)
        try:
            entry = pwd.getpwuid(self.uid)
        except KeyError:
            return frozenset(gids)
        gids.add(entry.pw_gid)
        with contextlib.suppress(OSError):
            gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return frozenset(gids)


def _proc_groups(pid: int, uid: int) -> set[int] | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    uids = fields.get("Uid", [])
    # SO_PEERCRED records the effective uid at connect(); a mismatch means another
    # process now owns this pid, so its groups say nothing about our peer.
    if len(uids) < 2 or uids[1] != str(uid):
        return None
    try:
        return {int(g) for g in fields.get("Groups", [])}
    except ValueError:
        return None


def _resolve_group(key: str, name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ControlError(f"{key}: no such group {name!r}") from None


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may do what on the control channel (see the table in docs/control-api.md)."""

    own_uid: int
    group_gid: int | None
    read_gid: int | None

    @classmethod
    def from_settings(cls, settings: ControlConfig) -> Policy:
        """Resolve group names now, so a typo fails at start/reload, not at first use."""
        return cls(
            own_uid=os.geteuid(),
            group_gid=_resolve_group("control.group", settings.group),
            read_gid=_resolve_group("control.read_group", settings.read_group),
        )

    def role(self, peer: Peer) -> Role | None:
        if peer.uid in (0, self.own_uid):
            return "all"
        if self.group_gid is None and self.read_gid is None:
            return None
        gids = peer.groups()
        if self.group_gid is not None and self.group_gid in gids:
            return "all"
        if self.read_gid is not None and self.read_gid in gids:
            return "read"
        return None


# --------------------------------------------------------------------------- wire helpers


class _HTTPError(Exception):
    """An answer other than success, raised anywhere below the dispatcher."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = _STATUS_OF[code]
        self.message = message
        self.details = details
        self.headers = list(headers)


class _HeadTooLargeError(Exception):
    """The request line and headers exceed ``HEAD_LIMIT``."""


class _RequestTimeoutError(Exception):
    """The request was not in by its deadline (not an ``OSError``: see ``handle``)."""


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, separators=(",", ":"), default=str) + "\n").encode()


def _error_body(code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": str(code), "message": message}
    if details is not None:
        error["details"] = details
    return _json_bytes({"error": error})


def _head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """Status line and headers of every answer, including the accept loop's 503."""
    reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Server: sockd/{__version__}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"{API_VERSION_HEADER}: {API_VERSION}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _full_response(
    status: int, body: bytes, content_type: str, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    head = _head(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers],
    )
    return head + body


class _DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline and one byte budget.

    A per-``recv`` timeout lets a client that trickles a byte at a time hold a thread
    forever; here every read gets only the time left until the request's deadline.
    The budget caps what a request can make us buffer before it is validated.
    """

    def __init__(self, sock: socket.socket, deadline: float, budget: int) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = deadline
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.budget <= 0:
            raise _HeadTooLargeError
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _RequestTimeoutError
        self._sock.settimeout(remaining)
        with memoryview(buffer) as view:
            try:
                count = self._sock.recv_into(view, min(view.nbytes, self.budget))
            except TimeoutError:
                raise _RequestTimeoutError from None
        self.budget -= count
        return count


class _SocketWriter(io.BufferedIOBase):
    """``wfile`` for the base class: unbuffered, ``sendall`` without ``SIGPIPE``."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        with memoryview(data) as view:
            self._sock.sendall(view, socket.MSG_NOSIGNAL)
            return view.nbytes


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    body: dict[str, Any]
    param: str | None
    role: Role = "all"


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _JSON


@dataclass(frozen=True, slots=True)
class _LogStream:
    n: int
    level: str
    follow: bool


_Answer = _Response | _LogStream
_Endpoint = Callable[[ControlBackend, _Request], _Answer]


def _ok(value: Any, status: int = 200) -> _Response:
    return _Response(status, _json_bytes(value))


def _fields(request: _Request, allowed: dict[str, bool]) -> dict[str, Any]:
    """The JSON body's fields; ``allowed`` maps each known field to whether it is required."""
    unknown = sorted(set(request.body) - set(allowed))
    if unknown:
        raise _HTTPError(
            ErrorCode.BAD_REQUEST,
            f"unknown field {unknown[0]!r} in the request body"
            + (f" (expected {', '.join(allowed)})" if allowed else " (expected no fields)"),
        )
    for name, required in allowed.items():
        if required and name not in request.body:
            raise _HTTPError(ErrorCode.BAD_REQUEST, f"the request body needs a {name!r} field")
    return request.body


def _status(backend: ControlBackend, request: _Request) -> _Answer:
    return _ok(backend.status())


def _connections(backend: ControlBackend, request: _Request) -> _Answer:
    return _ok({"connections": backend.connections()})


_HTTP_VERSION: Final = re.compile(r"HTTP/[0-9]\.[0-9]")


def _shown(text: str, limit: int = 40) -> str:
    """``repr`` of a client's value, cut short: an error message must not echo 4 KB."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def _bounded_int(text: str, maximum: int) -> int | None:
    """``text`` as an integer from 0 to ``maximum``, or None.

    ASCII digits only, and no more of them than ``maximum`` has: ``int()`` stays cheap
    and far from Python's 4300-digit limit.
    """
    if not (0 < len(text) <= len(str(maximum)) and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= maximum else None


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _close_connection(backend: ControlBackend, request: _Request) -> _Answer:
    text = request.param or ""
    conn_id = _bounded_int(text, MAX_CONNECTION_ID)
    if conn_id is None:
        raise _HTTPError(
            ErrorCode.BAD_REQUEST,
            f"connection id must be an integer from 0 to {MAX_CONNECTION_ID}, got {_shown(text)}",
        )
    if not backend.close_connection(conn_id):
        raise _HTTPError(ErrorCode.NOT_FOUND, f"no open connection with id {conn_id}")
    return _ok({"closed": conn_id})


def _config(backend: ControlBackend, request: _Request) -> _Answer:
    answer = backend.effective_config()
    config = answer.get("config")
    if request.role == "all" or not isinstance(config, dict):
        return _ok(answer)
    # Secret settings (declared ``secret``: server.handler_options) are for admins.
    return _ok({**answer, "config": redact_config(config)})


def _reload(backend: ControlBackend, request: _Request) -> _Answer:
    dry_run = _fields(request, {"dry_run": False}).get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise _HTTPError(ErrorCode.BAD_REQUEST, "'dry_run' must be true or false")
    outcome = backend.reload_check() if dry_run else backend.reload()
    if outcome.errors or not (dry_run or outcome.applied):
        count = len(outcome.errors)
        problems = f"the configuration has {count} problem{'' if count == 1 else 's'}"
        raise _HTTPError(
            ErrorCode.INVALID_CONFIG,
            f"dry run: {problems}; nothing was applied"
            if dry_run
            else f"reload rejected: {problems}; the daemon keeps running as before",
            details={"errors": list(outcome.errors), **({"dry_run": True} if dry_run else {})},
        )
    result = "valid" if dry_run else "applied"
    return _ok({"result": result, "generation": outcome.generation, "changes": outcome.changes})


def _stop(backend: ControlBackend, request: _Request) -> _Answer:
    raw = _fields(request, {"timeout": False}).get("timeout")
    timeout: float | None = None
    if raw is not None:
        if (
            isinstance(raw, bool)
            or not isinstance(raw, int | float)
            or not _finite(raw)
            or not 0 <= raw <= MAX_STOP_TIMEOUT
        ):
            shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
            raise _HTTPError(
                ErrorCode.BAD_REQUEST,
                f"'timeout' must be a number of seconds from 0 to {MAX_STOP_TIMEOUT:g}, "
                f"got {shown}",
            )
        timeout = float(raw)
    return _ok(backend.stop(timeout), 202)


def _pause(backend: ControlBackend, request: _Request) -> _Answer:
    _fields(request, {})
    return _ok(backend.pause())


def _resume(backend: ControlBackend, request: _Request) -> _Answer:
    _fields(request, {})
    return _ok(backend.resume())


def _log_level(backend: ControlBackend, request: _Request) -> _Answer:
    level = _fields(request, {"level": True})["level"]
    if not isinstance(level, str) or level not in LOG_LEVELS:
        raise _HTTPError(
            ErrorCode.BAD_REQUEST,
            f"'level' must be one of {', '.join(LOG_LEVELS)}, got {level!r}",
        )
    return _ok(backend.set_log_level(level))


def _reopen_logs(backend: ControlBackend, request: _Request) -> _Answer:
    _fields(request, {})
    return _ok(backend.reopen_logs())


def _metrics(backend: ControlBackend, request: _Request) -> _Answer:
    return _Response(200, backend.metrics_text().encode(), _METRICS)


def _logs(backend: ControlBackend, request: _Request) -> _Answer:
    seen: dict[str, str] = {}
    for name, value in request.query:
        if name not in ("n", "level", "follow"):
            raise _HTTPError(
                ErrorCode.BAD_REQUEST,
                f"unknown query parameter {name!r} (expected n, level, follow)",
            )
        if name in seen:
            raise _HTTPError(ErrorCode.BAD_REQUEST, f"query parameter {name!r} given twice")
        seen[name] = value
    n_text = seen.get("n", "100")
    n = _bounded_int(n_text, LOGS_MAX_N)
    if n is None:
        raise _HTTPError(
            ErrorCode.BAD_REQUEST,
            f"n must be an integer from 0 to {LOGS_MAX_N}, got {_shown(n_text)}",
        )
    level = seen.get("level", "debug")
    if level not in LOG_LEVELS:
        raise _HTTPError(
            ErrorCode.BAD_REQUEST, f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    follow = seen.get("follow", "0").lower()
    if follow not in ("0", "1", "true", "false"):
        raise _HTTPError(
            ErrorCode.BAD_REQUEST, f"follow must be 0, 1, true or false, got {follow!r}"
        )
    return _LogStream(n, level, follow in ("1", "true"))


_ROUTES: Final[dict[str, dict[str, _Endpoint]]] = {
    f"{API_PREFIX}/status": {"GET": _status},
    f"{API_PREFIX}/connections": {"GET": _connections},
    f"{API_PREFIX}/connections/{{id}}": {"DELETE": _close_connection},
    f"{API_PREFIX}/config": {"GET": _config},
    f"{API_PREFIX}/reload": {"POST": _reload},
    f"{API_PREFIX}/stop": {"POST": _stop},
    f"{API_PREFIX}/pause": {"POST": _pause},
    f"{API_PREFIX}/resume": {"POST": _resume},
    f"{API_PREFIX}/log-level": {"PUT": _log_level},
    f"{API_PREFIX}/reopen-logs": {"POST": _reopen_logs},
    f"{API_PREFIX}/logs": {"GET": _logs},
    "/metrics": {"GET": _metrics},
}
_CONNECTION_PREFIX = f"{API_PREFIX}/connections/"


def _route(path: str) -> tuple[dict[str, _Endpoint], str | None] | None:
    if path.startswith(_CONNECTION_PREFIX) and "/" not in path[len(_CONNECTION_PREFIX) :]:
        return _ROUTES[f"{_CONNECTION_PREFIX}{{id}}"], path[len(_CONNECTION_PREFIX) :]
    methods = _ROUTES.get(path)
    return None if methods is None or "{" in path else (methods, None)


# --------------------------------------------------------------------------- handler


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection, one request: parse, check access, validate, dispatch, answer.

    The base class parses the request line and headers; answers are written by
    ``_send`` so that every one, including errors the base class detects, has the same
    JSON shape and headers. Socket errors mean the client went away; backend errors are
    turned into statuses by ``_call``; anything else is our bug and becomes a 500.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"sockd/{__version__}"

    def setup(self) -> None:
        self.owner = cast(_ControlHTTPServer, self.server).owner
        self.sock = cast(socket.socket, self.request)
        self.connection = self.sock
        self.settings = self.owner.settings
        slot = self.owner._slot(self.sock)
        # Who and when were settled in the accept loop: the deadline runs from accept.
        self.peer, self.role, self.started = slot.peer, slot.role, slot.accepted
        self.reader = _DeadlineReader(
            self.sock, self.started + self.settings.request_timeout, HEAD_LIMIT
        )
        self.buffered = io.BufferedReader(self.reader)
        self.rfile = self.buffered
        self.wfile = _SocketWriter(self.sock)
        self.target: str | None = None
        self.response_status: int | None = None
        self.request_consumed = False

    def handle(self) -> None:
        self.close_connection = True
        try:
            self._handle_request()
        except _RequestTimeoutError:
            self._send_error_if_possible(
                _HTTPError(
                    ErrorCode.TIMEOUT,
                    f"request not received within {self.settings.request_timeout:g} s",
                )
            )
        except _HeadTooLargeError:
            self._send_error_if_possible(
                _HTTPError(
                    ErrorCode.BAD_REQUEST, f"request line and headers exceed {HEAD_LIMIT} bytes"
                )
            )
        except OSError:
            pass  # the client went away or stopped reading: nobody to answer
        except Exception:
            self.owner._log.exception("control.error", **self._context())
            self._send_error_if_possible(_internal())
        finally:
            self._log_request()

    def finish(self) -> None:
        if not self.request_consumed and self.response_status is not None:
            self._linger()
        with contextlib.suppress(OSError):
            self.rfile.close()

    # -- base-class hooks -------------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors ``parse_request`` finds (request line, version, headers) are all 400."""
        self._send_error(_HTTPError(ErrorCode.BAD_REQUEST, message or "malformed request"))

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until access, route and size are known to be fine."""
        return True

    def log_message(self, format: str, *args: Any) -> None:
        """The base class writes to stderr; our events go through ``control.request``."""

    # -- the request ------------------------------------------------------------

    def _handle_request(self) -> None:
        line = self.rfile.readline(_REQUEST_LINE_LIMIT + 1)
        if not line:
            self.request_consumed = True
            return  # connected and left without a word (a liveness probe)
        try:
            if len(line) > _REQUEST_LINE_LIMIT:
                raise _HTTPError(
                    ErrorCode.BAD_REQUEST,
                    f"request line longer than {_REQUEST_LINE_LIMIT} bytes",
                )
            self.raw_requestline = line
            if not self.parse_request():
                if self.response_status is None:
                    raise _HTTPError(ErrorCode.BAD_REQUEST, "empty request line")
                return
            try:
                target = urlsplit(self.path)
            except ValueError:
                raise _HTTPError(ErrorCode.BAD_REQUEST, "malformed request target") from None
            self.target = target.path
            self._check_head()
            self._dispatch(self.command, target.path, target.query)
        except _HTTPError as error:
            self._send_error(error)

    def _check_head(self) -> None:
        if not _HTTP_VERSION.fullmatch(self.request_version) or self.request_version in (
            "HTTP/0.9",
            "HTTP/0.8",
        ):
            raise _HTTPError(ErrorCode.BAD_REQUEST, "only HTTP/1.0 and HTTP/1.1 are supported")
        headers = self.headers
        if headers.defects or headers.get_payload():
            raise _HTTPError(ErrorCode.BAD_REQUEST, "malformed header line")
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name):
                raise _HTTPError(ErrorCode.BAD_REQUEST, f"invalid header name {name!r}")
            if "\r" in value or "\n" in value or "\0" in value:
                raise _HTTPError(
                    ErrorCode.BAD_REQUEST,
                    f"header {name!r} is folded or contains control characters",
                )

    def _authorize(self, method: str) -> None:
        """Strangers never get here (closed at accept); a reader only GETs."""
        if self.role == "all" or method == "GET":
            return
        self.owner._denied.record(self.peer.uid, **self._context())
        raise _HTTPError(
            ErrorCode.FORBIDDEN,
            f"uid {self.peer.uid} may only use the read endpoints (GET) of the control channel",
        )

    def _content_length(self, method: str) -> int:
        if "Transfer-Encoding" in self.headers:
            raise _HTTPError(
                ErrorCode.LENGTH_REQUIRED,
                "send request bodies with Content-Length; Transfer-Encoding is not accepted",
            )
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            if method in _BODY_METHODS:
                # Never guessed from what follows the head (nor from its timing): a
                # ``{"dry_run": true}`` a moment late must not become a real reload.
                raise _HTTPError(
                    ErrorCode.LENGTH_REQUIRED,
                    f"a {method} needs a Content-Length header: send Content-Length: 0 "
                    "for no body; with curl: -d '' or --json '{...}'",
                )
            return 0
        text = values.pop()
        length = _bounded_int(text, 10**18 - 1)
        if values or length is None:
            raise _HTTPError(ErrorCode.BAD_REQUEST, "invalid Content-Length header")
        if length > MAX_REQUEST_BODY:
            raise _HTTPError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request body of {length} bytes exceeds the limit of {MAX_REQUEST_BODY}",
            )
        return length

    def _read_body(self, length: int) -> dict[str, Any]:
        if length and self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.reader.budget += length
        raw = self.rfile.read(length) if length else b""
        if len(raw) != length:
            raise _HTTPError(
                ErrorCode.BAD_REQUEST, f"request body ended after {len(raw)} of {length} bytes"
            )
        self.request_consumed = True
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _HTTPError(
                ErrorCode.BAD_REQUEST, f"request body is not valid JSON: {exc}"
            ) from None
        if not isinstance(body, dict):
            raise _HTTPError(ErrorCode.BAD_REQUEST, "request body must be a JSON object")
        return body

    def _dispatch(self, method: str, path: str, query: str) -> None:
        self._authorize(method)
        found = _route(path)
        if found is None:
            raise _HTTPError(ErrorCode.NOT_FOUND, f"no such endpoint: {path}")
        methods, param = found
        endpoint = methods.get(method)
        if endpoint is None:
            allow = ", ".join(sorted(methods))
            raise _HTTPError(
                ErrorCode.METHOD_NOT_ALLOWED,
                f"{path} accepts {allow}, not {method}",
                headers=[("Allow", allow)],
            )
        body = self._read_body(self._content_length(method))
        # The request is in: from here on the clock that matters is the client reading.
        self.sock.settimeout(WRITE_TIMEOUT)
        request = _Request(
            method, path, parse_qsl(query, keep_blank_values=True), body, param, self.role
        )
        backend = self.owner._backend
        answer = self._call(lambda: endpoint(backend, request))
        if isinstance(answer, _LogStream):
            self._stream_logs(backend, answer)
        else:
            self._send(answer.status, answer.body, answer.content_type)

    def _call(self, function: Callable[[], _T]) -> _T:
        """Run backend code; the one place its exceptions become statuses."""
        try:
            return function()
        except _HTTPError:
            raise
        except BackendConflict as exc:
            raise _HTTPError(ErrorCode.CONFLICT, str(exc) or "not possible now") from None
        except BackendUnavailable as exc:
            self.owner._busy.record("stopping", reason="stopping", **self._context())
            raise _HTTPError(ErrorCode.UNAVAILABLE, str(exc) or "the daemon is stopping") from None
        except Exception:
            self.owner._log.exception("control.error", **self._context())
            raise _internal() from None

    # -- answers ----------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = _JSON,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.response_status = status
        self.wfile.write(_full_response(status, body, content_type, headers))

    def _send_error(self, error: _HTTPError) -> None:
        if self.response_status is not None:
            return  # a stream already started: cutting the connection is the only signal
        self._send(
            error.status,
            _error_body(error.code, error.message, error.details),
            headers=error.headers,
        )

    def _send_error_if_possible(self, error: _HTTPError) -> None:
        with contextlib.suppress(OSError):
            self.sock.settimeout(_LINGER_SECONDS)
            self._send_error(error)

    def _stream_logs(self, backend: ControlBackend, stream: _LogStream) -> None:
        """History, then (with follow) live events, until the client or the server goes.

        The subscription is taken before the history is read so that no event falls
        between the two; one logged in that instant may appear twice, none is lost.
        A follower counts against its role's ``FOLLOWER_BUDGET`` until it ends.
        """
        if stream.follow and not self.owner._follow(self.sock):
            limit = self.owner.follower_budget[self.role]
            self.owner._busy.record(self.role, reason="followers", **self._context())
            raise _HTTPError(
                ErrorCode.UNAVAILABLE,
                f"too many log followers: the {self.role!r} role may have {limit} at once; "
                "end one (or read without follow=1) and retry",
            )
        subscription = (
            self._call(lambda: self._subscribe(backend, stream.level)) if stream.follow else None
        )
        try:
            history = self._call(lambda: backend.log_history(stream.n, stream.level))
            # HTTP/1.0 has no chunked encoding: the end of the stream is the close.
            chunked = self.request_version != "HTTP/1.0"
            headers = [("Content-Type", _NDJSON)]
            if chunked:
                headers.append(("Transfer-Encoding", "chunked"))
            self.response_status = 200
            self.wfile.write(_head(200, headers))

            def emit(parts: list[bytes]) -> None:
                """One chunk of NDJSON, written part by part (joining would copy it)."""
                size = sum(len(part) for part in parts)
                if not size:
                    return
                if chunked:
                    self.wfile.write(b"%X\r\n" % size)
                for part in parts:
                    self.wfile.write(part)
                if chunked:
                    self.wfile.write(b"\r\n")

            for start in range(0, len(history), _BATCH):
                emit([_json_bytes(event) for event in history[start : start + _BATCH]])
            if subscription is not None:
                self._follow(subscription, emit)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            if subscription is not None:
                self._call(subscription.close)

    def _subscribe(self, backend: ControlBackend, level: str) -> LogSubscription:
        """``backend.log_subscribe``; a feed whose thread cannot start is a 503, not a 500."""
        try:
            return backend.log_subscribe(level)
        except RuntimeError as exc:
            if type(exc) is not RuntimeError:  # RecursionError, NotImplementedError: bugs
                raise
            # What threading raises at the process's thread limit (RLIMIT_NPROC,
            # pids.max): nothing was subscribed, and a later follow may succeed.
            self.owner._busy.record(self.role, reason="threads", role=self.role, **self._context())
            raise _HTTPError(
                ErrorCode.UNAVAILABLE, "cannot start a thread now for the log stream; try again"
            ) from None

    def _follow(self, subscription: LogSubscription, emit: Callable[[list[bytes]], None]) -> None:
        # Registered for no events, poll() still reports POLLHUP/POLLERR, which on a Unix
        # socket means the client closed both directions. A client that only half-closes
        # (shutdown(SHUT_WR)) still reads, so EOF alone must not end its stream.
        poller = select.poll()
        poller.register(self.sock, 0)
        while not self.owner._closing.is_set():
            emit(self._call(lambda: subscription.read(FOLLOW_POLL)))
            if poller.poll(0):
                return

    def _linger(self) -> None:
        """Half-close, then briefly discard what the client is still sending.

        Closing a Unix socket with unread input makes the client's reads fail with
        ECONNRESET and its writes with EPIPE, so a client still sending a body we
        refused (413, 403) might never see our answer.
        """
        deadline = time.monotonic() + min(_LINGER_SECONDS, self.reader.deadline - time.monotonic())
        discarded = 0
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            while discarded < _LINGER_BYTES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                discarded += len(chunk)

    # -- logging ----------------------------------------------------------------

    @property
    def method(self) -> str | None:
        """The request's method once its request line parsed (the base class sets it)."""
        return cast("str | None", getattr(self, "command", None))

    def _context(self) -> dict[str, Any]:
        return {
            "uid": self.peer.uid,
            "pid": self.peer.pid,
            "method": self.method,
            "path": self.target,
        }

    def _log_request(self) -> None:
        if self.response_status is None and self.method is None:
            return  # nothing was asked and nothing answered
        log = self.owner._log.debug if self.method == "GET" else self.owner._log.info
        log(
            "control.request",
            **self._context(),
            status=self.response_status,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
        )


def _internal() -> _HTTPError:
    return _HTTPError(ErrorCode.INTERNAL, "internal error; the daemon's log has the details")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# --------------------------------------------------------------------------- server


def _file_access(settings: ControlConfig, policy: Policy) -> tuple[int, int | None]:
    """The socket file's mode and group, so that every role the policy grants can connect.

    Connecting to a Unix socket needs write permission on its file, which is checked
    before our credential check ever runs. The file's group is ``control.group``, or
    ``control.read_group`` when only that is set. With both set, one file cannot carry
    two groups, so "other" gets read/write too and the credential check (SO_PEERCRED,
    which refuses everyone outside root, our uid and the two groups) is the gate.
    """
    mode = settings.mode
    if policy.group_gid is not None:
        if policy.read_gid is not None:
            mode |= 0o006
        return mode, policy.group_gid
    return mode, policy.read_gid


class _ControlHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The socketserver for one socket path; ``ControlServer`` owns one at a time.

    Hooks used: ``server_bind`` (checks the path, binds in a private directory, sets
    mode and group), ``server_activate`` (listens, then renames into place),
    ``process_request`` (concurrency cap and thread tracking), ``handle_error`` (log,
    never stderr) and ``server_close`` (unlinks the socket file only if still ours).
    """

    daemon_threads = True
    # The base class would join every handler thread without a deadline on close;
    # ControlServer.close() joins them itself, with one.
    block_on_close = False
    request_queue_size = _LISTEN_BACKLOG

    def __init__(self, owner: ControlServer, settings: ControlConfig, gid: int | None) -> None:
        self.owner = owner
        self.path = settings.socket
        self.mode = settings.mode
        self.gid = gid
        self.identity: tuple[int, int] | None = None
        self._tmpdir: str | None = None
        self._tmppath: str | None = None
        super().__init__(settings.socket, _Handler)

    def server_bind(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        _ensure_directory(self.path, parent)
        _refuse_if_taken(self.path)
        # A private 0700 directory instead of a temporary umask: umask is per process,
        # and other threads of the daemon may be creating files at the same moment.
        self._tmpdir = tempfile.mkdtemp(prefix=".sd", dir=parent)
        self._tmppath = os.path.join(self._tmpdir, "s")
        if len(os.fsencode(self._tmppath)) > 107:
            raise ControlError(
                f"cannot create control socket {self.path}: its directory name is too long "
                "for a temporary name (AF_UNIX paths are limited to 107 bytes)"
            )
        self.socket.bind(self._tmppath)
        info = _set_access(self._tmppath, self.mode, self.gid, None)
        self.identity = (info.st_dev, info.st_ino)
        self.server_address = self.path

    def server_activate(self) -> None:
        # Listen before the rename: a client (or a second sockd probing for a live
        # instance) must never find the final path bound but refusing connections.
        if self._tmppath is None:
            raise ControlError("internal: the control socket was activated before binding")
        self.socket.listen(self.request_queue_size)
        os.rename(self._tmppath, self.path)
        self._tmppath = None
        self._remove_tmpdir()
        _LIVE_SERVERS.add(self)

    def get_request(self) -> tuple[Any, Any]:
        """Out of descriptors (a handler hogging them): use the reserve, or back off.

        socketserver ignores an ``OSError`` from accept and selects again at once; the
        still-pending connection would make that a 100% CPU spin.
        """
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if self.owner._spend_reserve():
                return super().get_request()
            self.owner._closing.wait(_ACCEPT_BACKOFF)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Credentials and budget first, in this (the accept) thread: a peer the policy
        refuses, or one over its role's budget, is answered and closed without a thread.

        Resolving a peer's role is free for root and the daemon's uid; for others with
        a group configured it reads ``/proc/<pid>/status`` once (~20 us).
        """
        sock = cast(socket.socket, request)
        owner = self.owner
        accepted = time.monotonic()
        try:
            peer = Peer.of(sock)
        except OSError:  # gone already
            self.shutdown_request(sock)
            return
        role = owner._policy.role(peer)
        if role is None:
            owner._denied.record(peer.uid, uid=peer.uid, pid=peer.pid, method=None, path=None)
            _refuse(
                sock,
                403,
                ErrorCode.FORBIDDEN,
                f"uid {peer.uid} may not use the control channel",
            )
            self.shutdown_request(sock)
            return
        if not owner._admit(sock, peer, role, accepted):
            self._refuse_busy(sock, peer, role, "connections")
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(sock, client_address),
            name="sockd-control-conn",
            daemon=True,
        )
        owner._track(sock, thread)
        try:
            thread.start()
        except RuntimeError:  # cannot start a new thread: answer like the cap does
            owner._release(sock)
            self._refuse_busy(sock, peer, role, "threads")

    def _refuse_busy(self, sock: socket.socket, peer: Peer, role: Role, reason: str) -> None:
        self.owner._busy.record(
            role, reason=reason, role=role, uid=peer.uid, pid=peer.pid, method=None, path=None
        )
        limit = self.owner.budget[role]
        _refuse(
            sock,
            503,
            ErrorCode.UNAVAILABLE,
            f"too many control connections for the {role!r} role (limit {limit}); try again"
            if reason == "connections"
            else "cannot start a thread for this control connection; try again",
        )
        self.shutdown_request(sock)

    def service_actions(self) -> None:
        """Between accepts (at least every poll interval): log pending refusal summaries."""
        self.owner._flush_refusals()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._release(cast(socket.socket, request))

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.owner._log.exception("control.error", path=self.path)

    def server_close(self) -> None:
        _LIVE_SERVERS.discard(self)
        super().server_close()
        if self._tmppath is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmppath)
        self._remove_tmpdir()
        if self.identity is not None:
            _unlink_if_ours(self.path, self.identity)
            self.identity = None

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmpdir)
            self._tmpdir = None

    def _drop_in_child(self) -> None:
        """Close our descriptors in a forked child, touching nothing on disk."""
        self.identity = None
        with contextlib.suppress(OSError):
            self.socket.close()
        # No lock: the child has a single thread, and a lock held at fork time by a
        # thread that does not exist here would never be released.
        for sock in list(self.owner._active):
            with contextlib.suppress(OSError):
                sock.close()


#: Listening servers, for the fork hook below.
_LIVE_SERVERS: weakref.WeakSet[_ControlHTTPServer] = weakref.WeakSet()


def _drop_in_child() -> None:
    """A forked child (``forking`` mode) must not hold the control socket open.

    If it did, connections would queue in a backlog nobody accepts once the daemon
    dies, and the next sockd's liveness probe would take the socket for a live one.
    """
    for server in list(_LIVE_SERVERS):
        server._drop_in_child()


os.register_at_fork(after_in_child=_drop_in_child)


def _ensure_directory(path: str, parent: str) -> None:
    """Check the socket's directory (creating it if missing) is ours to trust."""
    if _check_directory(path):
        return
    try:
        _make_directories(parent)
    except OSError as exc:
        raise ControlError(
            f"cannot create control socket directory {parent}: {exc.strerror}"
        ) from None
    if not _check_directory(path):
        raise ControlError(
            f"cannot create control socket directory {parent}: not there after creating it"
        )


def _make_directories(parent: str) -> None:
    """Create the missing directories of ``parent``, mode 0755, following no new symlink.

    The existing part was just judged by ``_check_directory``. Each missing component is
    made with ``mkdir`` relative to a descriptor of the one above, then opened with
    ``O_NOFOLLOW`` and given its mode through that descriptor: if another user (in a
    sticky directory such as ``/tmp``) gets there first with a symlink or a directory of
    their own, it is refused and nothing is changed through it (``makedirs`` and
    ``chmod`` by path would follow the link and change its target).
    """
    existing, missing = parent, list[str]()
    while not os.path.lexists(existing):
        existing, name = os.path.split(existing)
        missing.insert(0, name)
    fd = os.open(existing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in missing:
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False  # made since we looked: judged below like any other
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise ControlError(
                    f"refusing to create control socket directory {parent}: "
                    f"{os.path.join(existing, name)} appeared as a symlink or a file, not "
                    "a directory (another user racing us?)"
                ) from None
            os.close(fd)
            fd = child
            existing = os.path.join(existing, name)
            info = os.fstat(fd)
            if info.st_uid not in (0, os.geteuid()):
                raise ControlError(
                    f"refusing to create control socket directory {parent}: {existing} "
                    f"appeared, owned by {_who(info.st_uid)} (another user racing us?)"
                )
            if created:
                # mkdir's mode is filtered by the umask; 0755 lets group members (and
                # others the socket's own mode admits) reach the socket.
                os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _check_directory(path: str) -> bool:
    """Refuse a socket path another user could redirect; False if its directory is missing.

    Like sshd's StrictModes: every directory and symlink the path's lookup goes through
    must belong to root or to the daemon's euid, and no directory may be writable by
    group or others, except an ancestor with the sticky bit (``/tmp``: others cannot
    rename what we own in it). The socket's own directory may not be writable by others
    even with the sticky bit: anyone could plant a socket there while we are stopped,
    and ``sockctl`` would talk to it.
    """
    euid = os.geteuid()
    try:
        entries, complete = path_entries(path)
    except OSError as exc:
        raise ControlError(
            f"cannot create control socket {path}: {exc.filename}: {exc.strerror}"
        ) from None
    found = untrusted_entry(
        entries, (0, euid), lambda index: not (complete and index == len(entries) - 1)
    )
    if found is not None:
        entry, why = found
        info = entry.info
        kind = "symlink" if entry.is_link else "directory"
        problem = (
            f"is owned by {_who(info.st_uid)}"
            if why == "owner"
            else f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
        )
        raise ControlError(
            f"refusing to create control socket {path}: {kind} {entry.path} {problem}; "
            f"the socket's directory and those above it must belong to root or "
            f"{_who(euid)} and not be writable by others (a directory above may be, "
            "with the sticky bit, like /tmp), or another user could replace the socket"
        )
    return complete


def _set_access(
    path: str, mode: int, gid: int | None, identity: tuple[int, int] | None
) -> os.stat_result:
    """Set the socket file's mode and group without following a path swapped in.

    The file is opened with ``O_PATH | O_NOFOLLOW`` (a symlink at ``path`` is opened as
    the link itself), checked to be a socket (and, with ``identity``, ours), and changed
    through ``/proc/self/fd``, which names that very inode: whatever happens at
    ``path`` afterwards, nothing else is touched. (``fchmod`` on the socket's own
    descriptor changes the socket object, not the file it is bound to.)

    All or nothing: a group the daemon cannot give the file (not root, and not a member
    of it) is refused before anything changes; the group is changed before the mode
    (a mode meant for a group must never apply to the old one); and if either change
    fails, the previous mode and group are put back.
    """
    if gid is not None:
        _check_can_chown(path, gid)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode) or (
            identity is not None and (info.st_dev, info.st_ino) != identity
        ):
            raise ControlError(
                f"control socket {path} was removed or replaced by something else; "
                "restart sockd to recreate it"
            )
        by_fd = f"/proc/self/fd/{fd}"
        old_mode, old_gid = stat.S_IMODE(info.st_mode), info.st_gid
        try:
            if gid is not None and old_gid != gid:
                os.chown(by_fd, -1, gid)
            if old_mode != mode:
                os.chmod(by_fd, mode)
        except BaseException:
            # Mode first: while the old group is back, the new mode must not be in force.
            with contextlib.suppress(OSError):
                os.chmod(by_fd, old_mode)
            with contextlib.suppress(OSError):
                os.chown(by_fd, -1, old_gid)
            raise
        return os.fstat(fd)
    finally:
        os.close(fd)


def _check_can_chown(path: str, gid: int) -> None:
    """Refuse a group an unprivileged daemon cannot give its socket (EPERM otherwise).

    Only root (CAP_CHOWN) may give a file a group its owner is not in; the daemon's own
    groups are its effective gid and its supplementary groups.
    """
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return
    try:
        name = f"{grp.getgrgid(gid).gr_name!r} (gid {gid})"
    except KeyError:
        name = f"gid {gid}"
    raise ControlError(
        f"cannot give control socket {path} the group {name}: sockd runs as "
        f"{_who(os.geteuid())}, which is not a member of it (only root can); add the "
        "user to the group, or choose one of its groups"
    )


def _refuse_if_taken(path: str) -> None:
    """Leave a stale socket to be replaced; refuse a live one or anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nobody listens (its daemon died without cleaning up)
    except (TimeoutError, BlockingIOError):
        pass  # a full backlog: somebody is listening
    except OSError as exc:
        raise ControlError(f"cannot probe control socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"another sockd is already running on control socket {path}")


def _unlink_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file unless something else has been put at that path since."""
    try:
        info = os.lstat(path)
    except OSError:
        return
    if (info.st_dev, info.st_ino) == identity:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _refuse(sock: socket.socket, status: int, code: ErrorCode, message: str) -> None:
    """Answer from the accept loop without blocking it (the send buffer is empty).

    What the client already sent is read and dropped first: closing a Unix socket with
    unread input would make the client's read fail with ECONNRESET before our answer.
    """
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        for _ in range(4):
            if len(sock.recv(65536)) < 65536:
                break
    with contextlib.suppress(OSError):
        sock.send(_full_response(status, _error_body(code, message), _JSON), socket.MSG_NOSIGNAL)


class _Tally:
    """Refusals of one kind, logged as one line a second at most, never one per peer.

    The first refusal after a quiet second is logged at once with its details; the
    ones that follow within the second are counted (by ``key``: a uid, a role) and
    logged as one summary line when the second is over (``flush``, from the accept
    loop at least every poll interval, and at close).
    """

    def __init__(self, log: Any, event: str, key_name: str) -> None:
        self._log = log
        self.event = event
        self.key_name = key_name
        self.total = 0
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last = -math.inf

    def record(self, key: object, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            quiet = not self._pending and now - self._last >= REFUSAL_LOG_EVERY
            if quiet:
                self._last = now
            else:
                self._pending[str(key)] = self._pending.get(str(key), 0) + 1
        if quiet:
            self._log.warning(self.event, count=1, **fields)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._pending or (not force and now - self._last < REFUSAL_LOG_EVERY):
                return
            pending, self._pending = self._pending, {}
            self._last = now
        self._log.warning(
            self.event, count=sum(pending.values()), **{self.key_name: pending}, summary=True
        )


@dataclass(slots=True)
class _Slot:
    """One admitted control connection: who, in which role, since when, on which thread."""

    peer: Peer
    role: Role
    accepted: float
    thread: threading.Thread | None = None
    following: bool = False


class ControlServer:
    """The control channel: owns the socket file and serves the API in daemon threads.

    ``start()`` and ``apply()`` raise ``ControlError`` with an operator-facing message;
    ``close()`` never raises. All three are meant for the daemon's main thread.
    """

    def __init__(
        self,
        settings: ControlConfig,
        backend: ControlBackend,
        log: Any,
        *,
        budget: Mapping[str, int] = CONNECTION_BUDGET,
        follower_budget: Mapping[str, int] = FOLLOWER_BUDGET,
    ) -> None:
        self.settings = settings
        self._backend = backend
        self._log = log
        #: Concurrent connections and log followers per role (``all``, ``read``).
        self.budget = dict(budget)
        self.follower_budget = dict(follower_budget)
        self._policy = Policy(os.geteuid(), None, None)
        self._closing = threading.Event()
        #: One descriptor held back so the control channel can still accept a client
        #: when handlers have used up the process's descriptor limit.
        self._reserve_fd: int | None = None
        self._lock = threading.Lock()  # start/apply/close
        self._conn_lock = threading.Lock()  # the connection table and its counts
        self._active: dict[socket.socket, _Slot] = {}
        self._in_use: dict[str, int] = dict.fromkeys(self.budget, 0)
        self._following: dict[str, int] = dict.fromkeys(self.follower_budget, 0)
        #: Peers refused for their credentials, and 503s; ``.total`` counts them all.
        self._denied = _Tally(log, "control.denied", "uids")
        self._busy = _Tally(log, "control.busy", "roles")
        self._server: _ControlHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        """Where the socket currently is (the configured path once started)."""
        return self.settings.socket

    def start(self) -> None:
        """Resolve groups, create the socket file and start serving."""
        with self._lock:
            if self._server is not None:
                raise ControlError("the control channel is already started")
            if self._closing.is_set():
                raise ControlError("the control channel has been closed")
            policy = Policy.from_settings(self.settings)
            self._server, self._serve_thread = self._open(self.settings, policy)
            self._policy = policy
        self._restore_reserve()

    def apply(self, settings: ControlConfig) -> None:
        """Reconfigure live; on ``ControlError`` the old settings stay in force."""
        with self._lock:
            server = self._server
            if server is None or self._closing.is_set():
                self.settings = settings
                return
            policy = Policy.from_settings(settings)
            if settings.socket != server.path:
                new_server, new_thread = self._open(settings, policy)
                old_thread = self._serve_thread
                self._server, self._serve_thread = new_server, new_thread
                self.settings, self._policy = settings, policy
                # In-flight requests on the old socket finish; its file goes away now.
                _stop_serving(server, old_thread)
                return
            self._restyle(server, settings, policy)
            self.settings, self._policy = settings, policy

    def close(self, timeout: float = CLOSE_GRACE) -> None:
        """Stop accepting, remove our socket file, let in-flight requests finish.

        Requests still running after ``timeout`` seconds have their sockets shut down
        (a log stream notices within ``FOLLOW_POLL``); handler threads are daemonic, so
        one blocked inside the backend cannot keep the process alive.
        """
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            server, thread = self._server, self._serve_thread
            self._server = self._serve_thread = None
        self._spend_reserve()
        if server is not None:
            _stop_serving(server, thread)
            self._log.info("control.closed", path=server.path)
        self._flush_refusals(force=True)
        deadline = time.monotonic() + timeout
        if not self._join_handlers(deadline):
            with self._conn_lock:
                stuck = list(self._active)
            for sock in stuck:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._join_handlers(time.monotonic() + 1.0)

    @property
    def refusals(self) -> dict[str, int]:
        """Control connections refused since start: ``denied`` (credentials, 403) and
        ``busy`` (a role's connection or follower budget, or the daemon stopping: 503)."""
        return {"denied": self._denied.total, "busy": self._busy.total}

    # -- connection table (called by _ControlHTTPServer) --------------------------

    def _admit(self, sock: socket.socket, peer: Peer, role: Role, accepted: float) -> bool:
        with self._conn_lock:
            if self._in_use.get(role, 0) >= self.budget.get(role, 0):
                return False
            self._in_use[role] = self._in_use.get(role, 0) + 1
            self._active[sock] = _Slot(peer, role, accepted)
            return True

    def _slot(self, sock: socket.socket) -> _Slot:
        with self._conn_lock:
            return self._active[sock]

    def _track(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._conn_lock:
            slot = self._active.get(sock)
            if slot is not None:
                slot.thread = thread

    def _follow(self, sock: socket.socket) -> bool:
        """Take one of the role's follower slots for this connection, if one is free."""
        with self._conn_lock:
            slot = self._active[sock]
            if self._following.get(slot.role, 0) >= self.follower_budget.get(slot.role, 0):
                return False
            self._following[slot.role] = self._following.get(slot.role, 0) + 1
            slot.following = True
            return True

    def _release(self, sock: socket.socket) -> None:
        with self._conn_lock:
            slot = self._active.pop(sock, None)
            if slot is not None:
                self._in_use[slot.role] -= 1
                if slot.following:
                    self._following[slot.role] -= 1
        self._restore_reserve()

    def _flush_refusals(self, force: bool = False) -> None:
        self._denied.flush(force)
        self._busy.flush(force)

    def _spend_reserve(self) -> bool:
        """Free the descriptor kept for when the process runs out: one more client fits."""
        with self._conn_lock:
            fd, self._reserve_fd = self._reserve_fd, None
        if fd is None:
            return False
        os.close(fd)
        return True

    def _restore_reserve(self) -> None:
        if self._reserve_fd is not None:
            return
        with contextlib.suppress(OSError), self._conn_lock:
            if self._reserve_fd is None:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def active_connections(self) -> int:
        with self._conn_lock:
            return len(self._active)

    @property
    def followers(self) -> int:
        with self._conn_lock:
            return sum(self._following.values())

    # -- internals -------------------------------------------------------------

    def _open(
        self, settings: ControlConfig, policy: Policy
    ) -> tuple[_ControlHTTPServer, threading.Thread]:
        mode, gid = _file_access(settings, policy)
        try:
            server = _ControlHTTPServer(self, dataclasses.replace(settings, mode=mode), gid)
        except OSError as exc:
            raise ControlError(
                f"cannot create control socket {settings.socket}: {exc.strerror or exc}"
            ) from None
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="sockd-control-serve",
            daemon=True,
        )
        thread.start()
        self._log.info(
            "control.listening",
            path=settings.socket,
            mode=f"0{settings.mode:o}",
            group=settings.group,
            read_group=settings.read_group,
        )
        return server, thread

    def _restyle(self, server: _ControlHTTPServer, settings: ControlConfig, policy: Policy) -> None:
        """Apply a new mode or group to the socket file we already serve on.

        The directory is checked again (its owner or mode may have changed since), and
        the file is changed through a descriptor of the very inode we created, never
        through a path a symlink could have been swapped into.
        """
        identity = server.identity
        if identity is None:
            raise ControlError(f"control socket {server.path} is not ours any more")
        _check_directory(server.path)
        mode, file_gid = _file_access(settings, policy)
        gid = file_gid if file_gid is not None else os.getegid()
        try:
            _set_access(server.path, mode, gid, identity)
        except FileNotFoundError:
            raise ControlError(
                f"control socket {server.path} was removed; restart sockd to recreate it"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"cannot change control socket {server.path}: {exc.strerror}"
            ) from None
        server.mode, server.gid = mode, file_gid

    def _join_handlers(self, deadline: float) -> bool:
        """Wait for handler threads until ``deadline``; True when none is left."""
        me = threading.current_thread()
        while True:
            with self._conn_lock:
                threads = [
                    slot.thread
                    for slot in self._active.values()
                    if slot.thread is not None and slot.thread is not me
                ]
            if not threads:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            threads[0].join(remaining)


def _stop_serving(server: _ControlHTTPServer, thread: threading.Thread | None) -> None:
    # serve_forever() looks at its shutdown flag only between select() calls, up to
    # poll_interval apart. A shut-down listening socket stays readable (accept() then
    # fails with EINVAL), so the loop sees the flag at once; new clients are refused.
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)
    if thread is not None and thread.is_alive():
        server.shutdown()  # returns once serve_forever() has seen the request
        thread.join()
    server.server_close()


__all__ = [
    "CLOSE_GRACE",
    "CONNECTION_BUDGET",
    "FOLLOWER_BUDGET",
    "FOLLOW_POLL",
    "HEAD_LIMIT",
    "LOGS_MAX_N",
    "MAX_CONNECTIONS",
    "REDACTED",
    "WRITE_TIMEOUT",
    "BackendConflict",
    "BackendUnavailable",
    "ControlBackend",
    "ControlServer",
    "LogSubscription",
    "Peer",
    "Policy",
    "ReloadOutcome",
]
