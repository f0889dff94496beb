"""Listeners: our ``socketserver`` subclasses, one per listen address, and their hooks.

Each listen address is one ``socketserver`` server object: ``ThreadingListener`` (a
``ThreadingTCPServer``) or ``ForkingListener`` (a ``ForkingTCPServer``), so a handler
sees the ``self.server`` the standard library documents. They are extended only
through socketserver's hooks (``get_request``, ``verify_request``, ``process_request``,
``finish_request``, ``shutdown_request``, ``close_request``, ``handle_error``). Owns
too what is done to a listening socket (``bind_socket``, ``stop_handshakes``,
``accept_queue_length``) and how a forked child's exit becomes its conn.close line
(``finish_child``).

May import ``sockd.admission``, ``sockd.connections``, ``sockd.config`` and
``sockd.logs``; the accept loop and the daemon build on it. Not the handler base class:
a listener constructs whichever handler is configured with socketserver's three
arguments, and ``SockdHandler`` equips itself from them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

from sockd import logs
from sockd.admission import Hub
from sockd.config import Address
from sockd.connections import (
    Connection,
    ConnSocket,
    Registry,
    close_gently,
    discard_input,
    log_close,
    tcp_stats,
)

_Socket = socket.socket  # inside listener classes, "socket" is the listening socket attribute
#: A listening socket's accept queue length (``tcpi_unacked`` of a LISTEN socket).
_TCPI_UNACKED: Final = 24


class ListenerMixin:
    """Behaviour shared by both modes; mixed in before the socketserver class."""

    hub: Hub
    address: Address
    label: str
    socket: _Socket
    RequestHandlerClass: Callable[..., socketserver.BaseRequestHandler]
    inherited: bool
    _kind: tuple[int, int, int]

    def __init__(
        self, hub: Hub, address: Address, sock: _Socket | None = None, inherited: bool = False
    ) -> None:
        # The socketserver class after us in the MRO; its own socket is replaced at once
        # by ours (bound here, inherited from systemd, or kept across a mode switch).
        super().__init__(  # type: ignore[call-arg]
            (address.host, address.port), hub.handler_cls, bind_and_activate=False
        )
        self.socket.close()
        self.setup_listener(hub, address, sock, inherited)

    def setup_listener(
        self, hub: Hub, address: Address, sock: _Socket | None, inherited: bool
    ) -> None:
        self.hub = hub
        self.address = address
        self.inherited = inherited
        if sock is None:
            sock = bind_socket(address, hub.settings.request_queue_size, hub.settings.reuse_port)
        sock.setblocking(False)
        self.socket = sock
        bound = sock.getsockname()
        self.label = str(Address(address.host, bound[1]))
        # Plain ints: the socket's family/type properties build enum members on every call.
        self._kind = (int(sock.family), int(sock.type), sock.proto)

    def fileno(self) -> int:
        return self.socket.fileno()

    # socketserver hooks -------------------------------------------------------------
    def get_request(self) -> tuple[ConnSocket, Any]:
        fd, addr = self.socket._accept()  # type: ignore[attr-defined]  # avoids a second socket object
        sock = ConnSocket(*self._kind, fileno=fd)
        sock.sockd_conn = None
        return sock, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Access rules and limits, checked before any handler code runs (``Hub.admit``)."""
        return self.hub.admit(request, client_address, self.label)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Construct the handler admitted with the connection (a reload may have changed it).

        Constructed as socketserver does, with its three arguments: a ``SockdHandler``
        takes its options, logger and drain flag from them in its own ``__init__``.
        """
        conn: Connection | None = getattr(request, "sockd_conn", None)
        cls = conn.handler_cls if conn is not None else self.RequestHandlerClass
        cls(request, client_address, self)  # type: ignore[arg-type]

    def handle_error(self, request: Any, client_address: Any) -> None:
        conn: Connection | None = getattr(request, "sockd_conn", None)
        log = conn.log if conn is not None else self.hub.log
        exc = sys.exc_info()[1]
        log.error(
            "handler.error",
            error=f"{type(exc).__name__}: {exc}",
            exc_info=True,
        )

    def refuse(self, request: _Socket) -> None:
        with contextlib.suppress(OSError):
            request.close()

    def shutdown_request(self, request: Any) -> None:
        """socketserver's: end our side with a FIN, then close; during a drain, without a reset.

        Closing a socket whose peer's bytes were never read makes the kernel send a
        reset instead of a FIN, and the client cannot tell whether its request ran. A
        handler that ends at the drain signal before reading the request it was handed
        (a connection taken from the backlog at the stop) must not reset it, so during a
        drain what the peer already sent is read and dropped first (one Event check per
        connection otherwise).
        """
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        if self.hub.draining.is_set():
            discard_input(request)
        self.close_request(request)  # type: ignore[attr-defined]  # the socketserver class's


class ThreadingListener(ListenerMixin, socketserver.ThreadingTCPServer):
    """``mode = "threading"``: socketserver's thread per connection, daemon threads.

    Threads are daemon threads and ``block_on_close`` is off because the daemon drains
    with a deadline itself; the standard library's join on close has none. A thread
    that finished a connection may serve the next one (``server.max_spare_threads``,
    see ``sockd.workers``): starting threads is most of the cost of a short connection.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        conn: Connection = request.sockd_conn
        try:
            self.hub.workers.submit(
                self.process_request_thread, (request, client_address), f"conn-{conn.id}"
            )
        except RuntimeError:
            # "can't start new thread": the process is at its thread limit (RLIMIT_NPROC,
            # a cgroup's pids.max, memory for stacks). A refusal like any other limit:
            # counted, in the rate-limited conn.refused summary, no traceback per peer.
            self.hub.registry.unadmit(conn, "threads")
            close_gently(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn: Connection = request.sockd_conn
        if logs.enabled(logs.DEBUG):
            conn.log.debug("conn.open")
        ended = "closed"
        try:
            self.finish_request(request, client_address)
        except _PEER_GONE:
            ended = "peer_gone"  # the client hung up mid-reply: not a server bug
        except BaseException:
            # SystemExit and KeyboardInterrupt too: raised by a handler they would only
            # end this thread, with the traceback on raw stderr and the connection
            # logged as closed normally.
            ended = "error"
            self.handle_error(request, client_address)
        finally:
            stats = tcp_stats(request)
            self.shutdown_request(request)
            if conn.close_reason is not None:
                ended = conn.close_reason
            registry = self.hub.registry
            if registry.claim(conn):
                # The canonical line is written before the connection stops counting as
                # active: whoever sees it gone can rely on its conn.close being out.
                log_close(conn, stats, ended)
                registry.remove(conn, stats, error=ended == "error")


#: The peer went away while the handler was using the socket: an ordinary end.
_PEER_GONE: Final = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
#: How a forked child reports how its connection ended.
_EXIT_PEER_GONE: Final = 3
_ENDED_BY_EXIT: Final = {0: "closed", 1: "error", _EXIT_PEER_GONE: "peer_gone"}

#: Signals whose inherited Python handlers make no sense in a forked child.
_CHILD_SIGNALS: Final = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)


class ForkingListener(ListenerMixin, socketserver.ForkingTCPServer):
    """``mode = "forking"``: socketserver's process per connection, reaped by the daemon.

    ``ForkingMixIn`` waits inside the serving loop when at ``max_children`` and reaps
    only from that loop; that stalls stopping and the watchdog. Here the loop stops
    accepting at the cap instead (connections wait in the backlog), and the daemon's
    main thread reaps on ``SIGCHLD``. The parent keeps its copy of each connection's
    socket until the child exits, to read live byte counts and to close it on demand.
    """

    allow_reuse_address = True
    block_on_close = False

    def service_actions(self) -> None:
        """Reaping is the daemon's job (on SIGCHLD), never a blocking wait in this loop."""

    def process_request(self, request: Any, client_address: Any) -> None:
        conn: Connection = request.sockd_conn
        try:
            pid = os.fork()
        except OSError:
            # EAGAIN/ENOMEM: the task limit (RLIMIT_NPROC, pids.max) that also stops
            # threads; a refusal counted like threading mode's, no traceback per peer.
            self.hub.registry.unadmit(conn, "threads")
            close_gently(request)
            return
        if pid:
            conn.pid = pid
            with self.hub.registry.lock:
                self.hub.registry.children[pid] = conn
            if logs.enabled(logs.DEBUG):
                conn.log.debug("conn.open")
            return
        # Child: this must never return, hence os._exit().
        status = 1
        try:
            self._become_child(conn)
            conn.pid = os.getpid()
            conn.log = None
            try:
                self.finish_request(request, client_address)
                status = 0
            except _PEER_GONE:
                status = _EXIT_PEER_GONE
            except BaseException:  # SystemExit too: a handler error, as in threading mode
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
        except BaseException:
            with contextlib.suppress(BaseException):
                conn.log.exception("server.error", where="forked child")
        finally:
            os._exit(status)

    def _become_child(self, conn: Connection) -> None:
        """Drop what belongs to the parent: its signal handling and other descriptors."""
        signal.set_wakeup_fd(-1)
        for sig in _CHILD_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C reaches the whole process group; the parent decides how to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # SIGTERM (from the parent's drain, or systemd's control-group kill) means
        # "a drain has begun": finish the connection, do not die mid-reply.
        draining = self.hub.draining
        signal.signal(signal.SIGTERM, lambda *_: draining.set())
        for sock in self.hub.listen_sockets():
            with contextlib.suppress(OSError):
                sock.close()
        registry = self.hub.registry
        registry.lock = threading.Lock()  # may have been held by another thread at fork
        for other in list(registry.active.values()):
            if other is not conn:
                with contextlib.suppress(OSError):
                    other.sock.close()

    def close_request(self, request: Any) -> None:
        """The parent keeps the descriptor until the child exits (see the class docstring)."""


def finish_child(registry: Registry, pid: int, status: int) -> None:
    """Account for a reaped child: close the parent's copy and log the canonical line."""
    with registry.lock:
        conn = registry.children.get(pid)
    if conn is None:
        return
    stats = tcp_stats(conn.sock)
    with contextlib.suppress(OSError):
        conn.sock.close()
    extra: dict[str, Any] = {}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
        ended = conn.close_reason or "killed"
        extra["signal"] = name
        with registry.lock:
            registry.counters.children_killed += 1
        conn.log.warning("child.exited", signal=name)
    else:
        code = os.WEXITSTATUS(status)
        ended = conn.close_reason or _ENDED_BY_EXIT.get(code, "error")
        if code not in _ENDED_BY_EXIT:
            extra["exit_status"] = code
            conn.log.warning("child.exited", exit_status=code)
    if registry.claim(conn):
        log_close(conn, stats, ended, **extra)
        registry.remove(conn, stats, error=ended == "error")


# connection attempts) and passes everything else. For a TCP socket the kernel runs it
# with the packet's data at the TCP header, so byte 13 holds the flags.
_SO_ATTACH_FILTER: Final = 26
_DROP_SYN_PROGRAM: Final = (
    (0x30, 0, 0, 13),  # ldb [13]          A = TCP flags
    (0x54, 0, 0, 0x12),  # and #0x12         A &= SYN|ACK
    (0x15, 0, 1, 0x02),  # jeq #SYN, +0, +1  a bare SYN...
    (0x06, 0, 0, 0),  # ret #0            ...is dropped
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1     everything else passes
)
_DROP_SYN_CODE: Final = ctypes.create_string_buffer(
    b"".join(struct.pack("HBBI", *insn) for insn in _DROP_SYN_PROGRAM)
)


def stop_handshakes(sock: socket.socket) -> bool:
    """Make a listening socket ignore new connection attempts (SYNs); False if unsupported.

    Used at a stop, before the accept queue is emptied: handshakes already complete
    stay in the queue and are taken; a new SYN is dropped, so its client retries and,
    once the socket is closed, is refused (ECONNREFUSED) instead of completing a
    connection that the close would then reset. Handshakes that were half done (the
    SYN-ACK sent, the client's ACK not yet in) still complete: their ACK passes. The
    filter stays until the socket is closed: only for a socket no other process holds.
    """
    program = struct.pack("HP", len(_DROP_SYN_PROGRAM), ctypes.addressof(_DROP_SYN_CODE))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True


def accept_queue_length(sock: socket.socket) -> int:
    """Connections completed by the kernel and waiting in a listening socket's queue."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
    except OSError:
        return 0
    if len(info) < _TCPI_UNACKED + 4:
        return 0
    (queued,) = struct.unpack_from("I", info, _TCPI_UNACKED)
    return int(queued)


def bind_socket(address: Address, backlog: int, reuse_port: bool) -> socket.socket:
    """Bind and listen on ``address``; raise OSError with the address in the message."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "[::]:9000" means IPv6 only; list "0.0.0.0:9000" too for IPv4.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock


Listener = ThreadingListener | ForkingListener
LISTENER_CLASSES: Final[dict[str, type[ThreadingListener] | type[ForkingListener]]] = {
    "threading": ThreadingListener,
    "forking": ForkingListener,
}
