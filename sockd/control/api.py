"""The control API: the backend protocol, the endpoints, the routes, the error shape.

Owns what the control channel means, not how it travels: ``ControlBackend`` (what the
daemon implements; ``sockd.views`` and ``sockd.daemon``), the exceptions a backend may
raise, one function per endpoint that validates a parsed request, calls the backend and
returns the answer (or raises ``APIError``), and the route table. A leaf of the package:
imports nothing from ``sockd.control``; outside it only ``sockd.config`` (redaction) and
``sockd.protocol`` (the shared vocabulary). HTTP framing is ``sockd.control.http``.

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
GET          /v1/stats                   200 ``backend.stats()``: /metrics as JSON
GET          /metrics                    200 Prometheus text format 0.0.4
===========  ==========================  =============================================

Request bodies are JSON objects (``parse_body``); unknown fields are refused (400) so
that a typo such as ``{"timout": 5}`` fails loudly instead of being ignored. Every number
has a range (``sockd.protocol``: stop timeout 0..86400 s, connection id 0..2**63-1, logs
n 0..100000); anything else, including a finite float past it, is a 400.

Every error is ``{"error": {"code": CODE, "message": TEXT}}`` (``details`` for a
rejected reload) with the status ``docs/control-api.md`` lists for the code
(``sockd.protocol.STATUS_OF``); the codes are ``sockd.protocol.ErrorCode``. Validation raises
``APIError``; backend exceptions become one in the request handler's ``_call``
(``BackendConflict`` 409, ``BackendUnavailable`` 503, anything else 500 with the
traceback logged as ``control.error``, never sent).

A reader (``control.read_group``) sees ``GET /v1/config`` with the values of settings
declared secret (``server.handler_options``) as ``"<redacted>"`` (``sockd.config.redact``;
``GET /v1/status``'s ``last_reload`` hides them from every role, the daemon records it so).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from sockd.config import redact_config
from sockd.protocol import (
    API_PREFIX,
    LOG_LEVELS,
    LOGS_MAX_N,
    MAX_CONNECTION_ID,
    MAX_STOP_TIMEOUT,
    STATUS_OF,
    ConfigDump,
    Connection,
    ErrorCode,
    Stats,
    Status,
)

JSON_TYPE: Final = "application/json"
NDJSON_TYPE: Final = "application/x-ndjson"
METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


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

    def status(self) -> Status: ...

    def connections(self) -> list[Connection]: ...

    def close_connection(self, conn_id: int) -> bool: ...

    def effective_config(self) -> ConfigDump: ...

    def reload(self) -> ReloadOutcome: ...

    def reload_check(self) -> ReloadOutcome: ...

    def stop(self, timeout: float | None) -> dict[str, Any]: ...

    def pause(self) -> dict[str, Any]: ...

    def resume(self) -> dict[str, Any]: ...

    def set_log_level(self, level: str) -> dict[str, Any]: ...

    def reopen_logs(self) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...

    def stats(self) -> Stats: ...

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]: ...

    def log_subscribe(self, min_level: str) -> LogSubscription:
        """A live feed; ``RuntimeError`` (exactly) when its thread cannot start now."""
        ...


# --------------------------------------------------------------------------- errors


class APIError(Exception):
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
        self.status = STATUS_OF[code]
        self.message = message
        self.details = details
        self.headers = list(headers)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, separators=(",", ":"), default=str) + "\n").encode()


def error_body(code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> bytes:
    error: dict[str, Any] = {"code": str(code), "message": message}
    if details is not None:
        error["details"] = details
    return json_bytes({"error": error})


def internal_error() -> APIError:
    return APIError(ErrorCode.INTERNAL, "internal error; the daemon's log has the details")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: empty (no fields), or a JSON object; anything else is a 400."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise APIError(ErrorCode.BAD_REQUEST, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(ErrorCode.BAD_REQUEST, "request body must be a JSON object")
    return body


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    body: dict[str, Any]
    param: str | None
    #: False for a reader: settings declared secret are redacted in what it is shown.
    show_secrets: bool = True


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_TYPE


@dataclass(frozen=True, slots=True)
class LogStream:
    n: int
    level: str
    follow: bool


Answer = Response | LogStream
Endpoint = Callable[[ControlBackend, Request], Answer]


def _ok(value: Any, status: int = 200) -> Response:
    return Response(status, json_bytes(value))


def _fields(request: Request, allowed: dict[str, bool]) -> dict[str, Any]:
    """The JSON body's fields; ``allowed`` maps each known field to whether it is required."""
    unknown = sorted(set(request.body) - set(allowed))
    if unknown:
        raise APIError(
            ErrorCode.BAD_REQUEST,
            f"unknown field {unknown[0]!r} in the request body"
            + (f" (expected {', '.join(allowed)})" if allowed else " (expected no fields)"),
        )
    for name, required in allowed.items():
        if required and name not in request.body:
            raise APIError(ErrorCode.BAD_REQUEST, f"the request body needs a {name!r} field")
    return request.body


def _status(backend: ControlBackend, request: Request) -> Answer:
    return _ok(backend.status())


def _connections(backend: ControlBackend, request: Request) -> Answer:
    return _ok({"connections": backend.connections()})


def _shown(text: str, limit: int = 40) -> str:
    """``repr`` of a client's value, cut short: an error message must not echo 4 KB."""
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def bounded_int(text: str, maximum: int) -> int | None:
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


def _close_connection(backend: ControlBackend, request: Request) -> Answer:
    text = request.param or ""
    conn_id = bounded_int(text, MAX_CONNECTION_ID)
    if conn_id is None:
        raise APIError(
            ErrorCode.BAD_REQUEST,
            f"connection id must be an integer from 0 to {MAX_CONNECTION_ID}, got {_shown(text)}",
        )
    if not backend.close_connection(conn_id):
        raise APIError(ErrorCode.NOT_FOUND, f"no open connection with id {conn_id}")
    return _ok({"closed": conn_id})


def _config(backend: ControlBackend, request: Request) -> Answer:
    answer = backend.effective_config()
    config = answer.get("config")
    if request.show_secrets or not isinstance(config, dict):
        return _ok(answer)
    # Secret settings (declared ``secret``: server.handler_options) are for admins.
    return _ok({**answer, "config": redact_config(config)})


def _reload(backend: ControlBackend, request: Request) -> Answer:
    dry_run = _fields(request, {"dry_run": False}).get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise APIError(ErrorCode.BAD_REQUEST, "'dry_run' must be true or false")
    outcome = backend.reload_check() if dry_run else backend.reload()
    if outcome.errors or not (dry_run or outcome.applied):
        count = len(outcome.errors)
        problems = f"the configuration has {count} problem{'' if count == 1 else 's'}"
        raise APIError(
            ErrorCode.INVALID_CONFIG,
            f"dry run: {problems}; nothing was applied"
            if dry_run
            else f"reload rejected: {problems}; the daemon keeps running as before",
            details={"errors": list(outcome.errors), **({"dry_run": True} if dry_run else {})},
        )
    result = "valid" if dry_run else "applied"
    return _ok({"result": result, "generation": outcome.generation, "changes": outcome.changes})


def _stop(backend: ControlBackend, request: Request) -> Answer:
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
            raise APIError(
                ErrorCode.BAD_REQUEST,
                f"'timeout' must be a number of seconds from 0 to {MAX_STOP_TIMEOUT:g}, "
                f"got {shown}",
            )
        timeout = float(raw)
    return _ok(backend.stop(timeout), 202)


def _pause(backend: ControlBackend, request: Request) -> Answer:
    _fields(request, {})
    return _ok(backend.pause())


def _resume(backend: ControlBackend, request: Request) -> Answer:
    _fields(request, {})
    return _ok(backend.resume())


def _log_level(backend: ControlBackend, request: Request) -> Answer:
    level = _fields(request, {"level": True})["level"]
    if not isinstance(level, str) or level not in LOG_LEVELS:
        raise APIError(
            ErrorCode.BAD_REQUEST,
            f"'level' must be one of {', '.join(LOG_LEVELS)}, got {level!r}",
        )
    return _ok(backend.set_log_level(level))


def _reopen_logs(backend: ControlBackend, request: Request) -> Answer:
    _fields(request, {})
    return _ok(backend.reopen_logs())


def _metrics(backend: ControlBackend, request: Request) -> Answer:
    return Response(200, backend.metrics_text().encode(), METRICS_TYPE)


def _stats(backend: ControlBackend, request: Request) -> Answer:
    return _ok(backend.stats())


def _logs(backend: ControlBackend, request: Request) -> Answer:
    seen: dict[str, str] = {}
    for name, value in request.query:
        if name not in ("n", "level", "follow"):
            raise APIError(
                ErrorCode.BAD_REQUEST,
                f"unknown query parameter {name!r} (expected n, level, follow)",
            )
        if name in seen:
            raise APIError(ErrorCode.BAD_REQUEST, f"query parameter {name!r} given twice")
        seen[name] = value
    n_text = seen.get("n", "100")
    n = bounded_int(n_text, LOGS_MAX_N)
    if n is None:
        raise APIError(
            ErrorCode.BAD_REQUEST,
            f"n must be an integer from 0 to {LOGS_MAX_N}, got {_shown(n_text)}",
        )
    level = seen.get("level", "debug")
    if level not in LOG_LEVELS:
        raise APIError(
            ErrorCode.BAD_REQUEST, f"level must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    follow = seen.get("follow", "0").lower()
    if follow not in ("0", "1", "true", "false"):
        raise APIError(ErrorCode.BAD_REQUEST, f"follow must be 0, 1, true or false, got {follow!r}")
    return LogStream(n, level, follow in ("1", "true"))


ROUTES: Final[dict[str, dict[str, Endpoint]]] = {
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
    f"{API_PREFIX}/stats": {"GET": _stats},
    "/metrics": {"GET": _metrics},
}
_CONNECTION_PREFIX = f"{API_PREFIX}/connections/"


def route(path: str) -> tuple[dict[str, Endpoint], str | None] | None:
    if path.startswith(_CONNECTION_PREFIX) and "/" not in path[len(_CONNECTION_PREFIX) :]:
        return ROUTES[f"{_CONNECTION_PREFIX}{{id}}"], path[len(_CONNECTION_PREFIX) :]
    methods = ROUTES.get(path)
    return None if methods is None or "{" in path else (methods, None)
