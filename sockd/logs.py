"""Structured logging: structlog configured once, one sink, an in-memory ring for ``sockctl logs``.

Event names are an interface operators grep and alert on; they are listed in ``EVENTS``
and documented in the README. Every event carries ``timestamp`` (ISO-8601 UTC),
``level`` and ``event``.

Design choices, and why:
- Lines are written with a single ``os.write`` on an ``O_APPEND`` descriptor, so lines
  from forked children and threads never interleave.
- The level is checked by the first processor against a value that can change at run
  time (``sockctl log-level``), so cached loggers and loggers already bound to a
  connection follow a change at once.
- Reopening a file (logrotate) ``dup2``s the new file onto the same descriptor number:
  no lock on the write path and no window without an output.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Final

import structlog

from sockd.config import LoggingConfig

EVENTS: Final = {
    "server.starting": "sockd is starting: version, pid, config path, mode",
    "server.listening": "one listening address is accepting (address, inherited)",
    "server.paused": "accepting stopped by sockctl pause",
    "server.resumed": "accepting restarted by sockctl resume",
    "server.stopping": "a graceful stop began (signal or sockctl stop): active, timeout_s",
    "server.stopped": "the drain ended: finished, cut, duration_ms",
    "server.error": "a runtime failure outside any connection",
    "conn.open": "a connection was accepted (debug level: conn.close carries everything)",
    "conn.close": "the canonical line for one connection: duration, bytes, how it ended",
    "conn.refused": "connections refused by a limit or access rule (rate-limited summary): counts",
    "server.throttled": "accepting paused at a limit; connections wait in the backlog: counts",
    "handler.error": (
        "the handler raised: traceback in 'exception'; that connection closes (a "
        "JSONActionHandler action that raised gets an error reply, and the connection goes on)"
    ),
    "accept.error": "accept() failed (EMFILE, ENFILE, ...); the loop backs off",
    "child.exited": "forking mode: a child ended abnormally (signal or non-zero status)",
    "reload.applied": "a reload took effect: changes, generation",
    "reload.rejected": "a reload was refused; the old config stays: errors",
    "control.request": "a state-changing control request: uid, pid, method, path, status",
    "control.denied": "a control request refused for its credentials: uid, pid, path",
    "control.error": "a control request failed inside sockd (bug): traceback",
    "control.listening": "the control socket accepts: path, mode, group, read_group",
    "control.closed": "the control socket was removed at stop",
    "log.level_changed": "the log level was changed at run time: new_level, previous_level",
    "log.reopened": "the log file was reopened",
}

_LEVELS: Final = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
    "fatal": 50,
    "msg": 20,
}


DEBUG: Final = 10
INFO: Final = 20

#: The daemon's one LogSystem; module level so hot paths can check the level and emit
#: without a reference being threaded through every call.
_active: LogSystem | None = None


def enabled(number: int) -> bool:
    """Whether an event at this level would be written (cheap: no event is built)."""
    active = _active
    return active is None or number >= active.level


def emit(number: int, event: str, fields: dict[str, Any]) -> None:
    """Write one event from a hot path: same renderer, ring and sink as structlog's path."""
    active = _active
    if active is None:
        structlog.get_logger().log(number, event, **fields)
        return
    active.emit(number, event, fields)


def events_table() -> str:
    """The README's event reference, generated from ``EVENTS``."""
    rows = ["| event | meaning and fields |", "| --- | --- |"]
    rows += [f"| `{name}` | {meaning} |" for name, meaning in EVENTS.items()]
    return "\n".join(rows) + "\n"


def json_line_sink() -> LogSystem | None:
    """The log system, if it writes JSON lines (not the journal) at info or below.

    Hot paths can then render a known event with a template and hand over the finished
    line (``LogSystem.emit_line``): ``json.dumps`` of a flat dict costs ~30k CPU
    instructions, a template ~8k, and the canonical line is written once per connection.
    """
    active = _active
    if active is None or active.level > INFO or not active.renders_json_lines:
        return None
    return active


def level_number(name: str) -> int:
    return _LEVELS[name.lower()]


class Sink:
    """The one "logger" structlog writes to, for the daemon's whole life.

    It owns a private descriptor that never changes number and is never closed while
    running: switching output (reload) or reopening a rotated file ``dup2``s the new
    target onto it, so a logger bound before the change can never write into a
    descriptor number that was closed and reused for something else.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.fd = self._open(target)
        self._journal: Any = _journal_for(target)

    @staticmethod
    def _open(target: str) -> int:
        if target in ("stdout", "journald"):
            return os.dup(sys.stdout.fileno())
        if target == "stderr":
            return os.dup(sys.stderr.fileno())
        return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @property
    def is_journal(self) -> bool:
        return self._journal is not None

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def retarget(self, target: str) -> None:
        """Point the descriptor at ``target`` (a reload or a logrotate reopen)."""
        fresh = self._open(target)
        try:
            os.dup2(fresh, self.fd, inheritable=False)
        finally:
            os.close(fresh)
        self._journal = _journal_for(target)
        self.target = target

    def reopen(self) -> None:
        if self.target not in ("stdout", "stderr", "journald"):
            self.retarget(self.target)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "replace")
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO):
                    return  # nobody reads our output any more; never crash on logging
                raise
            data = data[written:]

    def msg(self, line: str | None = None, fields: Mapping[str, str] | None = None) -> None:
        """structlog calls the method named after the level with the rendered event."""
        if fields is not None:
            journal = self._journal
            if journal is not None:
                with contextlib.suppress(OSError):
                    journal.send(fields)
                return
            line = fields.get("MESSAGE", "")
        if line is not None:
            self.write(line)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _journal_for(target: str) -> Any:
    """A journal writer for "journald", and for stdout/stderr when they are the journal.

    Under systemd, stdout usually is a journal stream (``$JOURNAL_STREAM``); writing
    native entries there instead of text lines keeps every field searchable
    (``journalctl SOCKD_EVENT=conn.close``) and avoids a second timestamp.
    """
    if target == "journald":
        return _journal_writer()
    if target in ("stdout", "stderr"):
        from sockd.systemd import journal_stream_matches

        fd = 1 if target == "stdout" else 2
        if journal_stream_matches((fd,)):
            with contextlib.suppress(OSError):
                return _journal_writer()
    return None


def _journal_writer() -> Any:
    from sockd.systemd import JournalWriter  # only needed for journald output

    return JournalWriter()


_NAMES: Final = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}

_SYSLOG_PRIORITY: Final = {10: "7", 20: "6", 30: "4", 40: "3", 50: "2"}


def _journal_renderer(identifier: str) -> Callable[..., Any]:
    """Final processor for journald: every field becomes ``SOCKD_<NAME>``."""

    def render(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        level = event_dict.pop("level", method)
        event_dict.pop("timestamp", None)  # the journal stamps entries itself
        event = str(event_dict.get("event", ""))
        rest = " ".join(
            f"{k}={v if isinstance(v, str) else _ENCODE(v)}"
            for k, v in event_dict.items()
            if k not in ("event", "exception")
        )
        fields = {
            "MESSAGE": f"{event} {rest}".strip(),
            "PRIORITY": _SYSLOG_PRIORITY.get(level_number(str(level)), "6"),
            # systemd never tells a service its SyslogIdentifier=, so it is configured.
            "SYSLOG_IDENTIFIER": identifier,
        }
        for key, value in event_dict.items():
            text = value if isinstance(value, str) else _ENCODE(value)
            fields["SOCKD_" + key.upper()] = text
        if "exception" in event_dict:
            fields["MESSAGE"] += "\n" + str(event_dict["exception"])
        return {"fields": fields}

    return render


class Subscription:
    """A live feed of events for ``GET /v1/logs?follow=1``.

    Bounded: a reader slower than the log loses events (counted in ``dropped``) rather
    than growing the daemon's memory.
    """

    def __init__(self, ring: LogRing, min_level: int, maxsize: int = 10_000) -> None:
        self._ring = ring
        self.min_level = min_level
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize)
        self.dropped = 0

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._ring.unsubscribe(self)


_PLAIN = (str, int, float, bool, type(None))


def _plain(event: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(event, str):  # a line already rendered as JSON by the fast path
        parsed: dict[str, Any] = json.loads(event)
        return parsed
    return {k: (v if isinstance(v, _PLAIN) else _jsonable(v)) for k, v in event.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [v if isinstance(v, _PLAIN) else _jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): v if isinstance(v, _PLAIN) else _jsonable(v) for k, v in value.items()}
    return str(value)


_ENCODE = json.JSONEncoder(default=str, ensure_ascii=False).encode
_stamp_cache: tuple[int, str] = (0, "")


def iso_now() -> str:
    """ISO-8601 UTC with microseconds; the date part is formatted once a second."""
    global _stamp_cache  # noqa: PLW0603  # a per-second cache shared by all threads
    now = time.time()
    second = int(now)
    cached_second, prefix = _stamp_cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_cache = (second, prefix)
    return f"{prefix}.{int((now - second) * 1_000_000):06d}Z"


def render_json(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    return _ENCODE(event_dict)


class LogRing:
    """The last N events as JSON-ready dicts, plus live subscribers."""

    def __init__(self, size: int) -> None:
        self._events: collections.deque[tuple[int, dict[str, Any] | str]] = collections.deque(
            maxlen=size
        )
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()
        self.enabled = True

    def resize(self, size: int) -> None:
        with self._lock:
            self._events = collections.deque(self._events, maxlen=size)

    def add(self, event: dict[str, Any] | str, number: int) -> None:
        """Keep a shallow copy; JSON-safety is paid by readers, not by every log call."""
        if not self.enabled:
            return
        entry = (number, event)
        with self._lock:
            self._events.append(entry)
            if self._subscribers:
                for sub in self._subscribers:
                    if number >= sub.min_level:
                        sub.offer(_plain(event))

    def history(self, n: int, min_level: str = "debug") -> list[dict[str, Any]]:
        floor = level_number(min_level)
        with self._lock:
            events = list(self._events)
        picked = [e for number, e in events if number >= floor]
        return [_plain(e) for e in picked[-n:]] if n else []

    def subscribe(self, min_level: str = "debug") -> Subscription:
        sub = Subscription(self, level_number(min_level))
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(sub)


class LogSystem:
    """Owns the sink, the live level and the ring; the daemon holds exactly one.

    structlog is configured once with processors that read this object's current
    state, so a reload or ``sockctl log-level`` changes every logger at once,
    including those already bound to in-flight connections.
    """

    def __init__(self, settings: LoggingConfig) -> None:
        self.settings = settings
        self.level = level_number(settings.level)
        self.level_name = settings.level
        self.ring = LogRing(settings.ring_size)
        self.sink = Sink(settings.output)
        self._render: Callable[..., Any] = self._make_renderer()
        sink = self.sink
        structlog.configure(
            processors=[self._process],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            logger_factory=lambda *_: sink,
            cache_logger_on_first_use=True,
        )
        os.register_at_fork(after_in_child=self._after_fork_in_child)
        global _active  # noqa: PLW0603  # one log system per process, set once at start
        _active = self

    def _after_fork_in_child(self) -> None:
        # A forked child's events still reach the output, but the ring and its
        # subscribers live in the parent.
        self.ring.enabled = False

    def _process(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        """Level filter, timestamp, traceback, ring, renderer: one call, on every log line.

        One processor instead of a chain of five: it is on the per-connection path.
        """
        number = _LEVELS.get(method, 20)
        if number < self.level:
            raise structlog.DropEvent
        event: MutableMapping[str, Any] = {
            "timestamp": iso_now(),
            "level": "error" if method == "exception" else method,
            "event": event_dict.pop("event", None),
        }
        event.update(event_dict)
        if "level" in event_dict or "timestamp" in event_dict:  # never let a field forge them
            event["level"] = "error" if method == "exception" else method
            event["timestamp"] = iso_now()
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        self.ring.add(dict(event), number)
        return self._render(logger, method, event)

    def emit(self, number: int, event_name: str, fields: dict[str, Any]) -> None:
        if number < self.level:
            return
        method = _NAMES[number]
        event: dict[str, Any] = {"timestamp": iso_now(), "level": method, "event": event_name}
        event.update(fields)
        # The JSON renderer leaves the dict alone, so the ring can keep this very dict;
        # other renderers pop keys and get a copy.
        self.ring.add(event if self._render is render_json else dict(event), number)
        rendered = self._render(None, method, event)
        if isinstance(rendered, dict):
            self.sink.msg(**rendered)
        else:
            self.sink.msg(rendered)

    def emit_line(self, number: int, line: str) -> None:
        """Write a line the caller rendered as JSON (see ``json_line_sink``)."""
        self.ring.add(line, number)
        self.sink.write(line)

    @property
    def renders_json_lines(self) -> bool:
        return self._render is render_json

    def _make_renderer(self) -> Callable[..., Any]:
        fmt = self.settings.format
        if self.sink.is_journal:
            return _journal_renderer(self.settings.identifier)
        if fmt == "logfmt":
            return structlog.processors.LogfmtRenderer(
                key_order=["timestamp", "level", "event"], drop_missing=True
            )
        if fmt == "console":
            return structlog.dev.ConsoleRenderer(colors=self.sink.isatty())
        return render_json

    def set_level(self, name: str) -> str:
        previous = self.level_name
        self.level = level_number(name)
        self.level_name = name
        return previous

    def reopen(self) -> None:
        self.sink.reopen()

    def apply(self, settings: LoggingConfig) -> None:
        """Take new logging settings live (reload)."""
        if settings.output != self.settings.output:
            self.sink.retarget(settings.output)
        if settings.ring_size != self.settings.ring_size:
            self.ring.resize(settings.ring_size)
        self.settings = settings
        self.set_level(settings.level)
        self._render = self._make_renderer()


def get_logger(**context: Any) -> Any:
    """A logger bound to ``context``; cheap, call it where the context is known."""
    return structlog.get_logger().bind(**context) if context else structlog.get_logger()
