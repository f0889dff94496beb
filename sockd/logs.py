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
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from sockd.config import LoggingConfig

EVENTS: Final = {
    "server.starting": "sockd is starting: version, pid, config path, mode",
    "server.listening": "one listening address is accepting (address, inherited)",
    "server.paused": "accepting stopped by sockctl pause",
    "server.resumed": "accepting restarted by sockctl resume",
    "server.stopping": (
        "a graceful stop began (signal or sockctl stop): active, backlog (connections "
        "taken from the listen queue), timeout_s"
    ),
    "server.stopped": (
        "the drain ended: finished, unanswered (ended during the drain having received "
        "bytes but sent none, not cut: a handler that closed without answering; not "
        "counted in finished), cut, backlog, backlog_closed (taken from the listen queue "
        "but closed unserved, with a FIN), duration_ms"
    ),
    "server.error": "a runtime failure outside any connection: error, where",
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
    "control.denied": (
        "control connections or requests refused for their credentials (rate-limited: the "
        "first at once, then one summary a second with count and uids): uid, pid, method, "
        "path (null when refused at accept), count"
    ),
    "control.busy": (
        "control connections answered 503: a role's connection or follower budget, a thread "
        "that could not start, or the daemon stopping (rate-limited like control.denied): "
        "reason, role, uid, pid, count; summaries: roles"
    ),
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
        # O_NONBLOCK for the open only: opening a FIFO nobody reads fails at once
        # (ENXIO) instead of blocking the main loop until a reader comes.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(target, flags, 0o640)
        os.set_blocking(fd, True)
        return fd

    @property
    def is_journal(self) -> bool:
        return self._journal is not None

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def retarget(self, target: str) -> None:
        """Point the descriptor at ``target`` (a reload or a logrotate reopen)."""
        self.switch(target, *self.open_target(target))

    def open_target(self, target: str) -> tuple[int, Any]:
        """``retarget``'s half that can fail: open ``target`` without writing to it yet.

        Returns the new descriptor and journal writer for ``switch``; close the
        descriptor to give up instead.
        """
        fresh = self._open(target)
        try:
            journal = _journal_for(target)
        except BaseException:
            os.close(fresh)
            raise
        return fresh, journal

    def switch(self, target: str, fresh: int, journal: Any) -> None:
        """``retarget``'s half that cannot fail: ``dup2`` onto our own descriptor."""
        try:
            os.dup2(fresh, self.fd, inheritable=False)
        finally:
            os.close(fresh)
        self._journal = journal
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


#: A follower's queue holds at most this many events and bytes; past either, its oldest
#: batches are dropped and its next read starts with a ``logs.dropped`` line.
FOLLOW_QUEUE_EVENTS: Final = 10_000
FOLLOW_QUEUE_BYTES: Final = 4 * 1024 * 1024
#: The fan-out thread hands new events to followers this often (seconds): the logging
#: call itself only appends to the ring. It is also the latency of ``sockctl logs -f``.
#: Each hand-out wakes every reading follower's thread, and each wake takes the GIL from
#: the connection threads: measured with 60 followers (bench/followers.py, 2 cores),
#: 0.1 s cost 10-13% of the connection rate, 0.25 s 3%.
FOLLOW_INTERVAL: Final = 0.25
#: Events per batch handed to followers, the unit in which a full queue drops.
FOLLOW_BATCH: Final = 500
#: While anyone follows, the ring keeps at least this many events, so the fan-out thread
#: cannot fall behind the ring between two runs below ~40,000 events a second (faster,
#: followers get a ``logs.dropped`` line for what the ring let go).
_FOLLOW_RING: Final = 10_000
#: Bytes one ``Subscription.read`` returns at most; the rest stays queued (bounded).
_READ_BYTES: Final = 1024 * 1024


def _dropped_line(missed: int) -> bytes:
    """The synthetic event a follower gets where its queue dropped ``missed`` events."""
    event = {"timestamp": iso_now(), "level": "warning", "event": "logs.dropped", "missed": missed}
    return (_ENCODE(event) + "\n").encode()


class Subscription:
    """One follower of ``GET /v1/logs?follow=1``: a bounded queue of NDJSON batches.

    ``LogRing``'s fan-out thread renders each new event once and pushes the same
    ``bytes`` batch to every follower at that level, so a follower costs a reference
    per batch, not a copy. The queue is bounded in events and in bytes: when it is
    full, the oldest batches go, and the next ``read`` starts with a synthetic
    ``logs.dropped`` line saying how many events were missed there. A follower whose
    client does not read is blocked in a send holding at most ``_READ_BYTES`` it took
    from the queue; the queue behind it stays bounded, so memory does too.
    """

    def __init__(
        self,
        ring: LogRing,
        min_level: int,
        max_events: int = FOLLOW_QUEUE_EVENTS,
        max_bytes: int = FOLLOW_QUEUE_BYTES,
    ) -> None:
        self._ring = ring
        self.min_level = min_level
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._cond = threading.Condition(threading.Lock())
        #: (events missed just before it, NDJSON data, events in it)
        self._batches: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self._events = 0
        self._bytes = 0
        self._missed = 0  # dropped from the head of the queue, reported first
        #: Events this follower missed in all (the sum of its ``logs.dropped`` lines).
        self.dropped = 0
        self.closed = False

    def push(self, batches: list[tuple[bytes, int]], missed: int = 0) -> None:
        """Queue batches (the fan-out thread); ``missed`` events were lost before them."""
        with self._cond:
            if self.closed:
                return
            self.dropped += missed
            if not batches:
                batches = [(b"", 0)]
            for data, count in batches:
                self._batches.append((missed, data, count))
                self._events += count
                self._bytes += len(data)
                missed = 0
            while self._batches and (
                self._events > self.max_events or self._bytes > self.max_bytes
            ):
                before, data, count = self._batches.popleft()
                self._events -= count
                self._bytes -= len(data)
                self._missed += before + count
                self.dropped += count
            self._cond.notify()

    def read(self, timeout: float) -> list[bytes]:
        """NDJSON lines queued for this follower (waiting up to ``timeout`` s for some).

        An empty list means nothing arrived in time. The parts are returned unjoined:
        joining would copy up to ``_READ_BYTES`` per follower.
        """
        with self._cond:
            if not (self._batches or self._missed or self.closed):
                self._cond.wait(timeout)
            parts: list[bytes] = []
            if self._missed:
                parts.append(_dropped_line(self._missed))
                self._missed = 0
            size = 0
            while self._batches and size < _READ_BYTES:
                before, data, count = self._batches.popleft()
                self._events -= count
                self._bytes -= len(data)
                if before:
                    parts.append(_dropped_line(before))
                if data:
                    parts.append(data)
                    size += len(data)
            return parts

    @property
    def queued(self) -> tuple[int, int]:
        """Events and bytes waiting in the queue now."""
        with self._cond:
            return self._events, self._bytes

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._batches.clear()
            self._events = self._bytes = 0
            self._cond.notify_all()
        self._ring.unsubscribe(self)


def _ndjson(event: Mapping[str, Any] | str) -> bytes:
    """One ring entry as an NDJSON line (a line the fast path rendered is used as is)."""
    if isinstance(event, str):
        return (event + "\n").encode("utf-8", "replace")
    return (_ENCODE(_plain(event)) + "\n").encode("utf-8", "replace")


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
    """The last N events (``sockctl logs``) and the fan-out to live followers (``-f``).

    ``add`` runs on every logging call, on the connection path, so it only appends to a
    deque and bumps two counters under a lock: O(1), nothing per follower, no wake-up.
    A fan-out thread, alive only while someone follows, wakes every ``FOLLOW_INTERVAL``,
    takes what was appended since its last run, renders each event to JSON once, and
    pushes the same batches to every follower (see ``Subscription``). While anyone
    follows, the deque keeps at least ``_FOLLOW_RING`` events (``history`` still shows
    only the last ``size``), so the fan-out thread does not lose events between runs;
    if it ever did, the per-level counters say exactly how many each follower missed.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._events: collections.deque[tuple[int, dict[str, Any] | str]] = collections.deque(
            maxlen=size
        )
        self._appended = 0
        #: Events ever appended, per level number (the fan-out's loss accounting).
        self._counts: dict[int, int] = {}
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()
        self._fan_out_thread: threading.Thread | None = None
        self.enabled = True

    def _reshape(self) -> None:
        """Give the deque the capacity it needs now (the lock is held)."""
        capacity = max(self.size, _FOLLOW_RING) if self._subscribers else self.size
        if self._events.maxlen != capacity:
            self._events = collections.deque(self._events, maxlen=capacity)

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = size
            self._reshape()

    def add(self, event: dict[str, Any] | str, number: int) -> None:
        """Keep a reference; JSON-safety and rendering are paid by readers, not here."""
        if not self.enabled:
            return
        with self._lock:
            self._events.append((number, event))
            self._appended += 1
            self._counts[number] = self._counts.get(number, 0) + 1

    def history(self, n: int, min_level: str = "debug") -> list[dict[str, Any]]:
        floor = level_number(min_level)
        with self._lock:
            events = list(self._events)
            size = self.size
        events = events[-size:] if size else []
        picked = [e for number, e in events if number >= floor]
        return [_plain(e) for e in picked[-n:]] if n else []

    def subscribe(self, min_level: str = "debug") -> Subscription:
        """A new follower, fed by the fan-out thread (started now if none runs).

        Raises ``RuntimeError`` when that thread cannot start (the process is at its
        thread limit, RLIMIT_NPROC or pids.max): then nothing changed, no follower is
        left registered, and a later call tries again.
        """
        sub = Subscription(self, level_number(min_level))
        with self._lock:
            if self._fan_out_thread is None:
                # It starts from here, not from whenever the thread first runs: an
                # event logged right after this call must reach this follower. Started
                # before it is published (the thread waits for this lock before it
                # reads anything): a thread that failed to start must never be taken
                # for a running one, or no follower would get an event again.
                thread = threading.Thread(
                    target=self._fan_out,
                    args=(self._appended, dict(self._counts)),
                    name="sockd-log-fanout",
                    daemon=True,
                )
                thread.start()
                self._fan_out_thread = thread
            self._subscribers.append(sub)
            self._reshape()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(sub)
            self._reshape()

    @property
    def followers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _fan_out(self, cursor: int, seen: dict[int, int]) -> None:
        """Hand new events to followers every ``FOLLOW_INTERVAL`` until none is left.

        ``cursor`` and ``seen`` are the append count and per-level counts it starts from.
        """
        while True:
            time.sleep(FOLLOW_INTERVAL)
            with self._lock:
                subscribers = list(self._subscribers)
                if not subscribers:
                    self._fan_out_thread = None
                    return
                appended = self._appended
                take = min(appended - cursor, len(self._events))
                entries = list(itertools.islice(reversed(self._events), take))
                counts = dict(self._counts)
            entries.reverse()
            # Events that left the ring before this run saw them: none below ~100k/s.
            lost: dict[int, int] = {}
            if appended - cursor > take:
                delivered = collections.Counter(number for number, _ in entries)
                for number, total in counts.items():
                    gap = total - seen.get(number, 0) - delivered.get(number, 0)
                    if gap > 0:
                        lost[number] = gap
            cursor, seen = appended, counts
            if entries or lost:
                self._deliver(subscribers, entries, lost)

    @staticmethod
    def _deliver(
        subscribers: list[Subscription],
        entries: list[tuple[int, dict[str, Any] | str]],
        lost: dict[int, int],
    ) -> None:
        lines: list[tuple[int, bytes]] = []
        for number, event in entries:
            try:
                lines.append((number, _ndjson(event)))
            except Exception:  # one unrenderable event must not end the feed
                lost[number] = lost.get(number, 0) + 1
        for level in sorted({sub.min_level for sub in subscribers}):
            chosen = [line for number, line in lines if number >= level]
            missed = sum(count for number, count in lost.items() if number >= level)
            if not chosen and not missed:
                continue
            batches = [
                (b"".join(chosen[at : at + FOLLOW_BATCH]), len(chosen[at : at + FOLLOW_BATCH]))
                for at in range(0, len(chosen), FOLLOW_BATCH)
            ]
            for sub in subscribers:
                if sub.min_level == level:
                    sub.push(batches, missed)


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
        """Take new logging settings live: ``prepare`` then ``commit``."""
        self.commit(self.prepare(settings))

    def prepare(self, settings: LoggingConfig) -> PreparedLogging:
        """What can fail in taking ``settings`` (opening a new output), done ahead.

        Nothing changes until ``commit``; ``discard`` gives the prepared output up. A
        reload prepares this with everything else that can fail, so it is all or nothing.
        """
        if settings.output == self.settings.output:
            return PreparedLogging(settings)
        fd, journal = self.sink.open_target(settings.output)
        return PreparedLogging(settings, fd, journal)

    def commit(self, prepared: PreparedLogging) -> None:
        """Switch to prepared settings; cannot fail."""
        settings = prepared.settings
        if prepared.fd is not None:
            fd, prepared.fd = prepared.fd, None
            self.sink.switch(settings.output, fd, prepared.journal)
        if settings.ring_size != self.settings.ring_size:
            self.ring.resize(settings.ring_size)
        self.settings = settings
        self.set_level(settings.level)
        self._render = self._make_renderer()

    @staticmethod
    def discard(prepared: PreparedLogging) -> None:
        """Give up prepared settings: close the output opened for them."""
        if prepared.fd is not None:
            fd, prepared.fd = prepared.fd, None
            os.close(fd)


@dataclass(slots=True)
class PreparedLogging:
    """New logging settings with their output already open (``LogSystem.prepare``)."""

    settings: LoggingConfig
    #: The new output's descriptor, when the output changes; None once used or closed.
    fd: int | None = None
    journal: Any = None


def get_logger(**context: Any) -> Any:
    """A logger bound to ``context``; cheap, call it where the context is known."""
    return structlog.get_logger().bind(**context) if context else structlog.get_logger()
