"""Built-in handlers: ``EchoHandler`` and the ``JSONActionHandler`` base class.

``JSONActionHandler`` is the socketserver tutorials' "one JSON object per line,
``{"action": "name", ...}``, dispatched to a method" protocol, made safe: only methods
marked with ``@action`` are reachable (a table built when the class is defined, never
``getattr`` on a name the client sent), malformed input gets an error line and the
connection stays usable, and an overlong line is discarded in bounded chunks instead
of being read into memory. Between requests it also waits for the drain: when a
graceful stop begins, an idle connection is closed at once instead of holding the stop
to ``shutdown_timeout``. Whatever the client already sent is answered first: a request
begun, and a request waiting unread in the socket (a connection taken from the listen
queue at the stop starts with its client's request there and the drain already begun).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeVar, overload

from sockd.connections import input_pending
from sockd.handlers.base import SockdHandler

__all__ = ["ActionError", "EchoHandler", "JSONActionHandler", "SockdHandler", "action"]

F = TypeVar("F", bound=Callable[..., Any])
_ACTION_ATTR: Final = "_sockd_action"
_DISCARD_CHUNK: Final = 64 * 1024
_UNSERIALISABLE: Final = (
    b'{"ok": false, "error": {"code": "internal", "message": "unserialisable result"}}\n'
)


class EchoHandler(SockdHandler):
    """Sends back every byte it receives until the client closes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        recv, sendall = sock.recv, sock.sendall
        while data := recv(65536):
            sendall(data)


@overload
def action(fn: F, *, name: str | None = None) -> F: ...
@overload
def action(fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
def action(fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
    """Mark a method of a ``JSONActionHandler`` subclass as callable by clients.

    ``@action`` exposes it under its own name, ``@action(name="get-file")`` under another.
    """

    def mark(method: F) -> F:
        setattr(method, _ACTION_ATTR, name or method.__name__)
        return method

    return mark(fn) if fn is not None else mark


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


class _DrainWakers:
    """Per process: for each drain flag, a pipe that turns readable once the flag is set.

    A handler blocked waiting for the next request polls its socket and this pipe, so a
    drain wakes it at once, with no timeout ticking while it is idle. One watcher
    thread per flag and process (normally one: the daemon's), started the first time a
    handler has to wait; it blocks on the flag and writes one byte, never read, so the
    pipe stays readable for every handler from then on. A forked child (forking mode)
    starts its own: threads do not survive ``fork``, and the child's flag is set by its
    own SIGTERM handler.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[int, tuple[threading.Event, int, int]] = {}

    def fd_for(self, flag: threading.Event) -> int:
        with self._lock:
            entry = self._fds.get(id(flag))
            if entry is not None and entry[0] is flag:
                return entry[1]
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

            def watch() -> None:
                flag.wait()
                os.write(write_fd, b"!")

            threading.Thread(target=watch, name="sockd-drain-waker", daemon=True).start()
            self._fds[id(flag)] = (flag, read_fd, write_fd)
            return read_fd

    def after_fork_in_child(self) -> None:
        """Forget the parent's watchers (their threads are gone) and close their pipes."""
        self._lock = threading.Lock()
        fds, self._fds = self._fds, {}
        for _, read_fd, write_fd in fds.values():
            for fd in (read_fd, write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


_WAKERS: Final = _DrainWakers()
os.register_at_fork(after_in_child=_WAKERS.after_fork_in_child)


class _RequestStream(io.RawIOBase):
    """The raw stream under ``JSONActionHandler.rfile``: ``recv`` on the connection.

    While ``between_requests`` is set (the handler is at a request boundary with nothing
    buffered), a read first waits in ``poll`` for the socket or the drain flag,
    whichever comes first. Once the drain has begun it reads as end-of-stream only if
    the socket has nothing pending: bytes the client already sent are read and answered
    (a zero-timeout poll, paid only during a drain). The cost
    is that one ``poll`` system call per request whose first byte is not buffered yet,
    on a path where the handler would sleep in ``recv`` anyway (CPU per ping-pong
    request measured the same as before within noise, ~30 us here); requests already
    buffered (pipelined) never reach it. No timer ticks while a connection is idle.
    """

    def __init__(self, sock: socket.socket, draining: threading.Event) -> None:
        super().__init__()
        self._sock = sock
        self._draining = draining
        self._poller: Any = None
        self.between_requests = False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def readinto(self, buffer: Any) -> int:
        if self.between_requests and not self._wait_for_request():
            return 0
        return self._sock.recv_into(buffer)

    def _wait_for_request(self) -> bool:
        """True once the socket is readable; False once a drain began with nothing to read."""
        if self._draining.is_set():
            return input_pending(self._sock)
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._sock.fileno(), select.POLLIN)
            self._poller.register(_WAKERS.fd_for(self._draining), select.POLLIN)
        timeout = self._sock.gettimeout()
        ready = self._poller.poll(None if timeout is None else timeout * 1000)
        if not ready:
            raise TimeoutError("timed out")
        # Woken by the drain, the socket, or both at once: read whatever is there.
        sock_fd = self._sock.fileno()
        return any(fd == sock_fd for fd, _ in ready) or input_pending(self._sock)


class ActionError(Exception):
    """Raise from an action to answer the client with an error (no traceback logged)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class JSONActionHandler(SockdHandler):
    """Base class: one JSON request per line in, one JSON reply per line out.

    A request is an object with a string ``"action"``; an optional ``"id"`` is echoed
    back. Replies are ``{"ok": true, "result": ...}`` or
    ``{"ok": false, "error": {"code": ..., "message": ...}}`` with codes ``bad_json``,
    ``bad_request``, ``unknown_action``, ``line_too_long``, ``internal`` or whatever an
    action raises with ``ActionError``. ``handler_options.max_line_bytes`` (default
    65536) bounds a request line.

    When a graceful stop begins (``self.draining``), a connection waiting for its next
    request with nothing pending is closed at once; whatever the client already sent (a
    request begun, requests waiting in the socket or the buffer) is read and answered,
    and then the connection closes. ``self.rfile`` is a buffered reader over the
    connection; read request payloads from it, not from ``self.request``.
    """

    actions: ClassVar[dict[str, str]] = {}
    max_line_bytes: ClassVar[int] = 65536
    rfile: Any
    line_limit: int
    _sockd_stream: _RequestStream

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        limit = options.get("max_line_bytes", cls.max_line_bytes)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return [f"max_line_bytes: expected a positive integer, got {limit!r}"]
        return []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                exposed = getattr(value, _ACTION_ATTR, None)
                if isinstance(exposed, str):
                    table[exposed] = attr
        cls.actions = table

    def setup(self) -> None:
        self._sockd_stream = _RequestStream(self.request, self.draining)
        self.rfile = io.BufferedReader(self._sockd_stream)
        limit = self.options.get("max_line_bytes", self.max_line_bytes)
        self.line_limit = limit if isinstance(limit, int) and limit > 0 else self.max_line_bytes

    def finish(self) -> None:
        self.rfile.close()

    def handle(self) -> None:
        # No check of self.draining here: _next_request ends the loop at a drain only
        # when nothing is pending (a connection taken from the backlog at a stop starts
        # with the flag set and its client's request unread in the socket).
        while True:
            if not self._next_request():
                return
            line = self.rfile.readline(self.line_limit + 1)
            if not line:
                return
            if len(line) > self.line_limit and not line.endswith(b"\n"):
                if not self._discard_rest_of_line():
                    return
                self.reply_error(
                    "line_too_long", f"request lines are limited to {self.line_limit} bytes"
                )
                continue
            if not line.strip():
                continue
            self.dispatch_line(line)

    def _next_request(self) -> bool:
        """Wait for the first byte of the next request; False at end-of-stream, or at a
        drain with nothing pending.

        ``peek`` returns buffered bytes (a pipelined request) without touching the
        socket; only with nothing buffered does the stream wait, drain-aware.
        """
        self._sockd_stream.between_requests = True
        try:
            return bool(self.rfile.peek(1))
        finally:
            self._sockd_stream.between_requests = False

    def _discard_rest_of_line(self) -> bool:
        """Skip to the next newline in bounded chunks; False if the peer closed first."""
        while True:
            chunk = self.rfile.readline(_DISCARD_CHUNK)
            if not chunk:
                return False
            if chunk.endswith(b"\n"):
                return True

    def dispatch_line(self, line: bytes) -> None:
        try:
            request = json.loads(line, parse_constant=_no_constants, parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:
            self.reply_error("bad_json", f"request is not valid JSON: {_short(exc)}")
            return
        if not isinstance(request, dict):
            self.reply_error("bad_request", "a request must be a JSON object")
            return
        request_id = request.get("id")
        name = request.get("action")
        if not isinstance(name, str):
            self.reply_error("bad_request", 'a request needs a string "action"', request_id)
            return
        method_name = self.actions.get(name)
        if method_name is None:
            self.reply_error("unknown_action", f"unknown action {name[:100]!r}", request_id)
            return
        try:
            result = getattr(self, method_name)(request)
        except ActionError as exc:
            self.reply_error(exc.code, exc.message, request_id)
            return
        except Exception as exc:
            self.log.error(
                "handler.error", action=name, error=f"{type(exc).__name__}: {exc}", exc_info=True
            )
            self.reply_error("internal", "the action failed; see the server log", request_id)
            return
        self.reply({"ok": True, "result": result}, request_id)

    def reply(self, body: dict[str, Any], request_id: Any = None) -> None:
        if request_id is not None:
            body["id"] = request_id
        try:
            data = json.dumps(body, default=str, allow_nan=False).encode() + b"\n"
        except (ValueError, RecursionError):  # NaN/Infinity, or nesting too deep
            data = _UNSERIALISABLE
        self.request.sendall(data)

    def reply_error(self, code: str, message: str, request_id: Any = None) -> None:
        self.reply({"ok": False, "error": {"code": code, "message": message}}, request_id)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
