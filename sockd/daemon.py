"""Lifecycle: start, the main loop, reload, graceful stop. The only module that composes the rest.

Everything that changes the lifecycle (signals, control requests) becomes an event on
one queue consumed by the main thread. Signal handlers only enqueue: logging from a
handler can deadlock on a lock the interrupted code holds. ``signal.set_wakeup_fd``
makes the main thread's ``select`` return whichever thread the kernel delivered the
signal to, so a stop is handled in microseconds, not at the next poll.

The serving loop runs in its own thread (``server.Acceptor``); ``shutdown()`` is called
from the main thread, never from the serving thread (that would deadlock), and the
drain that follows has a deadline (the standard library's join on close has none).
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import resource
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from sockd import __version__, metrics, systemd
from sockd.config import Address, Config, diff, load, to_dict
from sockd.control import BackendConflict, BackendUnavailable, ControlServer, ReloadOutcome
from sockd.errors import ConfigError, ControlError, StartupError
from sockd.logs import LogSystem, Subscription
from sockd.protocol import API_VERSION, LOG_LEVELS, State
from sockd.server import (
    LISTENER_CLASSES,
    REFUSAL_REASONS,
    THROTTLE_REASONS,
    Acceptor,
    Connection,
    Hub,
    Listener,
    Registry,
    bind_socket,
    finish_child,
    log_close,
    tcp_stats,
)

#: Seconds the drain waits, after cutting connections at the deadline, for handler
#: threads and children to notice before children are killed and the process exits.
CUT_GRACE: Final = 2.0
HOUSEKEEPING_INTERVAL: Final = 1.0
#: Tiny timeouts are checked this often at most (not a busy loop).
MIN_HOUSEKEEPING_INTERVAL: Final = 0.05
RELOAD_WAIT: Final = 120.0


@dataclass(slots=True)
class StopEvent:
    source: str
    timeout: float | None = None
    #: For a control-channel stop: answered with the stop actually in force.
    reply: Future[StopEvent] | None = None


@dataclass(slots=True)
class ReloadEvent:
    source: str
    reply: Future[ReloadOutcome] | None = None
    dry_run: bool = False


@dataclass(slots=True)
class ReopenEvent:
    source: str


@dataclass(slots=True)
class ReloadRecord:
    at: float
    result: str
    generation: int
    changes: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "result": self.result,
            "generation": self.generation,
            "changes": self.changes,
            "errors": self.errors,
        }


Event = StopEvent | ReloadEvent | ReopenEvent

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


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


class Daemon:
    """One running sockd; also the control channel's backend."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.config_path = config.path
        self.generation = 1
        self.state = State.STARTING
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.last_reload: ReloadRecord | None = None
        self.reloads: dict[str, int] = {"applied": 0, "rejected": 0}
        self.logs = LogSystem(config.logging)
        self.log: Any = structlog.get_logger()
        self.registry = Registry()
        self.hub = Hub(config.server, config.handler_class(), self.registry)
        self.hub.log = self.log
        self.acceptor = Acceptor(self.hub)
        self.control: ControlServer | None = None
        self.notifier = systemd.Notifier()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.registry.on_close = self._on_connection_closed
        self._reload_lock = threading.Lock()
        self._stop: StopEvent | None = None
        self._cut_short = False
        self._old_handlers: dict[signal.Signals, Any] = {}
        self._last_status = ""

    # ------------------------------------------------------------------ plumbing
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _post(self, event: Event) -> None:
        self._events.put(event)
        self._wake()

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
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)

    # ------------------------------------------------------------------ start
    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Start, serve until told to stop, drain; returns the process exit status."""
        with self._signals():
            try:
                self._start()
            except (StartupError, ConfigError) as exc:
                self.log.error("server.error", error=str(exc))
                self._close_everything()
                raise
            if on_ready is not None:
                on_ready()
            self._main_loop()
            self._drain()
        return 0

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
        interval = systemd.watchdog_interval()
        if interval:
            self.hub.watchdog = self.notifier.watchdog
            self.hub.watchdog_interval = interval
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
        try:
            found = systemd.listen_fds()
        except systemd.SystemdError as exc:
            raise StartupError(str(exc)) from None
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
            sel.register(self._wake_r, selectors.EVENT_READ)
            if self._events.empty():
                sel.select(timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _main_loop(self) -> None:
        next_housekeeping = time.monotonic()
        while self._stop is None:
            self._wait(max(0.0, next_housekeeping - time.monotonic()))
            self._reap()
            self._handle_events()
            now = time.monotonic()
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + self._housekeeping_interval()

    def _housekeeping_interval(self) -> float:
        settings = self.hub.settings
        limits = [
            max(MIN_HOUSEKEEPING_INTERVAL, t / 4)
            for t in (settings.idle_timeout, settings.max_connection_duration)
            if t
        ]
        return min([HOUSEKEEPING_INTERVAL, *limits])

    def _handle_events(self) -> None:
        pending_signal_reload = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, StopEvent):
                self._on_stop(event)
            elif isinstance(event, ReloadEvent):
                if event.reply is None:
                    pending_signal_reload = True  # a burst of SIGHUPs is one reload
                else:
                    self._reload_for(event)
            else:
                self._reopen(event.source)
        if pending_signal_reload:
            self._reload_for(ReloadEvent("SIGHUP"))

    def _on_stop(self, event: StopEvent) -> None:
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

    def _reload_for(self, event: ReloadEvent) -> None:
        if event.dry_run and event.reply is not None:
            try:
                event.reply.set_result(self._dry_run())
            except Exception as exc:  # a bug: report it to the waiting caller
                event.reply.set_exception(exc)
            return
        if self._stop is not None:
            outcome_error = BackendUnavailable("the daemon is stopping; reload refused")
            if event.reply is not None:
                event.reply.set_exception(outcome_error)
            return
        try:
            outcome = self._reload(event.source)
        except Exception as exc:  # a bug: report it to the waiting caller, keep serving
            self.log.exception("server.error", where="reload")
            if event.reply is not None:
                event.reply.set_exception(exc)
            return
        if event.reply is not None:
            event.reply.set_result(outcome)

    def _housekeeping(self, now: float) -> None:
        self.registry.flush_refusals(self.log, now)
        idle = self.hub.settings.idle_timeout
        if idle:
            self._close_idle(idle * 1000)
        longest = self.hub.settings.max_connection_duration
        if longest:
            self._close_expired(longest)
        status = self._status_line()
        if status != self._last_status:
            self.notifier.status(status)
            self._last_status = status

    def _close_idle(self, limit_ms: float) -> None:
        """Close connections that sent nothing for ``idle_timeout`` (kernel-measured)."""
        now = time.monotonic()
        for conn in self.registry.snapshot():
            if conn.close_reason is not None or (now - conn.started) * 1000 < limit_ms:
                continue
            stats = tcp_stats(conn.sock)
            if stats is not None and stats.idle_ms >= limit_ms:
                self._cut(conn, "idle_timeout")

    def _close_expired(self, limit_s: float) -> None:
        """Close connections older than ``max_connection_duration``, busy or not."""
        now = time.monotonic()
        for conn in self.registry.snapshot():
            if conn.close_reason is None and now - conn.started >= limit_s:
                self._cut(conn, "max_duration")

    @staticmethod
    def _cut(conn: Connection, reason: str) -> None:
        conn.close_reason = reason
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)

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
    def _reload(self, source: str) -> ReloadOutcome:
        """Build the new before retiring the old; on any failure keep the old as it was."""
        previous_state = self.state
        self.state = State.RELOADING
        self.notifier.reloading()
        try:
            return self._reload_inner(source)
        finally:
            if self.state == State.RELOADING:
                self.state = previous_state
            self.notifier.ready(self._status_line())

    def _reject(self, source: str, errors: list[str]) -> ReloadOutcome:
        self.reloads["rejected"] += 1
        self.last_reload = ReloadRecord(time.time(), "rejected", self.generation, errors=errors)
        self.log.error("reload.rejected", source=source, errors=errors, generation=self.generation)
        return ReloadOutcome(applied=False, generation=self.generation, changes=[], errors=errors)

    def _reload_inner(self, source: str) -> ReloadOutcome:
        path = self.config_path
        if path is None:
            return self._reject(source, ["sockd was started without a config file to re-read"])
        try:
            new = load(path)
        except ConfigError as exc:
            return self._reject(source, exc.problems)
        old = self.config
        changes = diff(old, new)
        changed = {c.key for c in changes}
        # 1. Bind added addresses first: a failure rejects the whole reload.
        current = self.acceptor.listeners
        added: dict[Address, socket.socket] = {}
        try:
            for address in new.server.listen:
                if address not in current:
                    added[address] = bind_socket(
                        address, new.server.request_queue_size, new.server.reuse_port
                    )
        except OSError as exc:
            for sock in added.values():
                sock.close()
            return self._reject(source, [f"server.listen: {exc.strerror}"])
        # 2. The control channel next: it can fail too (unknown group, path taken).
        if self.control is not None and any(k.startswith("control.") for k in changed):
            try:
                self.control.apply(new.control)
            except ControlError as exc:
                for sock in added.values():
                    sock.close()
                return self._reject(source, [str(exc)])
        # 3. Nothing can fail from here on.
        self.logs.apply(new.logging)
        self.hub.apply(new.server, new.handler_class())
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
            # In-flight connections of a removed address keep running and drain on their own.
            self.notifier.remove_fds(fdstore_name(listener.address))
            listener.socket.close()
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
        self.state = State.DRAINING
        self.notifier.stopping()
        self.acceptor.shutdown()
        for listener in self.acceptor.listeners.values():
            listener.socket.close()  # new connections are refused from here on
        # Counted before handlers learn of the drain: one that ends at once on
        # self.draining still counts as finished, not as never having been open.
        at_start = self.registry.count()
        self.hub.draining.set()
        self.log.info("server.stopping", source=stop.source, active=at_start, timeout_s=timeout)
        self._signal_children(signal.SIGTERM)
        deadline = began + timeout
        self._extend_systemd_timeout(deadline)
        while self.registry.count() and not self._cut_short:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wait(min(remaining, HOUSEKEEPING_INTERVAL))
            self._reap()
            self._handle_events()
            self._extend_systemd_timeout(deadline)
        cut = self._cut_remaining()
        self.log.info(
            "server.stopped",
            finished=max(0, at_start - cut),
            cut=cut,
            duration_ms=round((time.monotonic() - began) * 1000, 3),
        )
        self._close_everything()
        self.state = State.STOPPED

    def _extend_systemd_timeout(self, deadline: float) -> None:
        remaining = deadline - time.monotonic() + CUT_GRACE + 5
        if remaining > 0:
            self.notifier.extend_timeout(remaining)

    def _signal_children(self, sig: signal.Signals) -> None:
        for pid in list(self.registry.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _cut_remaining(self) -> int:
        """Close what is left at the deadline; every connection still gets its conn.close."""
        leftover = self.registry.snapshot()
        if not leftover:
            return 0
        for conn in leftover:
            self._cut(conn, "drain_deadline")
        grace_end = time.monotonic() + CUT_GRACE
        while self.registry.count() and time.monotonic() < grace_end:
            self._wait(0.05)
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

    def _close_everything(self) -> None:
        if self.control is not None:
            self.control.close()
        for listener in self.acceptor.listeners.values():
            with contextlib.suppress(OSError):
                listener.socket.close()

    # ------------------------------------------------------------------ ControlBackend
    def status(self) -> dict[str, Any]:
        counters = self.registry.counters
        return {
            "api_version": API_VERSION,
            "pid": os.getpid(),
            "version": __version__,
            "state": str(self.state),
            "started_at": _iso(self.started_wall),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "mode": self.hub.settings.mode,
            "handler": self.config.server.handler,
            "listen": [lst.label for lst in self.acceptor.listeners.values()],
            "config_path": self.config_path,
            "generation": self.generation,
            "log_level": self.logs.level_name,
            "connections": {
                "active": self.registry.count(),
                "total": counters.total,
                "refused": sum(counters.refused.values()),
            },
            "last_reload": self.last_reload.as_dict() if self.last_reload else None,
        }

    def connections(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [c.describe(now) for c in sorted(self.registry.snapshot(), key=lambda c: c.id)]

    def close_connection(self, conn_id: int) -> bool:
        conn = self.registry.get(conn_id)
        if conn is None:
            return False
        self._cut(conn, "kicked")
        return True

    def effective_config(self) -> dict[str, Any]:
        return {
            "path": self.config_path,
            "generation": self.generation,
            "config": to_dict(self.config),
        }

    def reload_check(self) -> ReloadOutcome:
        """A dry run, on the main thread like a reload (it may import the handler's
        module, user code), so it sees one consistent config and generation."""
        if self._stop is not None:
            raise BackendUnavailable("the daemon is stopping; reload refused")
        reply: Future[ReloadOutcome] = Future()
        self._post(ReloadEvent("control", reply, dry_run=True))
        return reply.result(timeout=RELOAD_WAIT)

    def _dry_run(self) -> ReloadOutcome:
        """The config file validated and compared with the running config; nothing
        applied. What only applying can prove (binding added addresses, the control
        socket's new owner) is not tried."""
        path = self.config_path
        if path is None:
            problems = ["sockd was started without a config file to re-read"]
            return ReloadOutcome(False, self.generation, [], problems)
        try:
            new = load(path)
        except ConfigError as exc:
            return ReloadOutcome(False, self.generation, [], exc.problems)
        changes = [c.as_dict() for c in diff(self.config, new)]
        return ReloadOutcome(False, self.generation, changes, [])

    def reload(self) -> ReloadOutcome:
        if self._stop is not None:
            raise BackendUnavailable("the daemon is stopping; reload refused")
        if not self._reload_lock.acquire(blocking=False):
            raise BackendConflict("a reload is already in progress")
        try:
            reply: Future[ReloadOutcome] = Future()
            self._post(ReloadEvent("control", reply))
            return reply.result(timeout=RELOAD_WAIT)
        finally:
            self._reload_lock.release()

    def stop(self, timeout: float | None) -> dict[str, Any]:
        """Decided on the main thread, so of two stops racing each other both callers
        hear the one in force: the first (a later one changes nothing)."""
        reply: Future[StopEvent] = Future()
        self._post(StopEvent("control", timeout, reply))
        in_force = reply.result(timeout=RELOAD_WAIT)
        effective = in_force.timeout
        if effective is None:
            effective = self.hub.settings.shutdown_timeout
        return {"state": "draining", "timeout": effective, "active": self.registry.count()}

    def pause(self) -> dict[str, Any]:
        if self._stop is not None or self.state == State.DRAINING:
            raise BackendConflict("the daemon is draining; it cannot be paused")
        self.acceptor.set_paused(True)
        if self.state != State.PAUSED:
            self.state = State.PAUSED
            self.log.info("server.paused")
        return {"state": "paused"}

    def resume(self) -> dict[str, Any]:
        if self._stop is not None or self.state == State.DRAINING:
            raise BackendConflict("the daemon is draining; it cannot be resumed")
        self.acceptor.set_paused(False)
        if self.state == State.PAUSED:
            self.state = State.RUNNING
            self.log.info("server.resumed")
        return {"state": "running"}

    def set_log_level(self, level: str) -> dict[str, Any]:
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown level {level!r}")
        previous = self.logs.set_level(level)
        self.log.warning("log.level_changed", new_level=level, previous_level=previous)
        return {"level": level, "previous": previous}

    def reopen_logs(self) -> dict[str, Any]:
        self._reopen("control")
        return {"reopened": True, "output": self.logs.sink.target}

    def metrics_text(self) -> str:
        counters = self.registry.counters
        return metrics.render(
            [
                metrics.gauge(
                    "sockd_connections_open", "Connections open now.", self.registry.count()
                ),
                metrics.counter("sockd_connections_total", "Connections accepted.", counters.total),
                metrics.labelled_counter(
                    "sockd_connections_refused_total",
                    "Connections refused by a limit or access rule.",
                    "reason",
                    # Every reason from the start, at 0: rate() alerts work before the
                    # first refusal, and a typo in one shows as a missing series.
                    {**dict.fromkeys(REFUSAL_REASONS, 0), **counters.refused},
                ),
                metrics.counter(
                    "sockd_bytes_received_total",
                    "Bytes received on closed connections.",
                    counters.bytes_in,
                ),
                metrics.counter(
                    "sockd_bytes_sent_total",
                    "Bytes sent on closed connections.",
                    counters.bytes_out,
                ),
                metrics.counter(
                    "sockd_handler_errors_total",
                    "Connections whose handler raised.",
                    counters.handler_errors,
                ),
                metrics.counter(
                    "sockd_accept_errors_total", "accept() failures.", counters.accept_errors
                ),
                metrics.labelled_counter(
                    "sockd_throttled_total",
                    "Times accepting paused at a limit (new connections wait in the backlog).",
                    "reason",
                    {**dict.fromkeys(THROTTLE_REASONS, 0), **counters.throttled},
                ),
                metrics.counter(
                    "sockd_threads_started_total",
                    "Threading mode: connection threads started (other connections reused one).",
                    self.hub.workers.started,
                ),
                metrics.gauge(
                    "sockd_threads_spare",
                    "Threading mode: finished threads waiting to serve the next connection.",
                    self.hub.workers.spare,
                ),
                metrics.counter(
                    "sockd_children_killed_total",
                    "Forked children that ended by a signal.",
                    counters.children_killed,
                ),
                metrics.labelled_counter(
                    "sockd_reloads_total", "Reloads by result.", "result", self.reloads
                ),
                metrics.gauge(
                    "sockd_uptime_seconds",
                    "Seconds since start.",
                    round(time.monotonic() - self.started, 3),
                ),
                metrics.gauge(
                    "sockd_info",
                    "Version and mode.",
                    1,
                    version=__version__,
                    mode=self.hub.settings.mode,
                ),
            ]
        )

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]:
        return self.logs.ring.history(n, min_level)

    def log_subscribe(self, min_level: str) -> Subscription:
        return self.logs.ring.subscribe(min_level)
