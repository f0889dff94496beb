"""The control channel's server: the socket, the accept loop, the connection table.

Owns ``ControlServer`` (start, live reconfiguration, close with a deadline), its
socketserver (``_ControlHTTPServer``: binds in a private directory and renames into
place, checks credentials and budgets in the accept loop before a thread is spent),
the fork hook (a forked child closes the control socket), the descriptor reserve (one
fd held back so the channel still accepts when handlers exhausted the limit) and the
rate-limited ``control.denied`` / ``control.busy`` lines. Composes the package:
imports ``access``, ``api``, ``http``, ``handler`` and ``socketfile``; nothing imports it
but ``sockd.control`` itself.

Access (``SO_PEERCRED``, checked in the accept loop): a peer with no role gets an
immediate ``403 forbidden`` and the connection is closed, counted in a rate-limited
``control.denied`` line. Each role has its own budget of concurrent connections
(``CONNECTION_BUDGET``) and of log followers (``FOLLOWER_BUDGET``): readers cannot take
the slots an admin needs, and the excess get an immediate ``503``, counted in a
rate-limited ``control.busy`` line. Each request must arrive whole within
``control.request_timeout`` seconds of its accept (one deadline for the head and body,
not per read, so trickling does not extend it).

The socket is bound in a private 0700 directory beside its path, given its mode and
group there through a descriptor that cannot follow a symlink, then renamed into place
(``sockd.control.socketfile``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import socket
import socketserver
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from sockd.config import ControlConfig
from sockd.control.access import (
    CONNECTION_BUDGET,
    FOLLOWER_BUDGET,
    Peer,
    Policy,
    Role,
    file_access,
)
from sockd.control.api import JSON_TYPE, ControlBackend, error_body
from sockd.control.handler import ControlHandler, Owner
from sockd.control.http import answer_at_once, full_response
from sockd.control.socketfile import (
    check_directory,
    ensure_directory,
    refuse_if_taken,
    set_access,
    unlink_if_ours,
)
from sockd.errors import ControlError
from sockd.protocol import ErrorCode

_ACCEPT_BACKOFF: Final = 0.1  # seconds between accept attempts when out of descriptors
#: How long ``close()`` lets in-flight requests finish before cutting their sockets.
CLOSE_GRACE: Final = 2.0
#: Denials and 503s are logged as one line per this many seconds at most.
REFUSAL_LOG_EVERY: Final = 1.0
_LISTEN_BACKLOG = 128


class _ControlHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The socketserver for one socket path; ``ControlServer`` owns one at a time.

    Hooks used: ``server_bind`` (checks the path, binds in a private directory, sets
    mode and group), ``server_activate`` (listens, then renames into place),
    ``process_request`` (concurrency cap and thread tracking), ``handle_error`` (log,
    never stderr) and ``server_close`` (unlinks the socket file only if still ours).
    """

    daemon_threads = True
    # The base class would join every handler thread without a deadline on close;
    # ControlServer.close() joins them itself, with one.
    block_on_close = False
    request_queue_size = _LISTEN_BACKLOG

    def __init__(self, owner: ControlServer, settings: ControlConfig, gid: int | None) -> None:
        self.owner = owner
        self.path = settings.socket
        self.mode = settings.mode
        self.gid = gid
        self.identity: tuple[int, int] | None = None
        self._tmpdir: str | None = None
        self._tmppath: str | None = None
        super().__init__(settings.socket, ControlHandler)

    def server_bind(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        ensure_directory(self.path, parent)
        refuse_if_taken(self.path)
        # A private 0700 directory instead of a temporary umask: umask is per process,
        # and other threads of the daemon may be creating files at the same moment.
        self._tmpdir = tempfile.mkdtemp(prefix=".sd", dir=parent)
        self._tmppath = os.path.join(self._tmpdir, "s")
        if len(os.fsencode(self._tmppath)) > 107:
            raise ControlError(
                f"cannot create control socket {self.path}: its directory name is too long "
                "for a temporary name (AF_UNIX paths are limited to 107 bytes)"
            )
        self.socket.bind(self._tmppath)
        info = set_access(self._tmppath, self.mode, self.gid, None)
        self.identity = (info.st_dev, info.st_ino)
        self.server_address = self.path

    def server_activate(self) -> None:
        # Listen before the rename: a client (or a second sockd probing for a live
        # instance) must never find the final path bound but refusing connections.
        if self._tmppath is None:
            raise ControlError("internal: the control socket was activated before binding")
        self.socket.listen(self.request_queue_size)
        os.rename(self._tmppath, self.path)
        self._tmppath = None
        self._remove_tmpdir()
        _LIVE_SERVERS.add(self)

    def get_request(self) -> tuple[Any, Any]:
        """Out of descriptors (a handler hogging them): use the reserve, or back off.

        socketserver ignores an ``OSError`` from accept and selects again at once; the
        still-pending connection would make that a 100% CPU spin.
        """
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            if self.owner._spend_reserve():
                return super().get_request()
            self.owner.closing.wait(_ACCEPT_BACKOFF)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """Credentials and budget first, in this (the accept) thread: a peer the policy
        refuses, or one over its role's budget, is answered and closed without a thread.

        Resolving a peer's role is free for root and the daemon's uid; for others with
        a group configured it reads ``/proc/<pid>/status`` once (~20 us).
        """
        sock = cast(socket.socket, request)
        owner = self.owner
        accepted = time.monotonic()
        try:
            peer = Peer.of(sock)
        except OSError:  # gone already
            self.shutdown_request(sock)
            return
        role = owner._policy.role(peer)
        if role is None:
            owner.denied.record(peer.uid, uid=peer.uid, pid=peer.pid, method=None, path=None)
            _refuse(
                sock,
                403,
                ErrorCode.FORBIDDEN,
                f"uid {peer.uid} may not use the control channel",
            )
            self.shutdown_request(sock)
            return
        if not owner._admit(sock, peer, role, accepted):
            self._refuse_busy(sock, peer, role, "connections")
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(sock, client_address),
            name="sockd-control-conn",
            daemon=True,
        )
        owner._track(sock, thread)
        try:
            thread.start()
        except RuntimeError:  # cannot start a new thread: answer like the cap does
            owner._release(sock)
            self._refuse_busy(sock, peer, role, "threads")

    def _refuse_busy(self, sock: socket.socket, peer: Peer, role: Role, reason: str) -> None:
        self.owner.busy.record(
            role, reason=reason, role=role, uid=peer.uid, pid=peer.pid, method=None, path=None
        )
        limit = self.owner.budget[role]
        _refuse(
            sock,
            503,
            ErrorCode.UNAVAILABLE,
            f"too many control connections for the {role!r} role (limit {limit}); try again"
            if reason == "connections"
            else "cannot start a thread for this control connection; try again",
        )
        self.shutdown_request(sock)

    def service_actions(self) -> None:
        """Between accepts (at least every poll interval): log pending refusal summaries."""
        self.owner._flush_refusals()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner._release(cast(socket.socket, request))

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.owner.log.exception("control.error", path=self.path)

    def server_close(self) -> None:
        _LIVE_SERVERS.discard(self)
        super().server_close()
        if self._tmppath is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmppath)
        self._remove_tmpdir()
        if self.identity is not None:
            unlink_if_ours(self.path, self.identity)
            self.identity = None

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmpdir)
            self._tmpdir = None

    def _drop_in_child(self) -> None:
        """Close our descriptors in a forked child, touching nothing on disk."""
        self.identity = None
        with contextlib.suppress(OSError):
            self.socket.close()
        # No lock: the child has a single thread, and a lock held at fork time by a
        # thread that does not exist here would never be released.
        for sock in list(self.owner._active):
            with contextlib.suppress(OSError):
                sock.close()


#: Listening servers, for the fork hook below.
_LIVE_SERVERS: weakref.WeakSet[_ControlHTTPServer] = weakref.WeakSet()


def _drop_in_child() -> None:
    """A forked child (``forking`` mode) must not hold the control socket open.

    If it did, connections would queue in a backlog nobody accepts once the daemon
    dies, and the next sockd's liveness probe would take the socket for a live one.
    """
    for server in list(_LIVE_SERVERS):
        server._drop_in_child()


os.register_at_fork(after_in_child=_drop_in_child)


def _refuse(sock: socket.socket, status: int, code: ErrorCode, message: str) -> None:
    """Answer a refused connection from the accept loop, without blocking it."""
    answer_at_once(sock, full_response(status, error_body(code, message), JSON_TYPE))


class _Tally:
    """Refusals of one kind, logged as one line a second at most, never one per peer.

    The first refusal after a quiet second is logged at once with its details; the
    ones that follow within the second are counted (by ``key``: a uid, a role) and
    logged as one summary line when the second is over (``flush``, from the accept
    loop at least every poll interval, and at close).
    """

    def __init__(self, log: Any, event: str, key_name: str) -> None:
        self._log = log
        self.event = event
        self.key_name = key_name
        self.total = 0
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}
        self._last = -math.inf

    def record(self, key: object, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += 1
            quiet = not self._pending and now - self._last >= REFUSAL_LOG_EVERY
            if quiet:
                self._last = now
            else:
                self._pending[str(key)] = self._pending.get(str(key), 0) + 1
        if quiet:
            self._log.warning(self.event, count=1, **fields)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._pending or (not force and now - self._last < REFUSAL_LOG_EVERY):
                return
            pending, self._pending = self._pending, {}
            self._last = now
        self._log.warning(
            self.event, count=sum(pending.values()), **{self.key_name: pending}, summary=True
        )


@dataclass(slots=True)
class _Slot:
    """One admitted control connection: who, in which role, since when, on which thread."""

    peer: Peer
    role: Role
    accepted: float
    thread: threading.Thread | None = None
    following: bool = False


class ControlServer:
    """The control channel: owns the socket file and serves the API in daemon threads.

    ``start()`` and ``apply()`` raise ``ControlError`` with an operator-facing message;
    ``close()`` never raises. All three are meant for the daemon's main thread.
    """

    def __init__(
        self,
        settings: ControlConfig,
        backend: ControlBackend,
        log: Any,
        *,
        budget: Mapping[str, int] = CONNECTION_BUDGET,
        follower_budget: Mapping[str, int] = FOLLOWER_BUDGET,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.log = log
        #: Concurrent connections and log followers per role (``all``, ``read``).
        self.budget = dict(budget)
        self.follower_budget = dict(follower_budget)
        self._policy = Policy(os.geteuid(), None, None)
        self.closing = threading.Event()
        #: One descriptor held back so the control channel can still accept a client
        #: when handlers have used up the process's descriptor limit.
        self._reserve_fd: int | None = None
        self._lock = threading.Lock()  # start/apply/close
        self._conn_lock = threading.Lock()  # the connection table and its counts
        self._active: dict[socket.socket, _Slot] = {}
        self._in_use: dict[str, int] = dict.fromkeys(self.budget, 0)
        self._following: dict[str, int] = dict.fromkeys(self.follower_budget, 0)
        #: Peers refused for their credentials, and 503s; ``.total`` counts them all.
        self.denied = _Tally(log, "control.denied", "uids")
        self.busy = _Tally(log, "control.busy", "roles")
        self._server: _ControlHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        """Where the socket currently is (the configured path once started)."""
        return self.settings.socket

    def start(self) -> None:
        """Resolve groups, create the socket file and start serving."""
        with self._lock:
            if self._server is not None:
                raise ControlError("the control channel is already started")
            if self.closing.is_set():
                raise ControlError("the control channel has been closed")
            policy = Policy.from_settings(self.settings)
            self._server, self._serve_thread = self._open(self.settings, policy)
            self._policy = policy
        self._restore_reserve()

    def apply(self, settings: ControlConfig) -> None:
        """Reconfigure live; on ``ControlError`` the old settings stay in force."""
        with self._lock:
            server = self._server
            if server is None or self.closing.is_set():
                self.settings = settings
                return
            policy = Policy.from_settings(settings)
            if settings.socket != server.path:
                new_server, new_thread = self._open(settings, policy)
                old_thread = self._serve_thread
                self._server, self._serve_thread = new_server, new_thread
                self.settings, self._policy = settings, policy
                # In-flight requests on the old socket finish; its file goes away now.
                _stop_serving(server, old_thread)
                return
            self._restyle(server, settings, policy)
            self.settings, self._policy = settings, policy

    def close(self, timeout: float = CLOSE_GRACE) -> None:
        """Stop accepting, remove our socket file, let in-flight requests finish.

        Requests still running after ``timeout`` seconds have their sockets shut down
        (a log stream notices within ``FOLLOW_POLL``); handler threads are daemonic, so
        one blocked inside the backend cannot keep the process alive.
        """
        with self._lock:
            if self.closing.is_set():
                return
            self.closing.set()
            server, thread = self._server, self._serve_thread
            self._server = self._serve_thread = None
        self._spend_reserve()
        if server is not None:
            _stop_serving(server, thread)
            self.log.info("control.closed", path=server.path)
        self._flush_refusals(force=True)
        deadline = time.monotonic() + timeout
        if not self._join_handlers(deadline):
            with self._conn_lock:
                stuck = list(self._active)
            for sock in stuck:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._join_handlers(time.monotonic() + 1.0)

    @property
    def refusals(self) -> dict[str, int]:
        """Control connections refused since start: ``denied`` (credentials, 403) and
        ``busy`` (a role's connection or follower budget, or the daemon stopping: 503)."""
        return {"denied": self.denied.total, "busy": self.busy.total}

    # -- connection table (called by _ControlHTTPServer and ControlHandler) --------

    def _admit(self, sock: socket.socket, peer: Peer, role: Role, accepted: float) -> bool:
        with self._conn_lock:
            if self._in_use.get(role, 0) >= self.budget.get(role, 0):
                return False
            self._in_use[role] = self._in_use.get(role, 0) + 1
            self._active[sock] = _Slot(peer, role, accepted)
            return True

    def slot(self, sock: socket.socket) -> _Slot:
        with self._conn_lock:
            return self._active[sock]

    def _track(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._conn_lock:
            slot = self._active.get(sock)
            if slot is not None:
                slot.thread = thread

    def follow(self, sock: socket.socket) -> bool:
        """Take one of the role's follower slots for this connection, if one is free."""
        with self._conn_lock:
            slot = self._active[sock]
            if self._following.get(slot.role, 0) >= self.follower_budget.get(slot.role, 0):
                return False
            self._following[slot.role] = self._following.get(slot.role, 0) + 1
            slot.following = True
            return True

    def _release(self, sock: socket.socket) -> None:
        with self._conn_lock:
            slot = self._active.pop(sock, None)
            if slot is not None:
                self._in_use[slot.role] -= 1
                if slot.following:
                    self._following[slot.role] -= 1
        self._restore_reserve()

    def _flush_refusals(self, force: bool = False) -> None:
        self.denied.flush(force)
        self.busy.flush(force)

    def _spend_reserve(self) -> bool:
        """Free the descriptor kept for when the process runs out: one more client fits."""
        with self._conn_lock:
            fd, self._reserve_fd = self._reserve_fd, None
        if fd is None:
            return False
        os.close(fd)
        return True

    def _restore_reserve(self) -> None:
        if self._reserve_fd is not None:
            return
        with contextlib.suppress(OSError), self._conn_lock:
            if self._reserve_fd is None:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def active_connections(self) -> int:
        with self._conn_lock:
            return len(self._active)

    @property
    def followers(self) -> int:
        with self._conn_lock:
            return sum(self._following.values())

    # -- internals -------------------------------------------------------------

    def _open(
        self, settings: ControlConfig, policy: Policy
    ) -> tuple[_ControlHTTPServer, threading.Thread]:
        mode, gid = file_access(settings, policy)
        try:
            server = _ControlHTTPServer(self, dataclasses.replace(settings, mode=mode), gid)
        except OSError as exc:
            raise ControlError(
                f"cannot create control socket {settings.socket}: {exc.strerror or exc}"
            ) from None
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="sockd-control-serve",
            daemon=True,
        )
        thread.start()
        self.log.info(
            "control.listening",
            path=settings.socket,
            mode=f"0{settings.mode:o}",
            group=settings.group,
            read_group=settings.read_group,
        )
        return server, thread

    def _restyle(self, server: _ControlHTTPServer, settings: ControlConfig, policy: Policy) -> None:
        """Apply a new mode or group to the socket file we already serve on.

        The directory is checked again (its owner or mode may have changed since), and
        the file is changed through a descriptor of the very inode we created, never
        through a path a symlink could have been swapped into.
        """
        identity = server.identity
        if identity is None:
            raise ControlError(f"control socket {server.path} is not ours any more")
        check_directory(server.path)
        mode, file_gid = file_access(settings, policy)
        gid = file_gid if file_gid is not None else os.getegid()
        try:
            set_access(server.path, mode, gid, identity)
        except FileNotFoundError:
            raise ControlError(
                f"control socket {server.path} was removed; restart sockd to recreate it"
            ) from None
        except OSError as exc:
            raise ControlError(
                f"cannot change control socket {server.path}: {exc.strerror}"
            ) from None
        server.mode, server.gid = mode, file_gid

    def _join_handlers(self, deadline: float) -> bool:
        """Wait for handler threads until ``deadline``; True when none is left."""
        me = threading.current_thread()
        while True:
            with self._conn_lock:
                threads = [
                    slot.thread
                    for slot in self._active.values()
                    if slot.thread is not None and slot.thread is not me
                ]
            if not threads:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            threads[0].join(remaining)


def _stop_serving(server: _ControlHTTPServer, thread: threading.Thread | None) -> None:
    # serve_forever() looks at its shutdown flag only between select() calls, up to
    # poll_interval apart. A shut-down listening socket stays readable (accept() then
    # fails with EINVAL), so the loop sees the flag at once; new clients are refused.
    with contextlib.suppress(OSError):
        server.socket.shutdown(socket.SHUT_RDWR)
    if thread is not None and thread.is_alive():
        server.shutdown()  # returns once serve_forever() has seen the request
        thread.join()
    server.server_close()


if TYPE_CHECKING:

    def _owner(server: ControlServer) -> Owner:
        return server  # mypy checks that the server gives handlers what they use
