"""Handlers used by the end-to-end tests; importable by the daemon as ``tests.handlers:Name``."""

from __future__ import annotations

import contextvars
import json
import socketserver
import threading
import time
from typing import Any

from sockd.handlers import ActionError, JSONActionHandler, SockdHandler, action


class PlainEcho(socketserver.BaseRequestHandler):
    """Written exactly as the standard library documents: knows nothing of sockd."""

    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class Boom(socketserver.BaseRequestHandler):
    """Raises on a connection that sends "boom", echoes otherwise."""

    def handle(self) -> None:
        data = self.request.recv(4096)
        if data.startswith(b"boom"):
            raise RuntimeError("handler exploded on purpose")
        self.request.sendall(data)


class SlowReply(SockdHandler):
    """Reads one line, announces it in the log, waits ``options.delay`` s, replies."""

    def handle(self) -> None:
        line = self.request.makefile("rb").readline()
        self.log.info("test.received", line=line.decode().strip())
        delay = float(self.options.get("delay", 0.5))
        time.sleep(delay)  # sleep-ok: simulated work in a test handler
        self.request.sendall(b"done:" + line)


class Silent(SockdHandler):
    """Never answers: blocks reading until the peer (or a drain cut) closes."""

    def handle(self) -> None:
        self.log.info("test.blocked")
        while self.request.recv(4096):
            pass


class ReplyOnLine(SockdHandler):
    """Announces the connection, then waits (through a drain too) for one line and answers it.

    The client decides when the request finishes; a connection closed or cut before the
    line arrives ends without a reply.
    """

    def handle(self) -> None:
        self.log.info("test.blocked")
        line = self.request.makefile("rb").readline()
        if line:
            self.request.sendall(b"done:" + line)


class Stubborn(SockdHandler):
    """Ignores the socket and the drain: only the deadline's kill can end it (forking)."""

    def handle(self) -> None:
        self.log.info("test.blocked")
        while True:
            time.sleep(0.05)  # sleep-ok: simulated work that never finishes


class DrainAware(SockdHandler):
    """Streams ticks until a drain begins, then says goodbye and returns."""

    def handle(self) -> None:
        self.log.info("test.blocked")
        while not self.draining.wait(0.02):
            pass
        self.request.sendall(b"bye\n")


class Options(SockdHandler):
    """Replies with its handler_options as JSON, so tests can see what it was given."""

    def handle(self) -> None:
        import json

        self.request.recv(16)
        self.request.sendall(json.dumps(self.options).encode() + b"\n")


class Tagged(SockdHandler):
    """Echo that prefixes replies with ``options.tag`` (to tell handlers apart in reloads)."""

    def handle(self) -> None:
        tag = str(self.options.get("tag", "a")).encode()
        while data := self.request.recv(4096):
            self.request.sendall(tag + b":" + data)


class TaggedB(Tagged):
    """The same as Tagged under another name, for handler-change reloads."""

    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(b"B:" + data)


class Calculator(JSONActionHandler):
    """A JSON action service as the socketserver tutorials write them."""

    secret = "not an action"  # noqa: S105  # a plain attribute, not a password

    @action
    def add(self, request: dict[str, Any]) -> Any:
        values = request.get("values")
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
            raise ActionError("bad_request", '"values" must be a list of numbers')
        return sum(values)

    @action(name="echo")
    def echo_back(self, request: dict[str, Any]) -> Any:
        return request.get("text")

    @action
    def fail(self, request: dict[str, Any]) -> Any:
        raise ValueError("action failed on purpose")

    def helper(self, request: dict[str, Any]) -> Any:
        return "must never be reachable"


class SetupBoom(socketserver.BaseRequestHandler):
    """Raises in setup(), before handle() ever runs."""

    def setup(self) -> None:
        raise RuntimeError("setup exploded on purpose")

    def handle(self) -> None:
        self.request.sendall(b"unreachable")


class FinishBoom(socketserver.BaseRequestHandler):
    """Answers, then raises in finish()."""

    def handle(self) -> None:
        self.request.sendall(self.request.recv(100))

    def finish(self) -> None:
        raise RuntimeError("finish exploded on purpose")


class FdHog(SockdHandler):
    """Opens descriptors until the process runs out, holds them until the peer closes."""

    def handle(self) -> None:
        import os

        held: list[int] = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        self.log.info("test.hogging", held=len(held))
        try:
            while self.request.recv(100):
                pass
        finally:
            for fd in held:
                os.close(fd)


class LineEcho(JSONActionHandler):
    """Echoes line by line (blank lines skipped); at a drain it answers every line the
    client already sent, then closes at a request boundary.

    Requests are never cut in half, nor dropped once sent. The drain-aware line reading
    is JSONActionHandler's; each line is echoed as is instead of parsed.
    """

    def dispatch_line(self, line: bytes) -> None:
        self.request.sendall(line)


class NaiveDrain(SockdHandler):
    """The naive pattern: ends as soon as the drain flag is set, even with a request
    unread in the socket (so a queued client gets EOF without an answer)."""

    def handle(self) -> None:
        rfile = self.request.makefile("rb")
        while not self.draining.is_set():
            line = rfile.readline(65536)
            if not line:
                return
            self.request.sendall(line)


class Picky(SockdHandler):
    """Declares what its options must be; sockd checks them when the config is loaded."""

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        if not isinstance(options.get("root"), str):
            return ['root: expected a directory path, e.g. root = "/srv/files"']
        return []

    def handle(self) -> None:
        self.request.sendall(str(self.options["root"]).encode())


class Chatter(SockdHandler):
    """Writes a lot without reading: a client that hangs up makes sendall fail."""

    def handle(self) -> None:
        self.log.info("test.blocked")
        while True:
            self.request.sendall(b"x" * 65536)


_VISITS: contextvars.ContextVar[int] = contextvars.ContextVar("visits", default=0)


class WhoAmI(socketserver.BaseRequestHandler):
    """Replies with the thread serving it and a context variable it then changes;
    holds the connection (and its thread) until the client closes."""

    def handle(self) -> None:
        visits = _VISITS.get()
        _VISITS.set(visits + 1)
        reply = {
            "thread": threading.current_thread().name,
            "native_id": threading.get_native_id(),
            "visits": visits,
        }
        self.request.sendall(json.dumps(reply).encode() + b"\n")
        self.request.recv(1)


# --- lifecycle hardening (issue 9) ---------------------------------------------------------


def _wait_for_file(path: str, limit: float = 60.0) -> bool:
    """Poll for ``path`` up to ``limit`` s (bounded: a test that forgets it cannot hang)."""
    import os

    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # sleep-ok: a test handler waiting for the test's signal file
    return True


class CutIgnorer(SockdHandler):
    """Ignores the drain and the cut: keeps reading, swallowing every error, sleeping."""

    def handle(self) -> None:
        import contextlib

        self.log.info("test.blocked")
        while True:
            with contextlib.suppress(BaseException):  # ignoring everything is the point
                self.request.recv(4096)
            time.sleep(0.05)  # sleep-ok: a handler that never ends on its own


class MakesDir(SockdHandler):
    """check_options creates the directory named by ``make_dir``: a path that was a free
    file name when ``logging.output`` was validated is a directory when it is opened."""

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        import os

        if isinstance(options.get("make_dir"), str):
            os.makedirs(options["make_dir"], exist_ok=True)
        return []

    def handle(self) -> None:
        self.request.sendall(self.request.recv(100))


class SlowCheck(SockdHandler):
    """check_options touches ``started`` then blocks until ``release`` exists (bounded);
    echoes. Without those options it returns at once (the start-up load).

    ``validation_timeout`` (read at start-up, before the daemon is built) shortens the
    daemon's reload validation deadline, so a test can reach it in a second.
    """

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        timeout = options.get("validation_timeout")
        if isinstance(timeout, int | float):
            import sockd.daemon

            sockd.daemon.VALIDATION_TIMEOUT = float(timeout)  # type: ignore[misc]
        started, release = options.get("started"), options.get("release")
        if isinstance(started, str) and isinstance(release, str):
            import os

            with open(started, "w"):
                pass
            _wait_for_file(release)
            os.unlink(started)  # tells the test this check has returned
        return []

    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class LockHog(SockdHandler):
    """Holds the daemon's connection registry lock until the file ``release`` exists:
    in-process user code wedging the main loop (its housekeeping needs that lock)."""

    def handle(self) -> None:
        lock = self.server.hub.registry.lock  # type: ignore[attr-defined]
        with lock:
            self.log.info("test.blocked")
            _wait_for_file(str(self.options["release"]), 30.0)
        self.request.sendall(b"released\n")


class Trickle(SockdHandler):
    """Streams ``chunk`` bytes every ``every`` s for ``seconds`` s, then "end"; reads nothing."""

    def handle(self) -> None:
        every = float(self.options.get("every", 0.1))
        chunk = b"." * int(self.options.get("chunk", 100))
        end = time.monotonic() + float(self.options.get("seconds", 1.5))
        while time.monotonic() < end:
            self.request.sendall(chunk)
            time.sleep(every)  # sleep-ok: a slow but steady download
        self.request.sendall(b"end\n")


class Exits(SockdHandler):
    """Raises SystemExit (or KeyboardInterrupt with ``interrupt`` in the request)."""

    def handle(self) -> None:
        data = self.request.recv(100)
        if b"interrupt" in data:
            raise KeyboardInterrupt("handler interrupted on purpose")
        raise SystemExit("handler exited on purpose")
