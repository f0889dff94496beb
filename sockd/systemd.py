"""systemd's protocols, spoken without libsystemd: readiness, socket activation, watchdog, journal.

Leaf module: standard library only, it imports nothing from ``sockd`` (the daemon composes
it; the logging sink and the test harness import it alone). Every entry point is safe to
call when sockd does not run under systemd: notifications become no-ops returning
``False``, ``listen_fds()`` returns ``[]``, ``watchdog_interval()`` returns ``None``.

What it owns:

* ``Notifier`` / ``notify()``: sd_notify(3) datagrams to ``$NOTIFY_SOCKET``, including
  file descriptors for the service's fd store (``FDSTORE=1``).
* ``watchdog_interval()``: how often to send ``WATCHDOG=1``.
* ``listen_fds()``: sockets systemd passes (from ``sockd.socket`` or the fd store), and
  ``find_inherited()`` / ``match_inherited()``: which configured address each one serves.
* ``JournalWriter`` / ``journal_stream_matches()``: structured entries over journald's
  native protocol, and whether stdout/stderr already go to the journal.

Protocol references: sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3) and
https://systemd.io/JOURNAL_NATIVE_PROTOCOL/.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, Self, TypeVar

__all__ = [
    "JOURNAL_SOCKET",
    "LISTEN_FDS_START",
    "HostPort",
    "InheritedSocket",
    "JournalError",
    "JournalWriter",
    "Notifier",
    "SystemdError",
    "find_inherited",
    "journal_field_name",
    "journal_stream_matches",
    "listen_fds",
    "match_inherited",
    "notify",
    "watchdog_interval",
]

#: First file descriptor systemd passes (``SD_LISTEN_FDS_START``): 0-2 are stdio.
LISTEN_FDS_START = 3
#: journald's native-protocol socket.
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# A blocked receiver (a wedged manager or journald) must not hang the daemon's main loop
# forever: sends give up after this long and report the failure instead.
_SEND_TIMEOUT = 5.0
# journald refuses longer field names (JOURNAL_FIELD_NAME_MAX in systemd).
_FIELD_NAME_MAX = 64
# systemd refuses longer FDNAME= values (FDNAME_MAX).
_FDNAME_MAX = 255
_ASCII_FIELD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class SystemdError(Exception):
    """systemd handed sockd something it cannot use; the message says what and how to fix it.

    Defined here rather than under ``sockd.errors.SockdError`` so this module stays a leaf;
    the daemon converts it where it composes this module.
    """


class JournalError(SystemdError, OSError):
    """An entry could not be written to the journal.

    Also an ``OSError``: it is an I/O failure, so a log sink that already guards its
    writes against ``OSError`` (and falls back or drops the line) handles it unchanged.
    """


# --- fork safety -------------------------------------------------------------------------
#
# Objects here hold a lock and a socket. A lock held by another thread at fork() time stays
# held forever in the child, so every such object re-creates its lock in a forked child.
_FORK_AWARE: weakref.WeakSet[_ForkAware] = weakref.WeakSet()


class _ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


def _reset_after_fork() -> None:
    global _default_lock, _forked  # noqa: PLW0603 -- module state must be replaced too
    _default_lock = threading.Lock()
    _forked = True
    for obj in list(_FORK_AWARE):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_after_fork)


class _SocketClient:
    """A lock and a socket opened on first use, closed on demand; fork-aware.

    What Notifier and JournalWriter share. A forked child gets a fresh lock (the
    parent's may have been held by another thread at fork time); subclasses decide
    whether the child also drops the socket.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        _FORK_AWARE.add(self)

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the socket; a later send reconnects."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _unix_address(text: str, variable: str) -> str:
    """Turn ``/path`` or ``@abstract`` into a connectable AF_UNIX address."""
    if text.startswith("@"):
        address = "\0" + text[1:]
    elif text.startswith("/"):
        address = text
    else:
        raise SystemdError(
            f"{variable}={text!r} is neither an absolute socket path nor an abstract "
            '"@name" address; sockd supports only those two forms'
        )
    if len(os.fsencode(address)) > 107:
        raise SystemdError(f"{variable}={text!r} is longer than an AF_UNIX address may be")
    return address


def _connect_datagram(address: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        # Connected, because socket.send_fds() ignores its address argument (CPython
        # sends with plain sendmsg and no destination), and connecting once also saves
        # resolving the path on every datagram.
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _strerror(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out (the receiver is not reading)"
    return exc.strerror or str(exc)


# --- sd_notify ---------------------------------------------------------------------------


class Notifier(_SocketClient):
    """Sends sd_notify(3) state changes to the service manager over ``$NOTIFY_SOCKET``.

    One datagram per call, the lines joined with ``"\\n"``. When the variable is unset
    (sockd not started by systemd, or ``Type=`` not ``notify``) every call is a no-op that
    returns ``False``; calls return ``True`` once the datagram is sent.

    A failed send never raises: a daemon must keep serving when, say, the manager is being
    re-executed. It returns ``False``, keeps the reason in ``last_error`` and passes it to
    ``on_error`` (the daemon logs it there). Bad arguments (a line with a newline, a
    negative timeout) are programming errors and raise ``ValueError``.

    One connected socket is kept open and shared by all threads under a lock. In a
    process forked from the one that created the notifier (forking-mode children) every
    call returns ``False`` without sending: with ``NotifyAccess=main`` systemd would drop
    the message and log a warning, and a child saying ``STOPPING=1`` or ``READY=1`` would
    be wrong anyway. The child closes its copy of the socket and gets a fresh lock, so a
    lock held by another thread at fork time cannot deadlock it.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        on_error: Callable[[str], None] | None = None,
        timeout: float = _SEND_TIMEOUT,
    ) -> None:
        """Use ``address`` (``/path`` or ``@abstract``), else ``$NOTIFY_SOCKET`` as it is now."""
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET")
        address = address or None
        self.address_text = address
        self.last_error: str | None = None
        self._on_error = on_error
        self._timeout = timeout
        self._pid = os.getpid()
        super().__init__()
        self._address: str | None = None
        self._unusable: str | None = None
        if address is not None:
            try:
                self._address = _unix_address(address, "NOTIFY_SOCKET")
            except SystemdError as exc:
                self._unusable = str(exc)

    @property
    def enabled(self) -> bool:
        """Whether calls here reach a service manager (set, usable, and not a forked child)."""
        return self._address is not None and os.getpid() == self._pid

    # The states the daemon reports, each one datagram.

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: systemd marks the unit active."""
        return self.send("READY=1", *_status_line(status))

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status``."""
        return self.send(*_status_line(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; send ``ready()`` when it is done (applied or rejected).

        ``MONOTONIC_USEC`` lets systemd tell this reload from an earlier one.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *_status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """A graceful stop started: systemd shows "deactivating" instead of a crash."""
        return self.send("STOPPING=1", *_status_line(status))

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``; send every ``watchdog_interval()`` seconds."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd's start/stop/reload timeout fires.

        Send it repeatedly during a long drain: each message extends from *now*.
        """
        if seconds < 0:
            raise ValueError(f"extend_timeout needs a non-negative duration, got {seconds}")
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        """Keep ``fds`` in the unit's fd store under ``name`` (needs ``FileDescriptorStoreMax=``).

        After a restart systemd passes them back through ``listen_fds()`` with that name,
        so listening sockets survive a crash or restart without refusing connections.
        """
        _check_fdname(name)
        if not fds:
            raise ValueError("store_fds needs at least one file descriptor")
        return self.send("FDSTORE=1", f"FDNAME={name}", fds=fds)

    def remove_fds(self, name: str) -> bool:
        """Drop every fd stored under ``name`` (an address removed by a reload)."""
        _check_fdname(name)
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def send(self, *lines: str, fds: Sequence[int] = ()) -> bool:
        """Send ``lines`` (``KEY=value`` each) as one datagram, with ``fds`` via SCM_RIGHTS."""
        for line in lines:
            if "\n" in line:
                raise ValueError(f"an sd_notify line cannot contain a newline: {line!r}")
        if self._address is None:
            if self._unusable is not None:
                self._report(self._unusable)
            return False
        if os.getpid() != self._pid:
            return False
        payload = "\n".join(lines).encode()
        with self._lock:
            error = self._send_locked(payload, fds)
        if error is not None:
            self._report(error)
            return False
        self.last_error = None
        return True

    def _send_locked(self, payload: bytes, fds: Sequence[int]) -> str | None:
        assert self._address is not None  # noqa: S101 -- checked by the caller
        failure: OSError | None = None
        # Second attempt on a fresh socket: the first may have been connected to a socket
        # the manager has since replaced (ECONNREFUSED), which a reconnect repairs.
        for _attempt in range(2):
            try:
                if self._sock is None:
                    self._sock = _connect_datagram(self._address, self._timeout)
                if fds:
                    socket.send_fds(self._sock, [payload], list(fds))
                else:
                    self._sock.send(payload)
            except OSError as exc:
                failure = exc
                self._close_locked()
                if isinstance(exc, TimeoutError):
                    break
                continue
            return None
        assert failure is not None  # noqa: S101 -- the loop only falls through on failure
        return f"cannot notify systemd at {self.address_text}: {_strerror(failure)}"

    def _report(self, message: str) -> None:
        # Tell on_error once per distinct failure, not on every watchdog ping while the
        # manager is away; a successful send clears last_error and re-arms it.
        repeated = message == self.last_error
        self.last_error = message
        if self._on_error is not None and not repeated:
            self._on_error(message)

    def _after_fork_in_child(self) -> None:
        super()._after_fork_in_child()
        self._close_locked()  # a child never notifies (see the class docstring)


def _status_line(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    # A newline would end the STATUS= line and start a bogus assignment.
    return ("STATUS=" + " ".join(text.splitlines()),)


def _check_fdname(name: str) -> None:
    if not name or len(name) > _FDNAME_MAX or ":" in name or not all(" " <= c <= "~" for c in name):
        raise ValueError(
            f"an fd store name must be 1-{_FDNAME_MAX} printable ASCII characters "
            f"without ':', got {name!r}"
        )


_default_lock = threading.Lock()
_default: Notifier | None = None
# Set in forked children: like a Notifier, notify() stays silent there.
_forked = False


def notify(*lines: str) -> bool:
    """Send ``lines`` to ``$NOTIFY_SOCKET`` with a shared ``Notifier``; ``False`` when unset.

    The shared notifier follows the variable: if it changes (tests), a new one is made.
    In a process forked from the one that imported this module it returns ``False``
    without sending, for the reasons given on ``Notifier``.
    """
    global _default  # noqa: PLW0603 -- one process-wide notifier, created on first use
    if _forked:
        return False
    address = os.environ.get("NOTIFY_SOCKET") or None
    with _default_lock:
        if _default is None or _default.address_text != address:
            if _default is not None:
                _default.close()
            _default = Notifier(address)
        notifier = _default
    return notifier.send(*lines)


# --- watchdog ----------------------------------------------------------------------------


def watchdog_interval(*, unset_environment: bool = False) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or ``None`` if off.

    ``None`` when ``$WATCHDOG_USEC`` is unset or ``$WATCHDOG_PID`` names another process
    (the variables leaked into a child). Pinging at half the timeout leaves the other half
    for a busy main loop, as sd_watchdog_enabled(3) recommends.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    pid_text = os.environ.get("WATCHDOG_PID")
    if unset_environment:
        os.environ.pop("WATCHDOG_USEC", None)
        os.environ.pop("WATCHDOG_PID", None)
    if not usec_text:
        return None
    usec = _positive_int(usec_text, "WATCHDOG_USEC")
    if pid_text and _positive_int(pid_text, "WATCHDOG_PID") != os.getpid():
        return None
    return usec / 2 / 1_000_000


#: The most digits a number from the environment may have: any 64-bit count fits in 19.
_MAX_DIGITS: Final = 19


def _decimal(text: str) -> int | None:
    """``text`` as a number if it is 1 to 19 ASCII digits, else ``None``.

    ``str.isdigit()`` alone takes "²" and Arabic-Indic or fullwidth digits (``int()``
    then fails or reads them), and ``int()`` of a 5000-digit string raises ValueError
    (the interpreter's limit on digits): neither may escape as a traceback.
    """
    if not 0 < len(text) <= _MAX_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def _shown(text: str) -> str:
    """A variable's value for a one-line message: quoted, at most its first 20 characters."""
    return repr(text) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} characters)"


def _positive_int(text: str, variable: str) -> int:
    value = _decimal(text)
    if value is None or value <= 0:
        raise SystemdError(f"{variable}={_shown(text)} is not a positive integer")
    return value


# --- socket activation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A socket systemd passed: from a ``.socket`` unit or from the service's fd store.

    ``name`` is the socket unit's ``FileDescriptorName=`` (default: the unit's name, e.g.
    ``sockd.socket``) or the ``FDNAME=`` it was stored under; ``"unknown"`` when systemd
    sent no names.
    """

    fd: int
    name: str
    socket: socket.socket

    @property
    def family(self) -> int:
        return int(self.socket.family)

    @property
    def type(self) -> int:
        return int(self.socket.type)

    @property
    def address(self) -> Any:
        """What ``getsockname()`` says: ``(host, port[, flow, scope])`` or a Unix path."""
        return self.socket.getsockname()

    @property
    def listening(self) -> bool:
        """Whether ``listen()`` was called on it (``Accept=no`` stream sockets are)."""
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))

    @property
    def dual_stack(self) -> bool:
        """An IPv6 socket that also accepts IPv4 (``IPV6_V6ONLY`` off)."""
        if self.family != socket.AF_INET6:
            return False
        return not self.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)

    def describe(self) -> str:
        """``fd 3 "sockd.socket" (tcp [::]:9000)`` -- for messages to operators."""
        return f'fd {self.fd} "{self.name}" ({self._kind()} {self._where()})'

    def _kind(self) -> str:
        if self.family == socket.AF_UNIX:
            return "unix"
        if self.type == socket.SOCK_STREAM:
            return "tcp"
        return "udp" if self.type == socket.SOCK_DGRAM else "socket"

    def _where(self) -> str:
        address = self.address
        if isinstance(address, tuple):
            return _format_host_port(str(address[0]), int(address[1]))
        if isinstance(address, bytes):
            address = address.decode(errors="replace")
        return repr(address) if address else "unbound"


def listen_fds(unset_environment: bool = True) -> list[InheritedSocket]:
    """The sockets systemd passed this process (``$LISTEN_FDS``), in order, from fd 3.

    Empty when the variables are absent or ``$LISTEN_PID`` names another process. Each fd
    is marked close-on-exec (systemd passes them inheritable) so programs a handler runs
    do not keep the listening sockets open. With ``unset_environment`` the three variables
    are removed, so a child process does not think the fds are meant for it.

    Raises ``SystemdError`` when the variables are malformed, a name count does not match,
    or an fd is closed or not a socket.
    """
    fds_text = os.environ.get("LISTEN_FDS")
    pid_text = os.environ.get("LISTEN_PID")
    names_text = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(variable, None)
    if not fds_text or not pid_text:
        return []
    if _positive_int(pid_text, "LISTEN_PID") != os.getpid():
        return []
    count = _decimal(fds_text)
    if count is None:
        raise SystemdError(f"LISTEN_FDS={_shown(fds_text)} is not a number of file descriptors")
    limit = os.sysconf("SC_OPEN_MAX")
    if count > limit:
        raise SystemdError(
            f"LISTEN_FDS={_shown(fds_text)} is more file descriptors than this process "
            f"may have open ({limit})"
        )
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = names_text.split(":") if count else []
        if len(names) != count:
            raise SystemdError(
                f"LISTEN_FDNAMES names {len(names)} file descriptors but LISTEN_FDS={count}"
            )
    inherited: list[InheritedSocket] = []
    for offset, name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                what = "is not a socket"
            else:
                what = f"cannot be used ({_strerror(exc)})"
            raise SystemdError(
                f'file descriptor {fd} ("{name}") passed by systemd {what}; sockd accepts '
                "only sockets (ListenStream= in a .socket unit, or sockets it stored itself)"
            ) from exc
        inherited.append(InheritedSocket(fd, name, sock))
    return inherited


class HostPort(Protocol):
    """A configured listen address (``sockd.config.Address`` fits)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


AddressT = TypeVar("AddressT", bound=HostPort)
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class _Endpoint:
    ip: _IP
    port: int
    # An IPv6 wildcard that also takes IPv4 connections.
    dual_stack: bool

    def covers(self, ip: _IP) -> bool:
        """Whether a socket bound here receives connections to ``ip``."""
        if ip == self.ip:
            return True
        if not self.ip.is_unspecified:
            return False
        return ip.version == self.ip.version or (self.dual_stack and ip.version == 4)


def _normalise_ip(host: str) -> _IP:
    ip = ipaddress.ip_address(host)
    # ::ffff:192.0.2.1 is how a dual-stack socket spells an IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _inherited_endpoint(sock: InheritedSocket) -> _Endpoint | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    host, port = sock.address[:2]
    return _Endpoint(_normalise_ip(host), int(port), sock.dual_stack)


def _configured_endpoints(host: str, port: int) -> list[_Endpoint]:
    """Every IP a configured host stands for; a name is resolved (it may mean several)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = _normalise_ip(bare)
    except ValueError:
        try:
            infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
        except OSError:
            return []  # the daemon's own bind() reports the unresolvable name
        ips = {_normalise_ip(str(info[4][0])) for info in infos}
        return [_Endpoint(ip, port, dual_stack=False) for ip in sorted(ips, key=str)]
    # Assume a configured "::" is dual-stack, as net.ipv6.bindv6only=0 (the default)
    # makes it when sockd binds it: that is the conservative choice for overlap checks.
    return [_Endpoint(ip, port, dual_stack=ip.version == 6 and ip.is_unspecified)]


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _serves(wanted: _Endpoint, have: _Endpoint) -> bool:
    """An inherited socket serves a configured address if it is that address, or if the
    address is the IPv4 wildcard and the socket a dual-stack IPv6 wildcard (which receives
    every IPv4 connection too: systemd's default for ``ListenStream=9000``)."""
    if wanted.port != have.port or wanted.port == 0:
        return False
    if wanted.ip == have.ip:
        return True
    return wanted.ip == ipaddress.IPv4Address("0.0.0.0") and have.dual_stack


def _overlaps(wanted: _Endpoint, have: _Endpoint) -> bool:
    """Whether the two would compete for the same connections (bind() would fail)."""
    if wanted.port != have.port:
        return False
    return have.covers(wanted.ip) or wanted.covers(have.ip)


def _lookup(
    inherited: Sequence[InheritedSocket], host: str, port: int, used: set[int], *, exact: bool
) -> InheritedSocket | None:
    """The first unused inherited TCP socket bound to ``host:port`` (or serving it)."""
    for wanted in _configured_endpoints(host, port):
        for sock in inherited:
            have = _inherited_endpoint(sock)
            if have is None or sock.fd in used:
                continue
            hit = (
                (wanted.ip == have.ip and wanted.port == have.port != 0)
                if exact
                else (_serves(wanted, have))
            )
            if hit:
                _check_listening(sock, host, port)
                return sock
    return None


def find_inherited(
    inherited: Sequence[InheritedSocket], host: str, port: int, *, exclude: Iterable[int] = ()
) -> InheritedSocket | None:
    """The inherited TCP socket that serves ``host:port``, or ``None`` if none is related.

    Exact matches win; the IPv4 wildcard ``0.0.0.0`` is also served by a dual-stack ``::``
    socket (not the reverse: an IPv4 socket would lose IPv6 clients). A host name is
    resolved and served by a socket bound to any of its addresses. Port 0 never matches.
    Sockets whose fd is in ``exclude`` are skipped (already assigned).

    Raises ``SystemdError`` when an inherited socket overlaps the address without serving
    it -- e.g. ``127.0.0.1:9000`` configured but ``0.0.0.0:9000`` passed, which would
    expose the port on every interface -- because silently using it changes who can
    connect, and binding the address ourselves would fail with "address in use". Also
    when the matching socket is not listening.
    """
    used = set(exclude)
    for exact in (True, False):
        found = _lookup(inherited, host, port, used, exact=exact)
        if found is not None:
            return found
    for wanted in _configured_endpoints(host, port):
        for sock in inherited:
            have = _inherited_endpoint(sock)
            if have is not None and sock.fd not in used and _overlaps(wanted, have):
                raise SystemdError(_overlap_message(host, port, sock))
    return None


def _check_listening(sock: InheritedSocket, host: str, port: int) -> None:
    if not sock.listening:
        raise SystemdError(
            f"server.listen {_format_host_port(host, port)}: systemd passed "
            f"{sock.describe()}, which is not listening; use ListenStream= with Accept=no"
        )


def _overlap_message(host: str, port: int, sock: InheritedSocket) -> str:
    if sock.dual_stack:
        scope = "IPv4 and IPv6"
    else:
        scope = "IPv6 only" if sock.family == socket.AF_INET6 else "IPv4 only"
    return (
        f"server.listen {_format_host_port(host, port)} does not match the socket systemd "
        f"passed, {sock.describe()}, {scope}: it uses the same port but accepts different "
        "connections. Make ListenStream= in the .socket unit and server.listen name the "
        "same address, then restart the socket unit."
    )


def match_inherited(
    inherited: Sequence[InheritedSocket], addresses: Iterable[AddressT]
) -> dict[AddressT, InheritedSocket]:
    """Pair configured addresses with the inherited TCP sockets that serve them.

    Addresses missing from the result have no inherited socket: the daemon binds those
    itself. Exact matches are assigned before wildcard ones, so ``0.0.0.0:9000`` and
    ``[::]:9000`` configured together take separate inherited sockets when both exist.

    Raises ``SystemdError`` (see ``find_inherited``) for an overlapping mismatch, when one
    socket would have to serve two configured addresses, and when an inherited TCP socket
    serves no configured address: connections would queue on it unanswered. Sockets of
    other kinds (Unix, UDP) are left to the caller.
    """
    wanted = list(addresses)
    result: dict[AddressT, InheritedSocket] = {}
    used: set[int] = set()
    # Exact matches first, so a wildcard cannot take a socket meant for an exact address.
    for address in wanted:
        exact = _lookup(inherited, address.host, address.port, used, exact=True)
        if exact is not None:
            result[address] = exact
            used.add(exact.fd)
    for address in wanted:
        if address in result:
            continue
        found = find_inherited(inherited, address.host, address.port, exclude=used)
        if found is None:
            # Nothing free serves it; does an already assigned socket overlap it?
            taken = find_inherited(inherited, address.host, address.port)
            if taken is not None:
                other = next(a for a, s in result.items() if s.fd == taken.fd)
                raise SystemdError(
                    f"server.listen lists both {_format_host_port(other.host, other.port)} "
                    f"and {_format_host_port(address.host, address.port)}, but systemd "
                    f"passed one socket that serves both, {taken.describe()}; list only "
                    "one, or pass separate sockets (BindIPv6Only=ipv6-only)"
                )
            continue
        result[address] = found
        used.add(found.fd)
    unused = [s for s in inherited if s.fd not in used and _inherited_endpoint(s) is not None]
    if unused:
        listed = ", ".join(s.describe() for s in unused)
        raise SystemdError(
            f"systemd passed {listed}, which no server.listen address uses; connections "
            "to it would never be answered. Add it to server.listen or remove it from "
            "the .socket unit."
        )
    return result


# --- journal -----------------------------------------------------------------------------


def journal_field_name(name: str) -> str:
    """``name`` as a valid journal field: ``[A-Z0-9_]``, not starting with ``_`` or a digit.

    Lower case is upper-cased, other characters become ``_``, leading underscores are
    dropped (they mark fields only journald may set), a leading digit gets an ``X``
    prefix, and the result is cut to 64 characters. ``ValueError`` if nothing is left.
    """
    upper = "".join(c if c in _ASCII_FIELD_CHARS else "_" for c in name.upper())
    field = upper.lstrip("_")
    if field[:1].isdigit():
        field = "X" + field
    if not field:
        raise ValueError(f"journal field name {name!r} has no usable characters")
    return field[:_FIELD_NAME_MAX]


def _encode_entry(fields: Mapping[str, str | bytes]) -> bytes:
    parts: list[bytes] = []
    for name, value in fields.items():
        key = journal_field_name(name).encode()
        data = value.encode() if isinstance(value, str) else bytes(value)
        if b"\n" in data:
            # Binary-safe form: name, newline, little-endian 64-bit length, data, newline.
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalWriter(_SocketClient):
    """Sends structured entries to journald over its native datagram protocol.

    ``send()`` writes one entry per call. An entry too large for one datagram goes in a
    sealed memfd passed with SCM_RIGHTS, as journald requires. The socket is opened on
    first use and kept; a send failure raises ``JournalError`` (a ``SystemdError`` and an
    ``OSError``; the log sink can fall back to stderr) and the next send reconnects.

    Thread-safe. Safe in forked children: they keep the shared datagram socket (each
    datagram is atomic, and journald reads the sender's pid from the socket credentials,
    so a child's entries carry the child's ``_PID``); the lock is replaced after fork.
    """

    def __init__(
        self,
        path: str = JOURNAL_SOCKET,
        *,
        identifier: str | None = None,
        timeout: float = _SEND_TIMEOUT,
    ) -> None:
        """``path`` is configurable for tests; ``identifier`` fills ``SYSLOG_IDENTIFIER``."""
        self.path = path
        self._address = _unix_address(path, "journal socket")
        self._identifier = identifier
        self._timeout = timeout
        super().__init__()

    def send(self, fields: Mapping[str, str | bytes]) -> None:
        """Write one entry; field names are sanitised with ``journal_field_name``."""
        if self._identifier is not None and not any(
            journal_field_name(k) == "SYSLOG_IDENTIFIER" for k in fields
        ):
            fields = {**fields, "SYSLOG_IDENTIFIER": self._identifier}
        payload = _encode_entry(fields)
        with self._lock:
            try:
                self._send_locked(payload)
            except OSError as exc:
                self._close_locked()
                raise JournalError(
                    f"cannot write to the journal at {self.path}: {_strerror(exc)}"
                ) from exc

    def _send_locked(self, payload: bytes) -> None:
        if self._sock is None:
            self._sock = _connect_datagram(self._address, self._timeout)
        try:
            self._sock.send(payload)
        except OSError as exc:
            # EMSGSIZE: bigger than the socket's send buffer allows in one datagram.
            # ENOBUFS: the kernel could not allocate it. Both mean "use a memfd".
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd_locked(payload)

    def _send_memfd_locked(self, payload: bytes) -> None:
        assert self._sock is not None  # noqa: S101 -- connected by the caller
        fd = os.memfd_create("sockd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            # journald accepts a memfd only once it is sealed, i.e. can no longer change.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
            socket.send_fds(self._sock, [b""], [fd])
        finally:
            os.close(fd)


def journal_stream_matches(fds: Iterable[int] = (1, 2)) -> bool:
    """Whether one of ``fds`` is the journal stream systemd connected (``$JOURNAL_STREAM``).

    systemd sets ``JOURNAL_STREAM=<dev>:<inode>`` for ``StandardOutput=journal``. Only if
    the fd still is that stream (not redirected by a wrapper) may the daemon switch to
    the native protocol without losing output. Malformed values count as no match.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev_text, _, ino_text = value.partition(":")
    dev, ino = _decimal(dev_text), _decimal(ino_text)
    if dev is None or ino is None:
        return False
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == dev and st.st_ino == ino:
            return True
    return False
