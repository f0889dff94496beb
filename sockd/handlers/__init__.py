"""Built-in handlers: ``EchoHandler`` and the ``JSONActionHandler`` base class.

``JSONActionHandler`` is the socketserver tutorials' "one JSON object per line,
``{"action": "name", ...}``, dispatched to a method" protocol, made safe: only methods
marked with ``@action`` are reachable (a table built when the class is defined, never
``getattr`` on a name the client sent), malformed input gets an error line and the
connection stays usable, and an overlong line is discarded in bounded chunks instead
of being read into memory.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any, ClassVar, Final, TypeVar, overload

from sockd.server import SockdHandler

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
    """

    actions: ClassVar[dict[str, str]] = {}
    max_line_bytes: ClassVar[int] = 65536
    rfile: Any
    line_limit: int

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
        self.rfile = self.request.makefile("rb")
        limit = self.options.get("max_line_bytes", self.max_line_bytes)
        self.line_limit = limit if isinstance(limit, int) and limit > 0 else self.max_line_bytes

    def finish(self) -> None:
        self.rfile.close()

    def handle(self) -> None:
        while not self.draining.is_set():
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
