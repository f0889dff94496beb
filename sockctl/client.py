"""A typed client for sockd's control API (docs/control-api.md): one method per endpoint.

The client owns the transport (HTTP/1.1 over a Unix stream socket, with nothing but the
standard library), the version check on every answer, and the translation of every way
a call can fail into one exception type that carries its exit status. It never prints:
``sockctl.cli`` decides what people see. Other tools (tests, deployment scripts) can use
it directly.

Answers are returned as the ``TypedDict`` shapes documented in the control API. The
client checks that each answer has its documented keys, so a daemon that drifted from
the contract fails with a one-line ``ProtocolError`` instead of a ``KeyError`` deep in
the rendering code. Values themselves are not type-checked: the daemon is trusted to
that extent.

Before a state-changing request (anything but ``GET``) the client checks who serves the
socket (``SO_PEERCRED``): root, our own uid, a uid the caller vouches for
(``trusted_uids``: sockctl passes the owner of its ``--config`` file), or the owner of
the socket's directory when root made that directory for it (every directory above is
root's and writable by nobody else, as ``/run/sockd`` under systemd's
``RuntimeDirectory=``). Anyone else may have planted the socket: ``UntrustedDaemon``
(exit 4), and nothing is sent.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import pwd
import select
import socket
import stat
import struct
import time
from collections.abc import Generator, Iterable
from typing import Any, TypeVar, cast
from urllib.parse import urlencode

from sockd import __version__
from sockd.protocol import (
    API_PREFIX,
    API_VERSION,
    API_VERSION_HEADER,
    Change,
    Closed,
    ConfigDump,
    Connection,
    ConnectionCounts,
    ConnectionList,
    ErrorCode,
    ExitCode,
    LastReload,
    LogEvent,
    LogLevelResult,
    ReloadResult,
    ReopenResult,
    Stat,
    StateResult,
    Stats,
    Status,
    StopResult,
    path_entries,
    writable_by_others,
)

__all__ = [
    "Change",
    "Closed",
    "ConfigDump",
    "Connection",
    "ConnectionCounts",
    "ConnectionList",
    "ControlClient",
    "DaemonError",
    "LastReload",
    "LogEvent",
    "LogLevelResult",
    "NoAnswer",
    "NotASocket",
    "NotRunning",
    "PermissionDenied",
    "ProtocolError",
    "ReloadResult",
    "ReopenResult",
    "SockctlError",
    "StateResult",
    "Stats",
    "Status",
    "StopResult",
    "UntrustedDaemon",
    "VersionMismatch",
    "wait_until_stopped",
]

#: A log line longer than this is not something the daemon sends; stop reading instead
#: of buffering without bound.
MAX_LOG_LINE = 1024 * 1024


# --- answers ------------------------------------------------------------------------
# The shapes are declared once, in ``sockd.protocol``, where the daemon's views are
# typed by them too; they are re-exported here for the client's callers.

_T = TypeVar("_T")


# --- errors -------------------------------------------------------------------------


class SockctlError(Exception):
    """Base of every error sockctl raises on purpose; carries the exit status it means."""

    def __init__(self, message: str, exit_code: int = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class NotRunning(SockctlError):  # noqa: N818 - named for the state it reports, like click's Abort
    """Nothing answers at the control socket: no file, nobody listening, unreachable."""

    def __init__(self, path: str, reason: str, message: str | None = None) -> None:
        super().__init__(
            message or f"sockd is not running: {reason} ({path})", ExitCode.NOT_RUNNING
        )
        self.path = path
        self.reason = reason


class NotASocket(NotRunning):
    """The control-socket path exists but is something else: a file, a directory.

    Still "cannot be reached" (exit 3), but saying "not running" would send the
    operator to check the daemon when it is the path that is wrong.
    """

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(path, f"not a socket ({kind})", f"{path} is not a socket ({kind})")
        self.kind = kind


class PermissionDenied(SockctlError):  # noqa: N818 - named for the state it reports, like click's Abort
    """The socket's file mode or the daemon's peer-credential check refused us."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.PERMISSION)


class UntrustedDaemon(PermissionDenied):
    """The socket is served by a uid we have no reason to trust with this request."""

    def __init__(self, path: str, method: str, target: str, uid: int | None) -> None:
        who = "an unknown uid" if uid is None else _who(uid)
        super().__init__(
            f"refusing to send {method} {target} to {path}: it is served by {who}, "
            "not root, you, the --config file's owner or the owner of a directory root "
            "made for the socket (another user's socket?)"
        )
        self.uid = uid


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class VersionMismatch(SockctlError):  # noqa: N818 - named for the state it reports, like click's Abort
    """The other end speaks another control-API version (or is not sockd at all)."""

    def __init__(self, path: str, theirs: str | None) -> None:
        if theirs is None:
            message = (
                f"{path} answered without an {API_VERSION_HEADER} header: "
                "not a sockd control socket?"
            )
        else:
            message = (
                f"sockd at {path} speaks control API version {theirs}, sockctl "
                f"{__version__} speaks version {API_VERSION}: use the sockctl that "
                "came with the running sockd"
            )
        super().__init__(message, ExitCode.VERSION_MISMATCH)
        self.theirs = theirs


class DaemonError(SockctlError):
    """The daemon answered with its error shape; ``invalid_config`` means exit 78."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int,
        details: dict[str, Any] | None = None,
    ) -> None:
        exit_code = ExitCode.CONFIG if code == ErrorCode.INVALID_CONFIG else ExitCode.FAILURE
        super().__init__(message, exit_code)
        self.code = code
        self.status = status
        self.details = details or {}

    @property
    def errors(self) -> list[str]:
        """Every problem of a rejected reload (``details.errors``), empty otherwise."""
        errors = self.details.get("errors")
        if isinstance(errors, list):
            return [str(e) for e in errors]
        return []

    def as_json(self) -> dict[str, Any]:
        """The daemon's error object, as ``--json`` prints it."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class ProtocolError(SockctlError):
    """The answer is not the HTTP/JSON the control API promises."""


class NoAnswer(SockctlError):  # noqa: N818 - named for the state it reports, like click's Abort
    """The daemon accepted the connection but did not answer in time (hung or very busy)."""


# --- transport ----------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """``HTTPConnection`` whose transport is a Unix stream socket instead of TCP.

    Only ``connect`` changes: http.client does the request framing, chunked decoding
    and header parsing. ``peer_pid`` is the daemon's pid as the kernel reports it
    (``SO_PEERCRED``, already translated into our pid namespace), which is what
    ``stop --wait`` waits on.
    """

    def __init__(self, path: str, timeout: float) -> None:
        # The host only fills the Host header; the daemon ignores it.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path
        self.unix_sock: socket.socket | None = None
        self.peer_pid: int | None = None
        self.peer_uid: int | None = None

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _connect_waiting(sock, self.socket_path, self.timeout)
            sock.settimeout(self.timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        # http.client drops ``self.sock`` once the response says ``Connection: close``
        # (every control answer does), while the response goes on reading from this
        # socket: whoever must change its timeout later (a log follow) uses this.
        self.unix_sock = sock
        self.peer_pid, self.peer_uid = _peer_cred(sock)


def _connect_waiting(sock: socket.socket, path: str, timeout: float | None) -> None:
    """Connect, waiting up to ``timeout`` seconds for room in a full listen backlog.

    ``settimeout`` would make the connect non-blocking, and a Unix socket whose backlog
    is full then fails at once with ``EAGAIN``: a daemon busy for an instant (or flooded
    by other users' connections) would look like one that is not running. A blocking
    connect sleeps in the kernel until the daemon accepts and there is room, bounded by
    ``SO_SNDTIMEO``; past that it fails with ``EAGAIN``, which ``_connect_error`` reports
    as a daemon that did not answer (exit 1), never as "not running" (exit 3).
    """
    bounded = isinstance(timeout, int | float) and timeout > 0
    if bounded and timeout is not None:
        seconds = int(timeout)
        # A zero timeval would mean "wait for ever": at least one microsecond.
        micros = max(int((timeout - seconds) * 1_000_000), 0 if seconds else 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", seconds, micros))
    sock.settimeout(None)  # blocking: what makes the kernel wait for room
    sock.connect(path)
    if bounded:  # from here on the socket's own timeout (settimeout) bounds every wait
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", 0, 0))


def _peer_cred(sock: socket.socket) -> tuple[int | None, int | None]:
    """The pid and uid of the process at the other end, None where the OS cannot say."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    # pid 0: the peer lives in a pid namespace we cannot see
    return pid or None, uid


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end, or None where the OS cannot say."""
    return _peer_cred(sock)[0]


def directory_owner_vouched_by_root(path: str) -> int | None:
    """The owner of ``path``'s directory if root made that directory for it, else None.

    That is: every directory and symlink above it belongs to root and no directory
    there is writable by anyone else (no sticky exception: in ``/tmp`` anyone could
    have created the directory), the directory itself is writable by nobody but its
    owner, and ``path`` is not a symlink. Then only root chose who owns the directory
    (``/run/sockd`` made by systemd for ``User=sockd``), so only that owner or root
    can have put the socket there.
    """
    try:
        entries, complete = path_entries(path)
        final = os.lstat(path)
    except OSError:
        return None
    if not complete or stat.S_ISLNK(final.st_mode):
        return None
    *above, own = entries
    for entry in above:
        if entry.info.st_uid != 0 or (not entry.is_link and writable_by_others(entry.info)):
            return None
    if own.is_link or writable_by_others(own.info):
        return None
    return own.info.st_uid


def _connect_error(path: str, exc: OSError, timeout: float | None = None) -> SockctlError:
    """Name what went wrong reaching the socket, always with the path tried."""
    if isinstance(exc, PermissionError):
        return PermissionDenied(
            f"permission denied connecting to {path} (sockctl needs root, the daemon's "
            "user, or membership of the socket's group)"
        )
    if isinstance(exc, FileNotFoundError):
        return NotRunning(path, "no control socket")
    if isinstance(exc, ConnectionRefusedError):
        # Linux refuses a connect() to a file, directory or FIFO the same way it refuses
        # one to a socket nobody listens on: only the file's type tells them apart.
        kind = _not_a_socket(path)
        if kind is not None:
            return NotASocket(path, kind)
        return NotRunning(path, "nothing is listening on the control socket")
    if isinstance(exc, TimeoutError | BlockingIOError) or exc.errno == errno.EAGAIN:
        # A listener whose backlog stayed full for the whole timeout: sockd is there
        # (busy, or flooded by other clients' connections), it just did not take ours.
        within = f" within {timeout:g}s" if timeout else " in time"
        return NoAnswer(
            f"sockd at {path} did not answer: its control socket accepted no connection"
            f"{within} (busy, or flooded with connections by other clients)"
        )
    reason = exc.strerror or str(exc)
    return NotRunning(path, f"cannot connect: {reason}")


_FILE_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_a_socket(path: str) -> str | None:
    """What ``path`` is when it exists and is not a socket (``a directory``), else None."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks, as connect() does
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    return next((kind for is_kind, kind in _FILE_KINDS if is_kind(mode)), "another kind of file")


def _decode_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        snippet = data[:60].decode("utf-8", "replace")
        raise ProtocolError(f"{what}: the answer is not JSON: {snippet!r}") from None


def _shaped(body: Any, kind: type[_T], what: str) -> _T:
    """Check ``body`` is an object with every key the contract's ``kind`` requires."""
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(body).__name__}")
    required: frozenset[str] = getattr(kind, "__required_keys__", frozenset())
    missing = sorted(required - body.keys())
    if missing:
        raise ProtocolError(f"{what}: the answer lacks {', '.join(missing)}")
    return cast(_T, body)


def _shaped_items(body: Any, kind: type[_T], key: str, item: type[Any], what: str) -> _T:
    """``_shaped``, and each element of the list under ``key`` shaped as ``item``."""
    answer = _shaped(body, kind, what)
    items = cast(dict[str, Any], answer)[key]
    if not isinstance(items, list):
        raise ProtocolError(f"{what}: expected a list under {key!r}")
    for element in items:
        _shaped(element, item, what)
    return answer


class ControlClient:
    """One method per control endpoint; each opens a connection, asks, and closes it.

    Every method raises a ``SockctlError`` subclass on failure, never ``OSError`` or
    an http.client exception: callers only need ``exc.message`` and ``exc.exit_code``.
    """

    def __init__(
        self, path: str, timeout: float = 30.0, *, trusted_uids: Iterable[int] = ()
    ) -> None:
        self.path = path
        self.timeout = timeout
        #: Besides root and our own uid, daemons running as these may get state changes.
        self.trusted_uids = frozenset(trusted_uids)
        #: The daemon's pid from the last connection's peer credentials, if known.
        self.peer_pid: int | None = None

    # --- endpoints ---

    def status(self) -> Status:
        """``GET /v1/status``; also checks the API version the body reports."""
        status = _shaped(self._call("GET", "/status"), Status, "status")
        if status["api_version"] != API_VERSION:
            raise VersionMismatch(self.path, str(status["api_version"]))
        return status

    def connections(self) -> ConnectionList:
        """``GET /v1/connections``."""
        answer = self._call("GET", "/connections")
        return _shaped_items(answer, ConnectionList, "connections", Connection, "connections")

    def close_connection(self, connection_id: int) -> Closed:
        """``DELETE /v1/connections/{id}``."""
        return _shaped(self._call("DELETE", f"/connections/{connection_id}"), Closed, "kick")

    def config(self) -> ConfigDump:
        """``GET /v1/config``: the effective configuration."""
        return _shaped(self._call("GET", "/config"), ConfigDump, "config")

    def reload(self, dry_run: bool = False) -> ReloadResult:
        """``POST /v1/reload``; a rejected config raises ``DaemonError`` (exit 78).

        ``dry_run``: the daemon validates its config file and answers what would change
        (``result: "valid"``), applying nothing.
        """
        body = {"dry_run": True} if dry_run else None
        return _shaped(self._call("POST", "/reload", body), ReloadResult, "reload")

    def stop(self, timeout: float | None = None) -> StopResult:
        """``POST /v1/stop``; answered before the daemon exits (see ``wait_until_stopped``)."""
        body = None if timeout is None else {"timeout": timeout}
        return _shaped(self._call("POST", "/stop", body), StopResult, "stop")

    def pause(self) -> StateResult:
        """``POST /v1/pause``: stop accepting new connections."""
        return _shaped(self._call("POST", "/pause"), StateResult, "pause")

    def resume(self) -> StateResult:
        """``POST /v1/resume``: accept new connections again."""
        return _shaped(self._call("POST", "/resume"), StateResult, "resume")

    def set_log_level(self, level: str) -> LogLevelResult:
        """``PUT /v1/log-level``."""
        answer = self._call("PUT", "/log-level", {"level": level})
        return _shaped(answer, LogLevelResult, "log-level")

    def reopen_logs(self) -> ReopenResult:
        """``POST /v1/reopen-logs``."""
        return _shaped(self._call("POST", "/reopen-logs"), ReopenResult, "reopen-logs")

    def stats(self) -> Stats:
        """``GET /v1/stats``: every metric of ``GET /metrics`` with its samples, as JSON."""
        return _shaped_items(self._call("GET", "/stats"), Stats, "metrics", Stat, "stats")

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text exposition format, as text."""
        with self._exchange("GET", "/metrics") as (_conn, response):
            data = self._read_body(response)
        return data.decode("utf-8", "replace")

    def logs(
        self, n: int = 100, level: str = "debug", follow: bool = False
    ) -> Generator[LogEvent, None, None]:
        """``GET /v1/logs``: yield each NDJSON event as soon as its line arrives.

        With ``follow`` the stream has no end and, once the answer's head is in, no read
        timeout: a quiet daemon is not a hung one (``journalctl -f`` waits the same
        way). The stream ends when the daemon ends it (its last chunk: it is
        stopping) or dies: the kernel closes a dead process's sockets, and forked
        children close their copies, so a killed daemon is an end of file
        (``ProtocolError``, the stream broke off) without any heartbeat. Closing the
        generator closes the connection, which is how the daemon learns we went away.
        """
        query: dict[str, str | int] = {"n": n, "level": level}
        if follow:
            query["follow"] = 1
        with self._exchange("GET", f"{API_PREFIX}/logs?{urlencode(query)}") as (conn, response):
            if follow and conn.unix_sock is not None:
                # Not ``conn.sock``: http.client has already set it to None (see
                # ``UnixHTTPConnection.connect``), which left the timeout in force.
                conn.unix_sock.settimeout(None)
            yield from self._lines(response)

    # --- plumbing ---

    def _call(
        self,
        method: str,
        endpoint: str,
        body: Any = None,
    ) -> Any:
        """Send one request under ``/v1`` and return the decoded JSON body."""
        with self._exchange(method, API_PREFIX + endpoint, body) as (
            _conn,
            response,
        ):
            data = self._read_body(response)
        return _decode_json(data, f"{method} {API_PREFIX}{endpoint}")

    @contextlib.contextmanager
    def _exchange(
        self,
        method: str,
        target: str,
        body: Any = None,
    ) -> Generator[tuple[UnixHTTPConnection, http.client.HTTPResponse], None, None]:
        """Connect, send, check the version header and the status; always close.

        Error statuses are raised here, so callers only ever see a successful answer.
        A state change (not ``GET``) is sent only to a daemon trusted with it.
        """
        conn = UnixHTTPConnection(self.path, self.timeout)
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise _connect_error(self.path, exc, self.timeout) from None
            self.peer_pid = conn.peer_pid
            if method != "GET":
                self._check_daemon(conn.peer_uid, method, target)
            headers = {"Accept": "application/json", "User-Agent": f"sockctl/{__version__}"}
            payload = None
            if body is not None:
                payload = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            elif method != "GET":
                # Say "no body" outright: the daemon answers a POST, PUT or DELETE
                # without Content-Length with 411 (it never guesses whether one follows).
                headers["Content-Length"] = "0"
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    # The daemon may answer and close before reading a request it
                    # refuses (at accept: credentials, busy): its answer is still there.
                    conn.request(method, target, body=payload, headers=headers)
                response = conn.getresponse()
            except TimeoutError:
                raise NoAnswer(
                    f"sockd at {self.path} did not answer within {self.timeout:g}s"
                ) from None
            except (http.client.HTTPException, OSError) as exc:
                raise ProtocolError(
                    f"no valid answer from {self.path}: {_describe_exc(exc)}"
                ) from None
            self._check_version(response)
            if response.status >= 400:
                raise self._error(response)
            yield conn, response
        finally:
            conn.close()

    def _check_daemon(self, uid: int | None, method: str, target: str) -> None:
        """Refuse to send a state change to a socket another user may have planted."""
        if uid is not None and (
            uid in (0, os.geteuid())
            or uid in self.trusted_uids
            or uid == directory_owner_vouched_by_root(self.path)
        ):
            return
        raise UntrustedDaemon(self.path, method, target, uid)

    def _check_version(self, response: http.client.HTTPResponse) -> None:
        theirs = response.getheader(API_VERSION_HEADER)
        if theirs is None or theirs.strip() != str(API_VERSION):
            raise VersionMismatch(self.path, None if theirs is None else theirs.strip())

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        try:
            return response.read()
        except TimeoutError:
            raise NoAnswer(f"sockd at {self.path} stopped answering mid-way") from None
        except (http.client.HTTPException, OSError) as exc:
            raise ProtocolError(
                f"incomplete answer from {self.path}: {_describe_exc(exc)}"
            ) from None

    def _error(self, response: http.client.HTTPResponse) -> SockctlError:
        """Turn an error answer into its exception (403 always means permission)."""
        data = self._read_body(response)
        what = f"HTTP {response.status}"
        try:
            error = _decode_json(data, what)["error"]
            code, message = error["code"], error["message"]
            details = error.get("details")
        except (ProtocolError, KeyError, TypeError, AttributeError):
            raise ProtocolError(
                f"{what} from {self.path} without the control API's error object"
            ) from None
        if response.status == 403 or code == ErrorCode.FORBIDDEN:
            return PermissionDenied(f"permission denied by sockd: {message}")
        return DaemonError(
            str(code),
            str(message),
            response.status,
            details if isinstance(details, dict) else None,
        )

    def _lines(self, response: http.client.HTTPResponse) -> Generator[LogEvent, None, None]:
        """Split the (chunked) body into NDJSON events as bytes arrive."""
        pending = b""
        while True:
            try:
                data = response.read1(65536)
            except TimeoutError:
                raise NoAnswer(f"sockd at {self.path} stopped sending logs") from None
            except (http.client.HTTPException, OSError) as exc:
                raise ProtocolError(
                    f"the log stream from {self.path} broke off: {_describe_exc(exc)}"
                ) from None
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield _event(line)
            if len(pending) > MAX_LOG_LINE:
                raise ProtocolError(f"logs: a line longer than {MAX_LOG_LINE} bytes")
        if pending.strip():
            yield _event(pending)


def _event(line: bytes) -> LogEvent:
    event = _decode_json(line, "logs")
    if not isinstance(event, dict):
        raise ProtocolError(f"logs: expected one JSON object per line, got {line[:60]!r}")
    return event


def _describe_exc(exc: BaseException) -> str:
    """A short reason for transport errors, whose ``str()`` is often empty."""
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed mid-answer"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer"
    if isinstance(exc, http.client.BadStatusLine):
        return "not an HTTP answer"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _answers(path: str) -> bool:
    """Whether something still accepts connections on the control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError as exc:
            # A full backlog (EAGAIN) or a slow accept is a daemon still there.
            return exc.errno in (errno.EAGAIN, errno.ETIMEDOUT) or isinstance(exc, TimeoutError)
    return True


def wait_until_stopped(path: str, pid: int | None, timeout: float) -> bool:
    """Wait until the daemon is gone; False if it is still there after ``timeout`` s.

    Gone means its process has exited when we know its pid (a pidfd becomes readable
    at exit: no polling, no pid-reuse race), else that its control socket no longer
    accepts connections (checked every 50 ms).
    """
    deadline = time.monotonic() + timeout
    pidfd: int | None = None
    # Waiting on our own pid (an in-process server, as in tests) could only time out.
    if pid is not None and pid != os.getpid() and hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        except OSError:
            pidfd = None  # kernel without pidfds, or not allowed: use the socket
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            remaining = max(0.0, deadline - time.monotonic())
            return bool(poller.poll(remaining * 1000))
        finally:
            os.close(pidfd)
    while _answers(path):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(remaining, 0.05))
    return True
