"""One control connection, one request: parse, authorize, validate, dispatch, answer.

Owns the request handler that ``sockd.control.server`` gives its socketserver: it reads
the request with ``sockd.control.http`` under the deadline set at accept, lets a reader
(``control.read_group``) only ``GET``, routes it to an endpoint of ``sockd.control.api``,
turns backend exceptions into API errors (``_call``, the one place), writes the answer or
streams the logs, and logs ``control.request``. It sees its server only through
``Owner``. Imports ``api``, ``access`` and ``http`` of the package, never ``server``.

A body must come with ``Content-Length``, and every ``POST``/``PUT``/``DELETE`` must send
one (``0`` for no body): ``Transfer-Encoding``, or no length, is ``411 length_required``.
Nothing is guessed from whether or when bytes follow the head.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, urlsplit

from sockd import __version__
from sockd.config import ControlConfig
from sockd.control.access import Peer, Role
from sockd.control.api import (
    JSON_TYPE,
    NDJSON_TYPE,
    APIError,
    BackendConflict,
    BackendUnavailable,
    ControlBackend,
    LogStream,
    LogSubscription,
    Request,
    bounded_int,
    error_body,
    internal_error,
    json_bytes,
    parse_body,
    route,
)
from sockd.control.http import (
    BODY_METHODS,
    HEAD_LIMIT,
    HTTP_VERSION,
    LINGER_SECONDS,
    REQUEST_LINE_LIMIT,
    TOKEN,
    WRITE_TIMEOUT,
    ChunkedBody,
    DeadlineReader,
    HeadTooLargeError,
    RequestTimeoutError,
    SocketWriter,
    full_response,
    linger,
)
from sockd.protocol import MAX_REQUEST_BODY, ErrorCode

#: Log streaming polls the subscription this often, so a vanished client or a closing
#: server is noticed within this many seconds even when no event arrives.
FOLLOW_POLL: Final = 1.0
#: Events per write when streaming logs.
_BATCH = 500
_T = TypeVar("_T")


class Refusals(Protocol):
    """A rate-limited log of refusals of one kind (``control.denied``, ``control.busy``)."""

    def record(self, key: object, **fields: Any) -> None: ...


class Admitted(Protocol):
    """An admitted connection as the accept loop settled it: who, which role, since when."""

    @property
    def peer(self) -> Peer: ...

    @property
    def role(self) -> Role: ...

    @property
    def accepted(self) -> float: ...


class Owner(Protocol):
    """What a request handler needs from the control server that accepted it."""

    @property
    def settings(self) -> ControlConfig: ...

    @property
    def backend(self) -> ControlBackend: ...

    @property
    def log(self) -> Any: ...

    @property
    def denied(self) -> Refusals: ...

    @property
    def busy(self) -> Refusals: ...

    @property
    def closing(self) -> threading.Event: ...

    @property
    def follower_budget(self) -> dict[str, int]: ...

    def slot(self, sock: socket.socket) -> Admitted:
        """The connection's entry in the server's table."""
        ...

    def follow(self, sock: socket.socket) -> bool:
        """Take one of the role's log-follower slots; False when none is free."""
        ...


class _Served(Protocol):
    @property
    def owner(self) -> Owner: ...


class ControlHandler(http.server.BaseHTTPRequestHandler):
    """One connection, one request: parse, check access, validate, dispatch, answer.

    The base class parses the request line and headers; answers are written by
    ``_send`` so that every one, including errors the base class detects, has the same
    JSON shape and headers. Socket errors mean the client went away; backend errors are
    turned into statuses by ``_call``; anything else is our bug and becomes a 500.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"sockd/{__version__}"

    def setup(self) -> None:
        self.owner = cast(_Served, self.server).owner
        self.sock = cast(socket.socket, self.request)
        self.connection = self.sock
        self.settings = self.owner.settings
        slot = self.owner.slot(self.sock)
        # Who and when were settled in the accept loop: the deadline runs from accept.
        self.peer, self.role, self.started = slot.peer, slot.role, slot.accepted
        self.reader = DeadlineReader(
            self.sock, self.started + self.settings.request_timeout, HEAD_LIMIT
        )
        self.buffered = io.BufferedReader(self.reader)
        self.rfile = self.buffered
        self.wfile = SocketWriter(self.sock)
        self.target: str | None = None
        self.response_status: int | None = None
        self.request_consumed = False

    def handle(self) -> None:
        self.close_connection = True
        try:
            self._handle_request()
        except RequestTimeoutError:
            self._send_error_if_possible(
                APIError(
                    ErrorCode.TIMEOUT,
                    f"request not received within {self.settings.request_timeout:g} s",
                )
            )
        except HeadTooLargeError:
            self._send_error_if_possible(
                APIError(
                    ErrorCode.BAD_REQUEST, f"request line and headers exceed {HEAD_LIMIT} bytes"
                )
            )
        except OSError:
            pass  # the client went away or stopped reading: nobody to answer
        except Exception:
            self.owner.log.exception("control.error", **self._context())
            self._send_error_if_possible(internal_error())
        finally:
            self._log_request()

    def finish(self) -> None:
        if not self.request_consumed and self.response_status is not None:
            linger(self.sock, self.reader.deadline)
        with contextlib.suppress(OSError):
            self.rfile.close()

    # -- base-class hooks -------------------------------------------------------

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors ``parse_request`` finds (request line, version, headers) are all 400."""
        self._send_error(APIError(ErrorCode.BAD_REQUEST, message or "malformed request"))

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until access, route and size are known to be fine."""
        return True

    def log_message(self, format: str, *args: Any) -> None:
        """The base class writes to stderr; our events go through ``control.request``."""

    # -- the request ------------------------------------------------------------

    def _handle_request(self) -> None:
        line = self.rfile.readline(REQUEST_LINE_LIMIT + 1)
        if not line:
            self.request_consumed = True
            return  # connected and left without a word (a liveness probe)
        try:
            if len(line) > REQUEST_LINE_LIMIT:
                raise APIError(
                    ErrorCode.BAD_REQUEST,
                    f"request line longer than {REQUEST_LINE_LIMIT} bytes",
                )
            self.raw_requestline = line
            if not self.parse_request():
                if self.response_status is None:
                    raise APIError(ErrorCode.BAD_REQUEST, "empty request line")
                return
            try:
                target = urlsplit(self.path)
            except ValueError:
                raise APIError(ErrorCode.BAD_REQUEST, "malformed request target") from None
            self.target = target.path
            self._check_head()
            self._dispatch(self.command, target.path, target.query)
        except APIError as error:
            self._send_error(error)

    def _check_head(self) -> None:
        if not HTTP_VERSION.fullmatch(self.request_version) or self.request_version in (
            "HTTP/0.9",
            "HTTP/0.8",
        ):
            raise APIError(ErrorCode.BAD_REQUEST, "only HTTP/1.0 and HTTP/1.1 are supported")
        headers = self.headers
        if headers.defects or headers.get_payload():
            raise APIError(ErrorCode.BAD_REQUEST, "malformed header line")
        for name, value in headers.items():
            if not TOKEN.fullmatch(name):
                raise APIError(ErrorCode.BAD_REQUEST, f"invalid header name {name!r}")
            if "\r" in value or "\n" in value or "\0" in value:
                raise APIError(
                    ErrorCode.BAD_REQUEST,
                    f"header {name!r} is folded or contains control characters",
                )

    def _authorize(self, method: str) -> None:
        """Strangers never get here (closed at accept); a reader only GETs."""
        if self.role == "all" or method == "GET":
            return
        self.owner.denied.record(self.peer.uid, **self._context())
        raise APIError(
            ErrorCode.FORBIDDEN,
            f"uid {self.peer.uid} may only use the read endpoints (GET) of the control channel",
        )

    def _content_length(self, method: str) -> int:
        if "Transfer-Encoding" in self.headers:
            raise APIError(
                ErrorCode.LENGTH_REQUIRED,
                "send request bodies with Content-Length; Transfer-Encoding is not accepted",
            )
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            if method in BODY_METHODS:
                # Never guessed from what follows the head (nor from its timing): a
                # ``{"dry_run": true}`` a moment late must not become a real reload.
                raise APIError(
                    ErrorCode.LENGTH_REQUIRED,
                    f"a {method} needs a Content-Length header: send Content-Length: 0 "
                    "for no body; with curl: -d '' or --json '{...}'",
                )
            return 0
        text = values.pop()
        length = bounded_int(text, 10**18 - 1)
        if values or length is None:
            raise APIError(ErrorCode.BAD_REQUEST, "invalid Content-Length header")
        if length > MAX_REQUEST_BODY:
            raise APIError(
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
            raise APIError(
                ErrorCode.BAD_REQUEST, f"request body ended after {len(raw)} of {length} bytes"
            )
        self.request_consumed = True
        return parse_body(raw)

    def _dispatch(self, method: str, path: str, query: str) -> None:
        self._authorize(method)
        found = route(path)
        if found is None:
            raise APIError(ErrorCode.NOT_FOUND, f"no such endpoint: {path}")
        methods, param = found
        endpoint = methods.get(method)
        if endpoint is None:
            allow = ", ".join(sorted(methods))
            raise APIError(
                ErrorCode.METHOD_NOT_ALLOWED,
                f"{path} accepts {allow}, not {method}",
                headers=[("Allow", allow)],
            )
        body = self._read_body(self._content_length(method))
        # The request is in: from here on the clock that matters is the client reading.
        self.sock.settimeout(WRITE_TIMEOUT)
        request = Request(
            method,
            path,
            parse_qsl(query, keep_blank_values=True),
            body,
            param,
            show_secrets=self.role == "all",
        )
        backend = self.owner.backend
        answer = self._call(lambda: endpoint(backend, request))
        if isinstance(answer, LogStream):
            self._stream_logs(backend, answer)
        else:
            self._send(answer.status, answer.body, answer.content_type)

    def _call(self, function: Callable[[], _T]) -> _T:
        """Run backend code; the one place its exceptions become statuses."""
        try:
            return function()
        except APIError:
            raise
        except BackendConflict as exc:
            raise APIError(ErrorCode.CONFLICT, str(exc) or "not possible now") from None
        except BackendUnavailable as exc:
            self.owner.busy.record("stopping", reason="stopping", **self._context())
            raise APIError(ErrorCode.UNAVAILABLE, str(exc) or "the daemon is stopping") from None
        except Exception:
            self.owner.log.exception("control.error", **self._context())
            raise internal_error() from None

    # -- answers ----------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = JSON_TYPE,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.response_status = status
        self.wfile.write(full_response(status, body, content_type, headers))

    def _send_error(self, error: APIError) -> None:
        if self.response_status is not None:
            return  # a stream already started: cutting the connection is the only signal
        self._send(
            error.status,
            error_body(error.code, error.message, error.details),
            headers=error.headers,
        )

    def _send_error_if_possible(self, error: APIError) -> None:
        with contextlib.suppress(OSError):
            self.sock.settimeout(LINGER_SECONDS)
            self._send_error(error)

    def _stream_logs(self, backend: ControlBackend, stream: LogStream) -> None:
        """History, then (with follow) live events, until the client or the server goes.

        The subscription is taken before the history is read so that no event falls
        between the two; one logged in that instant may appear twice, none is lost.
        A follower counts against its role's ``FOLLOWER_BUDGET`` until it ends.
        """
        if stream.follow and not self.owner.follow(self.sock):
            limit = self.owner.follower_budget[self.role]
            self.owner.busy.record(self.role, reason="followers", **self._context())
            raise APIError(
                ErrorCode.UNAVAILABLE,
                f"too many log followers: the {self.role!r} role may have {limit} at once; "
                "end one (or read without follow=1) and retry",
            )
        subscription = (
            self._call(lambda: self._subscribe(backend, stream.level)) if stream.follow else None
        )
        try:
            history = self._call(lambda: backend.log_history(stream.n, stream.level))
            stream_body = ChunkedBody(self.wfile, chunked=self.request_version != "HTTP/1.0")
            self.response_status = 200
            stream_body.start(200, [("Content-Type", NDJSON_TYPE)])
            for start in range(0, len(history), _BATCH):
                stream_body.write([json_bytes(event) for event in history[start : start + _BATCH]])
            if subscription is not None:
                self._follow(subscription, stream_body.write)
            stream_body.end()
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
            self.owner.busy.record(self.role, reason="threads", role=self.role, **self._context())
            raise APIError(
                ErrorCode.UNAVAILABLE, "cannot start a thread now for the log stream; try again"
            ) from None

    def _follow(self, subscription: LogSubscription, emit: Callable[[list[bytes]], None]) -> None:
        # Registered for no events, poll() still reports POLLHUP/POLLERR, which on a Unix
        # socket means the client closed both directions. A client that only half-closes
        # (shutdown(SHUT_WR)) still reads, so EOF alone must not end its stream.
        poller = select.poll()
        poller.register(self.sock, 0)
        while not self.owner.closing.is_set():
            emit(self._call(lambda: subscription.read(FOLLOW_POLL)))
            if poller.poll(0):
                return

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
        log = self.owner.log.debug if self.method == "GET" else self.owner.log.info
        log(
            "control.request",
            **self._context(),
            status=self.response_status,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
        )
