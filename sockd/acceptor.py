"""The accept loop: one thread serving every listener, woken at once by a ``Waker``.

One ``Acceptor`` thread serves every listener with one ``selectors`` loop instead of
``serve_forever``'s 0.5 s poll: its ``Waker`` wakes it at once for a stop, a pause or a
listener swap, so an idle daemon stops in milliseconds. It stops watching the listeners
while the hub is at capacity (connections wait in the backlog), backs off when accept
fails for want of descriptors or buffers, and answers the daemon's heartbeat
(``Acceptor.beat``): the main loop feeds systemd's watchdog only while both loops turn,
so a stuck accept loop or a stuck main loop gets the service restarted.

``Waker`` (the self-pipe) lives here and is used by the daemon's main loop too: one
implementation, one instance per loop.

May import ``sockd.listeners``, ``sockd.admission`` and ``sockd.config``; only the
daemon builds on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Final

from sockd.admission import Hub
from sockd.config import Address
from sockd.listeners import Listener

#: Connections accepted per readiness event. One, as socketserver does: when more are
#: pending, epoll reports the socket ready again at once, while a speculative second
#: accept() that fails with EAGAIN costs a syscall and an exception on every connection.
ACCEPT_BATCH: Final = 1
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 1.0

_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)
_ACCEPT_TRANSIENT_ERRORS: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
)


class Waker:
    """Wakes one thread blocked in ``select``: a non-blocking socketpair, a byte per wake-up.

    One class, one instance per loop, rather than one pipe shared by the main loop and
    the serving loop: they are different threads, each blocking in its own ``select``.
    A shared pipe would have two readers, and whichever drained it first would swallow
    the other's wake-up (a stop lost by the serving loop, or a signal's byte, written
    here by ``signal.set_wakeup_fd``, eaten by it). Writes never block: a full buffer
    already means "wake up". Register the waker itself with a selector (``fileno``).
    """

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        """The reading end, for a selector."""
        return self._r.fileno()

    @property
    def write_fd(self) -> int:
        """The writing end, for ``signal.set_wakeup_fd``."""
        return self._w.fileno()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._w.send(b"\0")

    def clear(self) -> None:
        """Read every pending wake-up (in the thread that selects on it)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Acceptor:
    """The serving loop: one thread, every listener, woken at once by its ``Waker``."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.listeners: dict[Address, Listener] = {}
        self._selector = selectors.DefaultSelector()
        self._waker = Waker()
        self._selector.register(self._waker, selectors.EVENT_READ, None)
        self._commands: list[tuple[Callable[[], None], Future[None]]] = []
        self._lock = threading.Lock()
        #: Set (under ``_lock``) once the loop has ended: commands then run in the caller.
        self._ended = False
        self._stop = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.paused = False
        self._registered = False
        self._backoff = 0.0
        self._backoff_until = 0.0
        self._last_accept_error_log = 0.0
        self._suppressed_accept_errors = 0
        #: Heartbeats the daemon asked for and the last one this loop answered.
        self._beats_asked = 0
        self._beats_answered = 0

    @property
    def throttled(self) -> bool:
        """Not accepting because of a limit (not a pause): a closing connection must wake us."""
        return not self._registered and not self.paused and bool(self.listeners)

    # ---------------------------------------------------------------- thread control
    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="acceptor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._waker.wake()

    def sockets(self) -> list[socket.socket]:
        """The listening sockets now (a forked child closes its copies)."""
        return [lst.socket for lst in list(self.listeners.values())]

    def call(self, fn: Callable[[], None], timeout: float = 10.0) -> None:
        """Run ``fn`` on the serving thread between accepts and wait for it."""
        self.submit(fn).result(timeout)  # TimeoutError: the serving loop did not answer

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        """Run ``fn`` on the serving thread's next turn, without waiting for it.

        The future is done once it ran (with its exception, if it raised). Before the
        loop starts or after it ended, ``fn`` runs at once in the caller.
        """
        done: Future[None] = Future()
        with self._lock:
            queued = not self._ended and self._thread is not None and self._thread.is_alive()
            if queued:
                self._commands.append((fn, done))
        if queued:
            self.wake()
        else:
            self._run(fn, done)
        return done

    def _run(self, fn: Callable[[], None], done: Future[None]) -> None:
        try:
            fn()
        except Exception as exc:
            self.hub.log.exception("server.error", where="serving loop command")
            done.set_exception(exc)
        else:
            done.set_result(None)

    def answers(self, timeout: float) -> bool:
        """Whether the serving loop takes a turn within ``timeout`` s (True if not running).

        Asked before committing a reload: a loop stuck in a call (user code holding a
        lock it needs) would otherwise apply the new listener table whenever it comes
        back, long after the reload was answered.
        """
        if self._thread is None or not self._thread.is_alive() or self._stop:
            return True
        try:
            self.submit(lambda: None).result(timeout)
        except TimeoutError:
            return False
        return True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the loop; called from another thread (from the loop itself it would deadlock).

        False if the loop did not stop within ``timeout`` (stuck in a call): the caller
        goes on without it.
        """
        self._stop = True
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            return self._stopped.wait(timeout)
        return True

    def beat(self) -> bool:
        """Whether this loop answered the previous heartbeat; asks for the next one.

        The daemon's main loop calls this before each watchdog ping: the ping goes out
        only while both loops turn. True when the loop is not running (before start,
        after a stop): there is nothing to wait for.
        """
        if self._thread is None or not self._thread.is_alive() or self._stop:
            return True
        answered = self._beats_answered == self._beats_asked
        self._beats_asked += 1
        self.wake()
        return answered

    # ---------------------------------------------------------------- listeners
    def add(self, listener: Listener) -> None:
        def do() -> None:
            self.listeners[listener.address] = listener
            self._sync_registration(force=True)

        self.call(do)

    def remove(self, address: Address) -> Listener | None:
        removed: list[Listener] = []

        def do() -> None:
            listener = self.listeners.pop(address, None)
            if listener is not None:
                removed.append(listener)
            self._sync_registration(force=True)

        self.call(do)
        return removed[0] if removed else None

    def replace(self, listeners: dict[Address, Listener]) -> None:
        """Swap the listener table without waiting for the serving loop.

        Called in a reload's commit phase, where nothing may block or fail: the table
        (the daemon's view, and what the loop registers from) changes at once, and the
        loop re-registers on its next turn. Until then a listener it still watches but
        that is no longer in the table is skipped, and its socket may be closed under
        it (see ``_accept``); a new one is watched from that turn on.
        """
        self.listeners = dict(listeners)  # a new dict, never mutated: safe to read anywhere
        if self._thread is None or not self._thread.is_alive():
            self._sync_registration(force=True)
            return
        self.submit(lambda: self._sync_registration(force=True))

    def set_paused(self, paused: bool) -> Future[None]:
        """Pause or resume accepting on the loop's next turn; done once it is in force.

        Called by the daemon's main thread, the one writer of the pause; ``paused`` is
        this loop's applied copy, written only here on the serving thread.
        """

        def do() -> None:
            self.paused = paused
            self._sync_registration()

        return self.submit(do)

    # ---------------------------------------------------------------- the loop
    def _want_accepting(self, now: float) -> bool:
        return not self.paused and now >= self._backoff_until and not self.hub.at_capacity()

    def _sync_registration(self, force: bool = False) -> None:
        want = self._want_accepting(time.monotonic())
        if want == self._registered and not force:
            return
        if not want and not self.paused:
            reason = self.hub.capacity_reason()
            if reason is not None:
                self.hub.registry.throttled(reason)
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._selector.unregister(key.fileobj)
        if want:
            for listener in self.listeners.values():
                try:
                    self._selector.register(listener.socket, selectors.EVENT_READ, listener)
                except (OSError, ValueError, KeyError):
                    # Closed by a reload swapping the table under this loop: the swap
                    # has queued a re-registration from the new table already.
                    continue
        self._registered = want

    def _timeout(self, now: float) -> float | None:
        deadlines = []
        if self._backoff_until > now:
            deadlines.append(self._backoff_until - now)
        if not self._registered and self.hub.at_capacity():
            deadlines.append(0.5)  # a safety net: closes also wake us
        return max(0.0, min(deadlines)) if deadlines else None

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._sync_registration(force=True)
            while not self._stop:
                now = time.monotonic()
                ready = self._selector.select(self._timeout(now))
                if self._stop:
                    break
                for key, _ in ready:
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._accept(key.data)
                self.service_actions()
        finally:
            # Commands queued but not run are run here: whoever waits for one hears
            # back, and later ones run in their caller (``submit``).
            with self._lock:
                self._ended = True
                commands, self._commands = self._commands, []
            for fn, done in commands:
                self._run(fn, done)
            self._stopped.set()

    def _drain_wakeups(self) -> None:
        self._waker.clear()
        self._beats_answered = self._beats_asked
        with self._lock:
            commands, self._commands = self._commands, []
        for fn, done in commands:
            self._run(fn, done)

    def service_actions(self) -> None:
        """Once per loop turn: re-check limits and back-off."""
        self._sync_registration()

    def _accept(self, listener: Listener) -> None:
        if self.listeners.get(listener.address) is not listener:
            # Retired by a reload not yet applied here (``replace``): the daemon takes
            # its queue. Re-register from the new table now.
            self._sync_registration(force=True)
            return
        for _ in range(ACCEPT_BATCH):
            if self.hub.at_capacity():
                self._sync_registration()
                return
            try:
                request, client_address = listener.get_request()
            except (BlockingIOError, InterruptedError):
                self._backoff = 0.0
                return
            except OSError as exc:
                if listener.socket.fileno() < 0:
                    return  # closed by a reload between the check above and the accept
                self._accept_failed(exc)
                return
            self._backoff = 0.0
            try:
                if listener.verify_request(request, client_address):
                    listener.process_request(request, client_address)
                else:
                    listener.refuse(request)
            except Exception:
                self.hub.log.exception("server.error", where="process_request")
                conn = request.sockd_conn
                if conn is not None:
                    self.hub.registry.remove(conn, None)
                listener.refuse(request)

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors or buffers: back off instead of spinning, log rate-limited."""
        now = time.monotonic()
        with self.hub.registry.lock:
            self.hub.registry.counters.accept_errors += 1
        if exc.errno in _ACCEPT_RESOURCE_ERRORS:
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self._backoff * 2))
            self._backoff_until = now + self._backoff
            self._sync_registration()
        elif exc.errno not in _ACCEPT_TRANSIENT_ERRORS:
            self._backoff = BACKOFF_MAX
            self._backoff_until = now + self._backoff
            self._sync_registration()
        if now - self._last_accept_error_log >= 1.0:
            self.hub.log.error(
                "accept.error",
                error=os.strerror(exc.errno) if exc.errno else str(exc),
                errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                suppressed=self._suppressed_accept_errors,
                backoff_s=round(self._backoff, 3),
            )
            self._last_accept_error_log = now
            self._suppressed_accept_errors = 0
        else:
            self._suppressed_accept_errors += 1
