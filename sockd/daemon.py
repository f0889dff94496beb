"""Lifecycle: start, the main loop, reload, graceful stop. The only module that composes the rest.

One door into the lifecycle: everything that changes the daemon's state (signals, and
the control requests stop, reload, pause, resume, log-level, reopen-logs and kick)
becomes an event on one queue consumed by the main thread, dispatched by its ``kind`` to
``Daemon._handle_<kind>`` (gunicorn's arbiter shape). The main thread is the only writer
of the state, the log level and the pause, so a pause racing a stop cannot overwrite
"draining" with "paused". A control request waits for its answer through the event's
future, with a timeout that becomes ``BackendUnavailable`` (503), never an uncaught
exception. Signal handlers only enqueue: logging from a handler can deadlock on a lock
the interrupted code holds. ``signal.set_wakeup_fd`` writes to the main loop's
``Waker``, so its ``select`` returns whichever thread the kernel delivered the signal
to, and a stop is handled in microseconds, not at the next poll.

The serving loop runs in its own thread (``sockd.acceptor.Acceptor``); ``shutdown()`` is called
from the main thread, never from the serving thread (that would deadlock), and the
drain that follows has a deadline (the standard library's join on close has none).

Nothing that can hang runs on the main thread: reading the config file at a reload
imports the handler's module and calls its ``check_options`` (user code), so that runs in
a thread of its own under a deadline while the main loop goes on reaping, closing idle
connections and answering stops. systemd's watchdog is fed from the main loop, and only
while the serving loop answers its heartbeat too: either one stuck stops the pings.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import queue
import resource
import selectors
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

import structlog

from sockd import __version__, systemd
from sockd.acceptor import Acceptor, Waker
from sockd.admission import Hub
from sockd.config import Address, Config, diff, load, redact_changes
from sockd.connections import Connection, Registry, close_gently, log_close
from sockd.control import BackendConflict, BackendUnavailable, ControlServer, ReloadOutcome
from sockd.errors import ConfigError, ControlError, StartupError
from sockd.listeners import (
    LISTENER_CLASSES,
    Listener,
    accept_queue_length,
    bind_socket,
    finish_child,
    stop_handshakes,
)
from sockd.logs import LogSystem, PreparedLogging, Subscription
from sockd.protocol import LOG_LEVELS, ConfigDump, State, Stats, Status, iso_time
from sockd.protocol import Connection as ConnectionInfo
from sockd.views import Views

#: ``shutdown_timeout`` is the stop's deadline: the process exits within it plus this.
EXIT_MARGIN: Final = 0.5
#: Seconds the drain waits, after cutting connections at the deadline, for handler
#: threads and children to notice before children are killed (handler threads are
#: daemon threads: one that ignores the cut does not keep the process alive).
CUT_GRACE: Final = 0.25
#: At most this long for the serving loop to stop at a drain (it may be stuck in a call).
ACCEPTOR_STOP_WAIT: Final = 0.25
#: At a stop, how long the emptied accept queues are watched for handshakes that were
#: half done when new ones were shut out (their last ACK in flight: one round trip).
BACKLOG_SETTLE: Final = 0.01
HOUSEKEEPING_INTERVAL: Final = 1.0
#: Tiny timeouts are checked this often at most (not a busy loop).
MIN_HOUSEKEEPING_INTERVAL: Final = 0.05
#: How long a control request waits for the main thread to answer a reload or a stop.
RELOAD_WAIT: Final = 120.0
#: How long it waits for a pause, resume, log-level, reopen-logs or kick: the main loop
#: answers these in microseconds (a pause once the serving loop applied it), so this is
#: only reached when a loop is stuck; within sockctl's default 30 s request timeout.
COMMAND_WAIT: Final = 10.0
#: Seconds a reload (or dry run) may spend reading the config file, which imports the
#: handler's module and runs its check_options: user code that may hang. Within
#: sockctl's default 30 s request timeout. A validation still running after this is
#: rejected and its thread left behind (a daemon thread: it never blocks an exit).
VALIDATION_TIMEOUT: Final = 20.0
#: Seconds a reload waits for the serving loop to take a turn before it is refused (it
#: answers in microseconds unless stuck). Waited for in the validation thread, never on
#: the main thread.
SERVING_LOOP_ANSWER: Final = 1.0


# The events on the main loop's queue. Each names its handler by ``kind``
# (``Daemon._handle_<kind>``); one from a control request carries a ``reply`` future
# that the main thread answers (or fails with a ``Backend*`` error).


@dataclass(slots=True)
class StopEvent:
    kind: ClassVar[str] = "stop"
    source: str
    timeout: float | None = None
    #: For a control-channel stop: answered with the stop actually in force.
    reply: Future[StopEvent] | None = None


@dataclass(slots=True)
class ReloadEvent:
    kind: ClassVar[str] = "reload"
    source: str
    reply: Future[ReloadOutcome] | None = None
    dry_run: bool = False


@dataclass(slots=True)
class ReopenEvent:
    kind: ClassVar[str] = "reopen"
    source: str
    reply: Future[dict[str, Any]] | None = None


@dataclass(slots=True)
class PauseEvent:
    """``paused``: True for a pause, False for a resume."""

    kind: ClassVar[str] = "pause"
    paused: bool
    reply: Future[dict[str, Any]]


@dataclass(slots=True)
class LogLevelEvent:
    kind: ClassVar[str] = "log_level"
    level: str
    reply: Future[dict[str, Any]]


@dataclass(slots=True)
class KickEvent:
    kind: ClassVar[str] = "kick"
    conn_id: int
    reply: Future[bool]


@dataclass(slots=True)
class ReloadRecord:
    at: float
    result: str
    generation: int
    changes: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """As ``GET /v1/status`` shows it to every role: secret settings' values hidden
        (an admin reads them in ``GET /v1/config`` or the reload's own answer)."""
        return {
            "at": iso_time(self.at),
            "result": self.result,
            "generation": self.generation,
            "changes": redact_changes(self.changes),
            "errors": self.errors,
        }


@dataclass(slots=True, eq=False)
class Validation:
    """A reload's (or dry run's) reading of the config file, run in a thread of its own.

    Reading the file imports the handler's module and calls its ``check_options``: user
    code, which may hang. The main loop waits for the result as an event, up to
    ``deadline``, and keeps serving meanwhile.
    """

    request: ReloadEvent
    path: str
    deadline: float
    config: Config | None = None
    handler_cls: type[socketserver.BaseRequestHandler] | None = None
    problems: list[str] = field(default_factory=list)
    error: Exception | None = None
    #: Whether the serving loop took a turn when asked, after the file was read.
    serving_loop_answers: bool = True


@dataclass(slots=True)
class ValidatedEvent:
    kind: ClassVar[str] = "validated"
    job: Validation


Event = (
    StopEvent | ReloadEvent | ReopenEvent | PauseEvent | LogLevelEvent | KickEvent | ValidatedEvent
)
_T = TypeVar("_T")


def _settle(
    reply: Future[_T] | None, result: _T | None = None, error: Exception | None = None
) -> None:
    """Answer a waiting control request once (a second answer is dropped)."""
    if reply is None or reply.done():
        return
    with contextlib.suppress(Exception):  # InvalidStateError: answered meanwhile
        if error is not None:
            reply.set_exception(error)
        else:
            reply.set_result(result)  # type: ignore[arg-type]


#: ``FDNAME=`` prefix of the listening sockets sockd keeps in systemd's fd store.
FDSTORE_PREFIX: Final = "sockd-listen-"


def fdstore_name(address: Address) -> str:
    """A valid ``FDNAME=`` (no ``:``) naming a configured address."""
    return FDSTORE_PREFIX + f"{address.host}_{address.port}".replace(":", ".")


def _quiet_find(inherited: systemd.InheritedSocket, address: Address) -> Any:
    try:
        return systemd.find_inherited([inherited], address.host, address.port)
    except systemd.SystemdError:
        return None


#: Descriptors kept free for the control channel, log files and reload binds.
FD_RESERVE: Final = 32


def _fd_capacity() -> int:
    """How many connections fit under RLIMIT_NOFILE beside what is open now and the reserve.

    Accepting stops at this number (connections wait in the backlog) instead of running
    into EMFILE, so an fd-starved daemon still answers its control channel.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 62
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    return max(1, soft - in_use - FD_RESERVE)


class Daemon:
    """One running sockd; also the control channel's backend."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: "systemd" when systemd started us (it puts these in a unit's environment;
        #: read once, before anything may unset them): status and stop report it, so
        #: sockctl stop can warn that stopping behind systemd's back defeats Restart=.
        self.supervisor = (
            "systemd"
            if os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID")
            else None
        )
        self.config_path = config.path
        self.generation = 1
        self.state = State.STARTING
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.last_reload: ReloadRecord | None = None
        self.reloads: dict[str, int] = {"applied": 0, "rejected": 0}
        self.logs = LogSystem(config.logging)
        self.log: Any = structlog.get_logger()
        self.registry = Registry(on_close=self._on_connection_closed)
        self.hub = Hub(
            config.server,
            config.handler_class(),
            self.registry,
            log=self.log,
            listen_sockets=self._listen_sockets,
        )
        self.acceptor = Acceptor(self.hub)
        self.views = Views(self, self.registry, self.hub, self.acceptor, self.logs)
        self.control: ControlServer | None = None
        self.notifier = systemd.Notifier(on_error=self._notify_failed)
        self._notify_errors: set[str] = set()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        #: The main loop's waker (the serving loop has its own: see ``Waker``).
        self._waker = Waker()
        #: Whether accepting is paused (``sockctl pause``); written by the main thread only.
        self.paused = False
        #: A SIGHUP in the batch of events being handled (a burst is one reload).
        self._signal_reload = False
        self._closed = False
        self._reload_lock = threading.Lock()
        self._stop: StopEvent | None = None
        self._cut_short = False
        self._old_handlers: dict[signal.Signals, Any] = {}
        self._last_status = ""
        #: Reloads and dry runs waiting for the one in validation (``_validation``).
        self._reloads: collections.deque[ReloadEvent] = collections.deque()
        self._validation: Validation | None = None
        self.validation_timeout = VALIDATION_TIMEOUT
        #: Seconds between WATCHDOG=1 pings (None: no watchdog), and when the next is due.
        self.watchdog_interval: float | None = None
        self._next_watchdog = 0.0

    # ------------------------------------------------------------------ plumbing
    def _wake(self) -> None:
        self._waker.wake()

    def _post(self, event: Event) -> None:
        self._events.put(event)
        self._wake()

    def _ask(self, event: Event, reply: Future[_T], wait: float, what: str) -> _T:
        """Post ``event`` and wait up to ``wait`` s for the main thread's answer.

        Runs in a control-request thread. The main thread answers with a result or a
        ``Backend*`` error; no answer in time is ``BackendUnavailable`` (503).
        """
        self._post(event)
        try:
            return reply.result(timeout=wait)
        except TimeoutError:
            raise BackendUnavailable(
                f"the daemon did not answer the {what} within {wait:g} s "
                "(its main loop or serving loop is stuck, or it is stopping)"
            ) from None

    def _listen_sockets(self) -> list[socket.socket]:
        """The hub's ``listen_sockets``: what a forked child closes."""
        return self.acceptor.sockets()

    def _notify_failed(self, message: str) -> None:
        """``Notifier``'s on_error: a broken NOTIFY_SOCKET is logged once per distinct error."""
        if message not in self._notify_errors:
            self._notify_errors.add(message)
            self.log.error("server.error", where="sd_notify", error=message)

    def _on_connection_closed(self) -> None:
        if self.state == State.DRAINING:
            self._wake()
        if self.acceptor.throttled:
            self.acceptor.wake()  # a slot freed up under max_connections

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """Install our handlers; restore the previous ones on the way out."""

        def on_stop(signum: int, _: Any) -> None:
            self._events.put(StopEvent(signal.Signals(signum).name))

        def on_hup(_: int, __: Any) -> None:
            self._events.put(ReloadEvent("SIGHUP"))

        def on_usr1(_: int, __: Any) -> None:
            self._events.put(ReopenEvent("SIGUSR1"))

        def on_chld(_: int, __: Any) -> None:
            pass  # the wakeup fd already woke the main loop, which reaps

        table: dict[signal.Signals, Callable[[int, Any], None]] = {
            signal.SIGTERM: on_stop,
            signal.SIGINT: on_stop,
            signal.SIGHUP: on_hup,
            signal.SIGUSR1: on_usr1,
            signal.SIGCHLD: on_chld,
        }
        for sig, fn in table.items():
            self._old_handlers[sig] = signal.signal(sig, fn)
        old_fd = signal.set_wakeup_fd(self._waker.write_fd, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)

    # ------------------------------------------------------------------ start
    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Start, serve until told to stop, drain; returns the process exit status.

        Whatever happens (a startup error, a bug in the loop), the ``finally`` stops the
        serving loop, closes the control channel and the listeners, and tells every
        control request still waiting that the daemon has stopped.
        """
        with self._signals():
            try:
                self._start_or_explain()
                if on_ready is not None:
                    on_ready()
                self._main_loop()
                self._drain()
            finally:
                self._clean_up()
        return 0

    def _start_or_explain(self) -> None:
        """``_start``; a failure to start is logged and raised as a startup error.

        The one place a systemd-protocol error (LISTEN_FDS, WATCHDOG_USEC, NOTIFY_SOCKET)
        becomes a ``StartupError``.
        """
        try:
            try:
                self._start()
            except systemd.SystemdError as exc:
                raise StartupError(str(exc)) from None
        except (StartupError, ConfigError) as exc:
            self.log.error("server.error", error=str(exc))
            raise

    def _clean_up(self) -> None:
        if not self.acceptor.shutdown(ACCEPTOR_STOP_WAIT):
            self.log.error("server.error", where="exit", error="the serving loop did not stop")
        self._close_everything()
        self._abandon_reloads()
        self._refuse_waiting()

    def _refuse_waiting(self) -> None:
        """Events left on the queue at exit: their callers hear that the daemon stopped."""
        unavailable = BackendUnavailable("the daemon has stopped")
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            reply = getattr(event, "reply", None)
            if isinstance(event, StopEvent) and self._stop is not None:
                _settle(reply, self._stop)
            else:
                _settle(reply, error=unavailable)

    def _start(self) -> None:
        config = self.config
        self.log.info(
            "server.starting",
            version=__version__,
            pid=os.getpid(),
            config_path=self.config_path,
            mode=config.server.mode,
            handler=config.server.handler,
        )
        # First: a malformed WATCHDOG_USEC is a startup error before anything is created.
        self.watchdog_interval = systemd.watchdog_interval()
        inherited = self._inherited_sockets()
        listeners: dict[Address, Listener] = {}
        try:
            for address in config.server.listen:
                sock = inherited.pop(address, None)
                listeners[address] = self._make_listener(address, sock)
        except OSError as exc:
            for listener in listeners.values():
                listener.socket.close()
            raise StartupError(exc.strerror or str(exc)) from None
        for leftover in inherited.values():
            leftover.close()
        self.acceptor.listeners = listeners
        self._store_fds(listeners.values())
        try:
            self.control = ControlServer(config.control, self, self.log)
            self.control.start()
        except ControlError as exc:
            raise StartupError(str(exc)) from None
        self.hub.fd_capacity = _fd_capacity()
        self.acceptor.start()
        for listener in listeners.values():
            self.log.info("server.listening", address=listener.label, inherited=listener.inherited)
        self.state = State.RUNNING
        # Everything built so far lives as long as the daemon: move it out of the cyclic
        # GC's reach, so collections triggered by per-connection garbage stay cheap (and
        # forked children do not dirty copy-on-write pages by traversing it).
        gc.freeze()
        self.notifier.ready(self._status_line())

    def _inherited_sockets(self) -> dict[Address, socket.socket]:
        """Sockets handed over by systemd: socket activation, or our own fd store."""
        found = systemd.listen_fds()  # a SystemdError is a startup error (``run``)
        if not found:
            return {}
        wanted = list(self.config.server.listen)
        ours = [s for s in found if s.name.startswith(FDSTORE_PREFIX)]
        activated = [s for s in found if not s.name.startswith(FDSTORE_PREFIX)]
        try:
            matched = {a: s.socket for a, s in systemd.match_inherited(activated, wanted).items()}
        except systemd.SystemdError as exc:
            for inherited in found:
                inherited.socket.close()
            raise ConfigError([f"server.listen: {exc}"], self.config_path) from None
        for inherited in ours:
            address = next(
                (a for a in wanted if a not in matched and _quiet_find(inherited, a) is not None),
                None,
            )
            if address is None:
                # Stored by an earlier run for an address no longer configured.
                self.notifier.remove_fds(inherited.name)
                inherited.socket.close()
            else:
                matched[address] = inherited.socket
        return matched

    def _make_listener(self, address: Address, sock: socket.socket | None) -> Listener:
        cls = LISTENER_CLASSES[self.hub.settings.mode]
        return cls(self.hub, address, sock, inherited=sock is not None)

    def _store_fds(self, listeners: Any) -> None:
        """Hand listening sockets to systemd's fd store: a restart gets them back."""
        for listener in listeners:
            self.notifier.store_fds(fdstore_name(listener.address), [listener.fileno()])

    # ------------------------------------------------------------------ main loop
    def _wait(self, timeout: float | None) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._waker, selectors.EVENT_READ)
            if self._events.empty():
                sel.select(timeout)
        self._waker.clear()

    def _main_loop(self) -> None:
        next_housekeeping = time.monotonic()
        while self._stop is None:
            self._wait(max(0.0, min(next_housekeeping, self._next_timer()) - time.monotonic()))
            self._reap()
            self._handle_events()
            now = time.monotonic()
            self._check_validation(now)
            self._feed_watchdog(now)
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + self._housekeeping_interval()

    def _next_timer(self) -> float:
        """The earliest of the watchdog ping and a validation's deadline (inf if none)."""
        due = self._next_watchdog if self.watchdog_interval else float("inf")
        if self._validation is not None:
            due = min(due, self._validation.deadline)
        return due

    def _feed_watchdog(self, now: float) -> None:
        """WATCHDOG=1 from the main loop itself, and only while the serving loop turns too.

        Pinged from here, a main loop stuck anywhere (in user code, on a lock) stops the
        pings and systemd restarts the service; the serving loop's heartbeat covers a
        stuck accept loop. Every ``WatchdogSec=``/2 as sd_watchdog_enabled(3) advises.
        """
        interval = self.watchdog_interval
        if not interval or now < self._next_watchdog:
            return
        if self.acceptor.beat():
            self.notifier.watchdog()
        self._next_watchdog = now + interval

    def _housekeeping_interval(self) -> float:
        settings = self.hub.settings
        limits = [
            max(MIN_HOUSEKEEPING_INTERVAL, t / 4)
            for t in (settings.idle_timeout, settings.max_connection_duration)
            if t
        ]
        return min([HOUSEKEEPING_INTERVAL, *limits])

    def _handle_events(self) -> None:
        """Every event queued so far, in order, each by ``_handle_<kind>``."""
        self._signal_reload = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            handler: Callable[[Any], None] = getattr(self, f"_handle_{event.kind}")
            try:
                handler(event)
            except Exception as exc:  # a bug: the caller hears 500, the daemon goes on
                self.log.exception("server.error", where=f"event {event.kind}")
                _settle(getattr(event, "reply", None), error=exc)
        if self._signal_reload:
            self._queue_reload(ReloadEvent("SIGHUP"))

    def _handle_reload(self, event: ReloadEvent) -> None:
        if event.reply is None and not event.dry_run:
            self._signal_reload = True  # a burst of SIGHUPs is one reload
        else:
            self._queue_reload(event)

    def _handle_validated(self, event: ValidatedEvent) -> None:
        self._validated(event.job)

    def _handle_reopen(self, event: ReopenEvent) -> None:
        self._reopen(event.source)
        _settle(event.reply, {"reopened": True, "output": self.logs.sink.target})

    def _handle_pause(self, event: PauseEvent) -> None:
        """Pause or resume accepting; answered once the serving loop has applied it.

        Refused (409) once a stop is decided: the state is "draining" from then on and
        the serving loop is being shut down. During a reload the state stays
        "reloading" and the reload's end sets "paused" or "running" from ``paused``.
        """
        paused = event.paused
        if self._stop is not None or self.state == State.DRAINING:
            verb = "paused" if paused else "resumed"
            _settle(
                event.reply, error=BackendConflict(f"the daemon is draining; it cannot be {verb}")
            )
            return
        answer = {"state": "paused" if paused else "running"}
        if paused != self.paused:
            self.paused = paused
            if self.state in (State.RUNNING, State.PAUSED):
                self.state = State.PAUSED if paused else State.RUNNING
            self.log.info("server.paused" if paused else "server.resumed")
        applied = self.acceptor.set_paused(paused)

        def answer_when_applied(done: Future[None]) -> None:  # on the serving thread
            error = done.exception()
            _settle(event.reply, answer, error if isinstance(error, Exception) else None)

        applied.add_done_callback(answer_when_applied)

    def _handle_log_level(self, event: LogLevelEvent) -> None:
        previous = self.logs.set_level(event.level)
        self.log.warning("log.level_changed", new_level=event.level, previous_level=previous)
        _settle(event.reply, {"level": event.level, "previous": previous})

    def _handle_kick(self, event: KickEvent) -> None:
        conn = self.registry.get(event.conn_id)
        if conn is not None:
            conn.cut("kicked")
        _settle(event.reply, conn is not None)

    def _handle_stop(self, event: StopEvent) -> None:
        if self._stop is None:
            self._stop = event
        if event.reply is not None:
            event.reply.set_result(self._stop)  # the first stop's timeout is the one in force
        if self._stop is event:
            return
        if event.source != "control":
            # A second SIGTERM/SIGINT during the drain cuts it short (an operator's
            # second Ctrl-C); a second `sockctl stop` only asks about the drain in
            # progress, as a script re-running `stop --wait` does.
            self._cut_short = True

    # ------------------------------------------------------------------ reload queue
    def _queue_reload(self, event: ReloadEvent) -> None:
        """Reloads and dry runs run one at a time, in order; a SIGHUP waiting covers another."""
        if self._stop is not None:
            self._refuse_stopping(event)
            return
        if event.reply is None and any(e.reply is None for e in self._reloads):
            return
        self._reloads.append(event)
        self._next_reload()

    @staticmethod
    def _refuse_stopping(event: ReloadEvent) -> None:
        if event.reply is not None and not event.reply.done():
            event.reply.set_exception(BackendUnavailable("the daemon is stopping; reload refused"))

    def _next_reload(self) -> None:
        """Start validating the next queued reload or dry run, if none is in validation."""
        while self._validation is None and self._reloads:
            event = self._reloads.popleft()
            path = self.config_path
            if path is None:
                self._answer(event, self._outcome_without_file(event))
                continue
            if not event.dry_run:
                self._begin_reloading()
            job = Validation(event, path, time.monotonic() + self.validation_timeout)
            thread = threading.Thread(
                target=self._validate, args=(job,), name="reload-validation", daemon=True
            )
            try:
                thread.start()
            except RuntimeError as exc:  # at the thread limit
                self._conclude_unvalidated(job, f"cannot validate the config now: {exc}")
                continue
            self._validation = job

    def _outcome_without_file(self, event: ReloadEvent) -> ReloadOutcome:
        problem = "sockd was started without a config file to re-read"
        if event.dry_run:
            return ReloadOutcome(False, self.generation, [], [problem])
        return self._reject(event.source, [problem])

    def _validate(self, job: Validation) -> None:
        """In the validation thread: read and validate the file, import the handler."""
        try:
            config = load(job.path)
            job.handler_cls = config.handler_class()
            job.config = config
            if not job.request.dry_run:
                # Asked here, off the main loop, so waiting on a stuck serving loop
                # neither blocks the main loop (a SIGTERM is handled meanwhile) nor runs
                # in the reload's commit phase.
                job.serving_loop_answers = self.acceptor.answers(SERVING_LOOP_ANSWER)
        except ConfigError as exc:
            job.problems = exc.problems
        except Exception as exc:  # a bug, reported to the waiting caller by the main loop
            job.error = exc
        except BaseException as exc:  # SystemExit & co. from the handler's module: its fault
            job.problems = [f"server.handler: loading it raised {type(exc).__name__}: {exc}"]
        self._post(ValidatedEvent(job))

    def _check_validation(self, now: float) -> None:
        """Reject a validation still running at its deadline; its thread is left behind."""
        job = self._validation
        if job is None or now < job.deadline:
            return
        self._validation = None
        self._conclude_unvalidated(
            job,
            f"handler validation did not finish within {self.validation_timeout:g} s "
            "(importing the handler's module or its check_options hangs); its thread "
            "is left running",
        )
        self._next_reload()

    def _conclude_unvalidated(self, job: Validation, problem: str) -> None:
        event = job.request
        if event.dry_run:
            self._answer(event, ReloadOutcome(False, self.generation, [], [problem]))
            return
        outcome = self._reject(event.source, [problem])
        self._end_reloading()
        self._answer(event, outcome)

    def _validated(self, job: Validation) -> None:
        """A validation finished: apply (or compare, for a dry run) on the main thread."""
        if job is not self._validation:
            return  # given up at its deadline or at a stop; the answer went out then
        self._validation = None
        event = job.request
        try:
            outcome = self._conclude(job)
        except Exception as exc:  # a bug: report it to the waiting caller, keep serving
            self.log.exception("server.error", where="reload")
            if event.reply is not None:
                event.reply.set_exception(exc)
        else:
            self._answer(event, outcome)
        self._next_reload()

    def _conclude(self, job: Validation) -> ReloadOutcome:
        event = job.request
        if event.dry_run:
            if job.error is not None:
                raise job.error
            if job.config is None:
                return ReloadOutcome(False, self.generation, [], job.problems)
            changes = [c.as_dict() for c in diff(self.config, job.config)]
            return ReloadOutcome(False, self.generation, changes, [])
        try:
            if job.error is not None:
                raise job.error
            if job.config is None or job.handler_cls is None:
                return self._reject(event.source, job.problems)
            return self._apply_reload(
                event.source, job.config, job.handler_cls, job.serving_loop_answers
            )
        finally:
            self._end_reloading()

    @staticmethod
    def _answer(event: ReloadEvent, outcome: ReloadOutcome) -> None:
        if event.reply is not None and not event.reply.done():
            event.reply.set_result(outcome)

    def _abandon_reloads(self) -> None:
        """At a stop: whoever waits for a reload or dry run hears that none will happen."""
        job, self._validation = self._validation, None
        pending = ([job.request] if job is not None else []) + list(self._reloads)
        self._reloads.clear()
        for event in pending:
            self._refuse_stopping(event)

    def _housekeeping(self, now: float) -> None:
        self.registry.flush_refusals(self.log, now)
        self.hub.sweep()  # idle_timeout, max_connection_duration
        status = self._status_line()
        if status != self._last_status:
            self.notifier.status(status)
            self._last_status = status

    def _reap(self) -> None:
        if not self.registry.children:
            return
        for pid in list(self.registry.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                finish_child(self.registry, pid, status)

    def _status_line(self) -> str:
        listen = ", ".join(lst.label for lst in self.acceptor.listeners.values())
        active = self.registry.count()
        verb = {State.PAUSED: "paused", State.DRAINING: "draining"}.get(self.state, "serving")
        return f"{verb} {active} connection{'s' if active != 1 else ''} on {listen}"

    # ------------------------------------------------------------------ reload
    def _begin_reloading(self) -> None:
        self.state = State.RELOADING
        self.notifier.reloading()

    def _end_reloading(self) -> None:
        if self.state == State.RELOADING:
            # Paused or not as the daemon is now: a pause or resume may have come in
            # while the new config was being validated.
            self.state = State.PAUSED if self.paused else State.RUNNING
            self.notifier.ready(self._status_line())

    def _reject(self, source: str, errors: list[str]) -> ReloadOutcome:
        self.reloads["rejected"] += 1
        self.last_reload = ReloadRecord(time.time(), "rejected", self.generation, errors=errors)
        self.log.error("reload.rejected", source=source, errors=errors, generation=self.generation)
        return ReloadOutcome(applied=False, generation=self.generation, changes=[], errors=errors)

    def _apply_reload(
        self,
        source: str,
        new: Config,
        handler_cls: type[socketserver.BaseRequestHandler],
        serving_loop_answers: bool = True,
    ) -> ReloadOutcome:
        """All or nothing: prepare everything that can fail, then commit what cannot.

        First, the serving loop must have answered (asked by the validation thread): a
        loop stuck in user code would take the new listener table whenever it comes
        back, long after this reload was answered. Then prepared in order, each undone
        if a later one fails (or raises, a bug included): the new log output opened (not
        yet written to), added addresses bound, then the control socket reconfigured,
        last because it keeps its old settings when it fails. From there on nothing can
        fail or block: the serving loop gets its new table without being waited for.
        """
        if not serving_loop_answers:
            return self._reject(
                source,
                [
                    "the serving loop is not answering (stuck in a handler's call or on "
                    f"a lock for over {SERVING_LOOP_ANSWER:g} s); reload refused"
                ],
            )
        old = self.config
        changes = diff(old, new)
        changed = {c.key for c in changes}
        current = self.acceptor.listeners
        added: dict[Address, socket.socket] = {}
        prepared: PreparedLogging | None = None
        committed = False
        try:
            # 1. The log output: a directory or a path without permission fails here.
            try:
                prepared = self.logs.prepare(new.logging)
            except OSError as exc:
                problem = f"cannot open {new.logging.output}: {exc.strerror or exc}"
                return self._reject(source, [f"logging.output: {problem}"])
            # 2. Bind added addresses: a failure rejects the whole reload.
            try:
                for address in new.server.listen:
                    if address not in current:
                        added[address] = bind_socket(
                            address, new.server.request_queue_size, new.server.reuse_port
                        )
            except OSError as exc:
                return self._reject(source, [f"server.listen: {exc.strerror}"])
            # 3. The control channel last: on failure it keeps its old settings.
            if self.control is not None and any(k.startswith("control.") for k in changed):
                try:
                    self.control.apply(new.control)
                except ControlError as exc:
                    return self._reject(source, [str(exc)])
            committed = True
        finally:
            if not committed:
                for sock in added.values():
                    sock.close()
                if prepared is not None:
                    self.logs.discard(prepared)
        # 4. Nothing can fail or block from here on (replace() only posts the new table).
        self.logs.commit(prepared)
        self.hub.apply(new.server, handler_cls)
        mode_changed = new.server.mode != old.server.mode
        listeners: dict[Address, Listener] = {}
        retired: list[Listener] = []
        for address in new.server.listen:
            if address in added:
                listeners[address] = self._make_listener(address, added[address])
            elif mode_changed:
                kept = current[address]
                listeners[address] = self._make_listener(address, kept.socket)
                listeners[address].inherited = kept.inherited
            else:
                listeners[address] = current[address]
                if "server.request_queue_size" in changed:
                    with contextlib.suppress(OSError):
                        current[address].socket.listen(new.server.request_queue_size)
            listeners[address].RequestHandlerClass = self.hub.handler_cls
        for address, listener in current.items():
            if address not in listeners:
                retired.append(listener)
        self.acceptor.replace(listeners)
        for listener in retired:
            self.notifier.remove_fds(fdstore_name(listener.address))
        # In-flight connections of a removed address keep running and drain on their own;
        # those already in its queue are served too, or (at a limit) closed with a FIN.
        if retired:
            queued = self._take_backlog(retired, stored=False)
            self._serve_backlog(queued)
            for _, request, _ in queued:
                close_gently(request)
                self.registry.refused("max_connections")
        self._store_fds(listeners[a] for a in added)
        self.config = new
        self.generation += 1
        change_dicts = [c.as_dict() for c in changes]
        self.reloads["applied"] += 1
        self.last_reload = ReloadRecord(time.time(), "applied", self.generation, change_dicts)
        self.log.info(
            "reload.applied",
            source=source,
            generation=self.generation,
            changes=sorted(changed),
        )
        for address in added:
            self.log.info("server.listening", address=listeners[address].label, inherited=False)
        return ReloadOutcome(
            applied=True, generation=self.generation, changes=change_dicts, errors=[]
        )

    def _reopen(self, source: str) -> None:
        try:
            self.logs.reopen()
        except OSError as exc:
            self.log.error("server.error", where="reopen-logs", error=str(exc))
            return
        self.log.info("log.reopened", source=source, output=self.logs.sink.target)

    # ------------------------------------------------------------------ stop
    def _drain(self) -> None:
        stop = self._stop or StopEvent("exit")
        timeout = stop.timeout if stop.timeout is not None else self.hub.settings.shutdown_timeout
        began = time.monotonic()
        deadline = began + timeout
        self.state = State.DRAINING
        self.notifier.stopping()
        self._extend_systemd_timeout(deadline)
        self._abandon_reloads()
        if not self.acceptor.shutdown(ACCEPTOR_STOP_WAIT):
            self.log.error("server.error", where="drain", error="the serving loop did not stop")
        backlog = self._take_backlog(
            list(self.acceptor.listeners.values()), stored=self.notifier.enabled
        )
        taken = len(backlog)
        # Counted before handlers learn of the drain: one that ends at once on
        # self.draining still counts as finished, not as never having been open.
        at_start = self.registry.count()
        self.registry.unanswered = 0
        # The flag is set before the backlog is handed to handlers, on purpose. The rule
        # (SockdHandler's docstring) is that at a drain whatever a client already sent
        # is answered and a connection ends only at a boundary with nothing pending; a
        # handler that follows it answers a queued request whether it starts before or
        # after the flag. Setting it first means such a handler, having answered, closes
        # at once instead of waiting for a next request that holds the stop to its
        # deadline. The other order would not make naive handlers safe anyway: handler
        # threads (and children) start asynchronously and can see the flag before their
        # first read whichever order this is.
        self.hub.draining.set()
        self.registry.flush_refusals(self.log, time.monotonic(), every=0)
        self.log.info(
            "server.stopping",
            source=stop.source,
            active=at_start,
            backlog=taken,
            timeout_s=timeout,
        )
        self._signal_children(signal.SIGTERM)
        served = 0
        while not self._cut_short:
            served += self._serve_backlog(backlog)
            if not self.registry.count() and not backlog:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            self._wait(min(deadline, now + HOUSEKEEPING_INTERVAL, self._next_timer()) - now)
            self._reap()
            self._handle_events()
            self._feed_watchdog(time.monotonic())
            self._extend_systemd_timeout(deadline)
        for request in backlog:
            close_gently(request[1])  # never served: EOF for its client, not a reset
        cut = self._cut_remaining()
        self.registry.flush_refusals(self.log, time.monotonic(), every=0)
        unanswered = self.registry.unanswered or 0
        self.log.info(
            "server.stopped",
            finished=max(0, at_start + served - cut - unanswered),
            unanswered=unanswered,
            cut=cut,
            backlog=taken,
            backlog_closed=taken - served,
            duration_ms=round((time.monotonic() - began) * 1000, 3),
        )
        self._close_everything(deadline + EXIT_MARGIN - 0.1 - time.monotonic())
        self.state = State.STOPPED

    def _take_backlog(
        self, listeners: list[Listener], stored: bool
    ) -> collections.deque[tuple[Listener, Any, Any]]:
        """Close listening sockets without resetting what the kernel already accepted.

        A connection whose handshake completed waits in the listening socket's queue
        and its client may already have sent a request; closing the socket would reset
        it. So new connection attempts are shut out first (``stop_handshakes``), the
        queue is emptied (served by the drain as room allows, or closed with a FIN at
        its deadline), and only then are the sockets closed: a client that connects
        from then on is refused (ECONNREFUSED), never reset after its connect succeeded.

        Left open to a race: a handshake whose last ACK is more than ``BACKLOG_SETTLE``
        late. A socket that outlives us (inherited from systemd, or kept in its fd store
        when sockd runs under systemd) is not filtered: what queues on it after our last
        accept waits for the next instance (a restart refuses nothing), and a client
        must not wait out a SYN retransmission for it. ``stored``: the sockets may be in
        systemd's fd store.
        """
        filtered = [
            lst
            for lst in listeners
            if not (stored or lst.inherited) and stop_handshakes(lst.socket)
        ]
        backlog: collections.deque[tuple[Listener, Any, Any]] = collections.deque()
        for listener in listeners:
            self._accept_queued(listener, backlog)
        if filtered:
            with selectors.DefaultSelector() as sel:
                for listener in filtered:
                    sel.register(listener.socket, selectors.EVENT_READ, listener)
                for key, _ in sel.select(BACKLOG_SETTLE):
                    self._accept_queued(key.data, backlog)
        for listener in listeners:
            left = accept_queue_length(listener.socket)
            if left and listener in filtered:
                self.log.error(
                    "server.error",
                    where="listen_queue",
                    error=f"{left} connection(s) in the backlog of {listener.label} could "
                    "not be accepted (out of descriptors?) and are reset",
                )
            listener.socket.close()  # new connections are refused from here on
        return backlog

    def _accept_queued(
        self, listener: Listener, backlog: collections.deque[tuple[Listener, Any, Any]]
    ) -> None:
        while True:
            try:
                request, client_address = listener.get_request()
            except OSError:  # EAGAIN: the queue is empty; EMFILE: counted at the close
                return
            backlog.append((listener, request, client_address))

    def _serve_backlog(self, backlog: collections.deque[tuple[Listener, Any, Any]]) -> int:
        """Hand connections taken from the backlog to their handlers as the limits allow."""
        served = 0
        settings = self.hub.settings
        while backlog and not self.hub.at_capacity():
            if settings.max_connections and self.registry.count() >= settings.max_connections:
                break  # on_limit = "refuse" too: these were accepted already, they wait
            listener, request, client_address = backlog.popleft()
            try:
                if not listener.verify_request(request, client_address):
                    close_gently(request)  # refused by an access rule or per-peer limit
                    continue
                conn: Connection = request.sockd_conn
                listener.process_request(request, client_address)
                if conn.claimed or self.registry.get(conn.id) is not None:
                    served += 1
            except Exception:
                self.log.exception("server.error", where="process_request")
                conn = request.sockd_conn
                if conn is not None:
                    self.registry.remove(conn, None)
                close_gently(request)
        return served

    def _extend_systemd_timeout(self, deadline: float) -> None:
        # The stop deadline, the exit margin, and a little for the interpreter to exit.
        remaining = deadline - time.monotonic() + EXIT_MARGIN + 1.0
        if remaining > 0:
            self.notifier.extend_timeout(remaining)

    def _signal_children(self, sig: signal.Signals) -> None:
        for pid in list(self.registry.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _cut_remaining(self) -> int:
        """Close what is left at the deadline; every connection still gets its conn.close.

        Handlers get ``CUT_GRACE`` to notice; then forked children are killed and the
        rest is logged here. Handler threads are daemon threads: one that ignores the
        cut does not keep the process alive.
        """
        leftover = self.registry.snapshot()
        if not leftover:
            return 0
        for conn in leftover:
            conn.cut("drain_deadline")
        grace_end = time.monotonic() + CUT_GRACE
        while self.registry.count() and time.monotonic() < grace_end:
            self._wait(min(0.05, max(0.0, grace_end - time.monotonic())))
            self._reap()
        if self.registry.children:
            self._signal_children(signal.SIGKILL)
            for pid in list(self.registry.children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                finish_child(self.registry, pid, signal.SIGKILL)
        for conn in self.registry.snapshot():
            if self.registry.claim(conn):
                log_close(conn, None, "drain_deadline")
                self.registry.remove(conn, None)
        return len(leftover)

    def _close_everything(self, budget: float = 2.0) -> None:
        """Close the control channel (within ``budget`` s: its requests may be stuck) and
        the listening sockets. Once: the drain does it within its deadline, ``run``'s
        ``finally`` after a failure."""
        if self._closed:
            return
        self._closed = True
        if self.control is not None:
            closer = threading.Thread(target=self.control.close, name="control-close", daemon=True)
            try:
                closer.start()
            except RuntimeError:  # at the thread limit: close it here, unbounded
                self.control.close()
            else:
                closer.join(max(0.1, budget))
        for listener in self.acceptor.listeners.values():
            with contextlib.suppress(OSError):
                listener.socket.close()

    # ------------------------------------------------------------------ ControlBackend
    # The read views are ``self.views`` (sockd.views); the state changes are below.
    def status(self) -> Status:
        return self.views.status()

    def connections(self) -> list[ConnectionInfo]:
        return self.views.connections()

    def close_connection(self, conn_id: int) -> bool:
        reply: Future[bool] = Future()
        return self._ask(KickEvent(conn_id, reply), reply, COMMAND_WAIT, "kick")

    def effective_config(self) -> ConfigDump:
        return self.views.effective_config()

    def reload_check(self) -> ReloadOutcome:
        """A dry run: the config file validated (off the main thread, like a reload's: it
        imports the handler's module, user code) and compared with the running config,
        nothing applied. What only applying can prove (opening the log output, binding
        added addresses, the control socket's new owner) is not tried."""
        if self._stop is not None:
            raise BackendUnavailable("the daemon is stopping; reload refused")
        reply: Future[ReloadOutcome] = Future()
        return self._ask(ReloadEvent("control", reply, dry_run=True), reply, RELOAD_WAIT, "dry run")

    def reload(self) -> ReloadOutcome:
        if self._stop is not None:
            raise BackendUnavailable("the daemon is stopping; reload refused")
        if not self._reload_lock.acquire(blocking=False):
            raise BackendConflict("a reload is already in progress")
        try:
            reply: Future[ReloadOutcome] = Future()
            return self._ask(ReloadEvent("control", reply), reply, RELOAD_WAIT, "reload")
        finally:
            self._reload_lock.release()

    def stop(self, timeout: float | None) -> dict[str, Any]:
        """Decided on the main thread, so of two stops racing each other both callers
        hear the one in force: the first (a later one changes nothing)."""
        reply: Future[StopEvent] = Future()
        in_force = self._ask(StopEvent("control", timeout, reply), reply, RELOAD_WAIT, "stop")
        effective = in_force.timeout
        if effective is None:
            effective = self.hub.settings.shutdown_timeout
        return {
            "state": "draining",
            "timeout": effective,
            "active": self.registry.count(),
            "supervisor": self.supervisor,
        }

    def pause(self) -> dict[str, Any]:
        reply: Future[dict[str, Any]] = Future()
        return self._ask(PauseEvent(True, reply), reply, COMMAND_WAIT, "pause")

    def resume(self) -> dict[str, Any]:
        reply: Future[dict[str, Any]] = Future()
        return self._ask(PauseEvent(False, reply), reply, COMMAND_WAIT, "resume")

    def set_log_level(self, level: str) -> dict[str, Any]:
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown level {level!r}")
        reply: Future[dict[str, Any]] = Future()
        return self._ask(LogLevelEvent(level, reply), reply, COMMAND_WAIT, "log-level change")

    def reopen_logs(self) -> dict[str, Any]:
        reply: Future[dict[str, Any]] = Future()
        return self._ask(ReopenEvent("control", reply), reply, COMMAND_WAIT, "reopen-logs")

    def metrics_text(self) -> str:
        return self.views.metrics_text()

    def stats(self) -> Stats:
        return self.views.stats()

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]:
        return self.views.log_history(n, min_level)

    def log_subscribe(self, min_level: str) -> Subscription:
        return self.views.log_subscribe(min_level)
