"""The control channel's HTTP surface: a real ``ControlServer`` on a real Unix socket.

The backend is a small in-test fake: this layer's contract is the wire (paths, statuses,
codes, JSON shapes, headers, access control, robustness), which ``sockctl`` relies on.
Clients are raw sockets (so malformed input is possible), ``curl --unix-socket`` and,
for access control, a client process running as an unprivileged uid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import queue
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockd import control
from sockd.config import ControlConfig
from sockd.control import (
    BackendConflict,
    BackendUnavailable,
    ControlServer,
    Peer,
    ReloadOutcome,
)
from sockd.errors import ControlError
from sockd.protocol import API_VERSION, API_VERSION_HEADER, MAX_REQUEST_BODY
from tests.conftest import require_reachable_by_others, system_group

DEADLINE = 10.0
CTL_GROUP = "sockd-test-ctl"
READ_GROUP = "sockd-test-read"

STATUS = {
    "api_version": 1,
    "pid": 4242,
    "version": "0.1.0",
    "state": "running",
    "started_at": "2026-11-27T10:00:00.000000Z",
    "uptime_s": 12.5,
    "mode": "threading",
    "handler": "sockd.handlers:EchoHandler",
    "listen": ["127.0.0.1:9000"],
    "config_path": "/etc/sockd/sockd.toml",
    "generation": 1,
    "log_level": "info",
    "connections": {"active": 3, "total": 120, "refused": 0},
    "last_reload": None,
}
CONNECTIONS: list[dict[str, Any]] = [
    {
        "id": 17,
        "peer": "127.0.0.1:51234",
        "listen": "127.0.0.1:9000",
        "started_at": "2026-11-27T10:00:01.000000Z",
        "age_s": 3.2,
        "bytes_in": 120,
        "bytes_out": 120,
        "pid": None,
    }
]
CONFIG = {"path": "/etc/sockd/sockd.toml", "generation": 1, "config": {"server": {}}}
HISTORY: list[dict[str, Any]] = [
    {"event": "server.listening", "level": "info", "address": "127.0.0.1:9000"},
    {"event": "conn.open", "level": "debug", "conn_id": 17},
]


# --------------------------------------------------------------------------- doubles


class RecordingLog:
    """A structlog-compatible logger that keeps events and lets tests wait for one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def _record(self, level: str, event: str, **fields: Any) -> None:
        with self._cond:
            self.events.append({"event": event, "log_level": level, **fields})
            self._cond.notify_all()

    def debug(self, event: str, **fields: Any) -> None:
        self._record("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._record("error", event, exc_info=traceback.format_exc(), **fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["event"] == event]

    def wait_for(self, event: str, timeout: float = DEADLINE, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {event} {match} within {timeout}s: {self.events}")
                self._cond.wait(remaining)


STATS: dict[str, Any] = {
    "metrics": [
        {
            "name": "sockd_connections_open",
            "kind": "gauge",
            "help": "Connections open now.",
            "samples": [{"labels": {}, "value": 3}],
        }
    ]
}


class FakeSubscription:
    """A log subscription fed by the test through ``publish``."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closed = threading.Event()

    def read(self, timeout: float) -> list[bytes]:
        try:
            event = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return []
        return [json.dumps(event).encode() + b"\n"]

    def close(self) -> None:
        self.closed.set()


class FakeBackend:
    """Canned answers, a call record, and per-method exceptions set by a test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, BaseException] = {}
        self.reload_outcome = ReloadOutcome(
            applied=True,
            generation=2,
            changes=[{"key": "logging.level", "old": "info", "new": "debug"}],
            errors=[],
        )
        self.subscriptions: list[FakeSubscription] = []

    def _enter(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise self.fail[name]

    def called(self, name: str) -> list[Any]:
        return [arg for call, arg in self.calls if call == name]

    def status(self) -> dict[str, Any]:
        self._enter("status")
        return dict(STATUS)

    def connections(self) -> list[dict[str, Any]]:
        self._enter("connections")
        return list(CONNECTIONS)

    def close_connection(self, conn_id: int) -> bool:
        self._enter("close_connection", conn_id)
        return conn_id == 17

    def effective_config(self) -> dict[str, Any]:
        self._enter("effective_config")
        return dict(CONFIG)

    def reload(self) -> ReloadOutcome:
        self._enter("reload")
        return self.reload_outcome

    def reload_check(self) -> ReloadOutcome:
        self._enter("reload_check")
        return self.reload_outcome

    def stop(self, timeout: float | None) -> dict[str, Any]:
        self._enter("stop", timeout)
        return {"state": "draining", "timeout": timeout, "active": 3}

    def pause(self) -> dict[str, Any]:
        self._enter("pause")
        return {"state": "paused"}

    def resume(self) -> dict[str, Any]:
        self._enter("resume")
        return {"state": "running"}

    def set_log_level(self, level: str) -> dict[str, Any]:
        self._enter("set_log_level", level)
        return {"level": level, "previous": "info"}

    def reopen_logs(self) -> dict[str, Any]:
        self._enter("reopen_logs")
        return {"reopened": True, "output": "/var/log/sockd/sockd.log"}

    def metrics_text(self) -> str:
        self._enter("metrics_text")
        return "# TYPE sockd_connections_open gauge\nsockd_connections_open 3\n"

    def stats(self) -> dict[str, Any]:
        self._enter("stats")
        return STATS

    def log_history(self, n: int, min_level: str) -> list[dict[str, Any]]:
        self._enter("log_history", (n, min_level))
        return list(HISTORY[-n:]) if n else []

    def log_subscribe(self, min_level: str) -> FakeSubscription:
        self._enter("log_subscribe", min_level)
        subscription = FakeSubscription(min_level)
        self.subscriptions.append(subscription)
        return subscription


# --------------------------------------------------------------------------- wire client


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    interim: list[int]

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return str(self.json["error"]["code"])


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


def parse_reply(data: bytes) -> Reply:
    interim: list[int] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response: {data!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status != 100:
            break
        interim.append(status)
        data = rest
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(rest)
    else:
        body = rest
        assert len(body) == int(headers["content-length"]), headers
    return Reply(status, headers, body, interim)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def connect(path: str, timeout: float = DEADLINE) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def exchange(path: str, raw: bytes, timeout: float = DEADLINE) -> Reply:
    with connect(path, timeout) as sock:
        sock.sendall(raw)
        return parse_reply(read_all(sock))


def build(
    method: str, target: str, body: bytes | dict[str, Any] | None = None, headers: str = ""
) -> bytes:
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{headers}"
    if payload is not None:
        head += f"Content-Length: {len(payload)}\r\n"
    elif method in ("POST", "PUT", "DELETE") and not re.search(
        r"^(content-length|transfer-encoding):", headers, re.IGNORECASE | re.MULTILINE
    ):
        head += "Content-Length: 0\r\n"  # required, even for no body (else 411)
    return head.encode() + b"\r\n" + (payload or b"")


def call(path: str, method: str, target: str, body: bytes | dict[str, Any] | None = None) -> Reply:
    return exchange(path, build(method, target, body))


def assert_common_headers(reply: Reply, content_type: str = "application/json") -> None:
    assert reply.headers[API_VERSION_HEADER.lower()] == str(API_VERSION)
    assert reply.headers["content-type"] == content_type
    assert reply.headers["connection"] == "close"


def assert_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply
    assert_common_headers(reply)
    error = reply.json["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert b"Traceback" not in reply.body


# --------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Harness:
    server: ControlServer
    backend: FakeBackend
    log: RecordingLog

    @property
    def path(self) -> str:
        return self.server.path


def control_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sockd-control")]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll an observable condition with a deadline (for state with no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.01)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for sockets (AF_UNIX paths are limited to about 108 bytes)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="sd")
    # The unprivileged clients below must be able to traverse it.
    os.chmod(path, 0o755)  # noqa: S103 -- world-traversable on purpose, see above
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_settings(path: str, **overrides: Any) -> ControlConfig:
    base = ControlConfig(socket=path, mode=0o660, group=None, read_group=None, request_timeout=5.0)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def make_server(sockdir: str) -> Iterator[Callable[..., Harness]]:
    """Start ControlServers on ``sockdir/c.sock``; close them all and check no thread leaks."""
    started: list[ControlServer] = []

    def make(**overrides: Any) -> Harness:
        path = overrides.pop("socket", os.path.join(sockdir, "c.sock"))
        backend, log = FakeBackend(), RecordingLog()
        server = ControlServer(make_settings(path, **overrides), backend, log)
        server.start()
        started.append(server)
        return Harness(server, backend, log)

    yield make
    for server in started:
        server.close()
    wait_until(lambda: not control_threads(), "control threads to end")


@pytest.fixture
def ctl(make_server: Callable[..., Harness]) -> Harness:
    """A started control server with default settings."""
    return make_server()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates groups and runs clients as another uid")


@pytest.fixture(scope="module")
def test_groups() -> Iterator[dict[str, int]]:
    """The two test groups (created with groupadd if absent, removed afterwards) by name."""
    require_root()
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(system_group(name)) for name in (CTL_GROUP, READ_GROUP)}


@pytest.fixture(scope="module")
def nobody() -> pwd.struct_passwd:
    """The unprivileged ``nobody`` account, used as a foreign control client."""
    require_root()
    require_reachable_by_others(CLIENT_PYTHON)
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")


CLIENT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
try:
    sock.sendall(sys.argv[2].encode("latin-1"))
except (BrokenPipeError, ConnectionResetError):
    pass  # refused at accept (credentials, budget): the answer waits to be read, as sockctl does
chunks = []
while True:
    try:
        chunk = sock.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    chunks.append(chunk)
sys.stdout.buffer.write(b"".join(chunks))
"""

#: The interpreter behind the venv's symlink: CLIENT needs only the standard library,
#: so it runs wherever the checkout lives, even where other users cannot reach it.
CLIENT_PYTHON = Path(os.path.realpath(sys.executable))


def exchange_as(
    uid: int, gid: int, extra_groups: list[int], path: str, raw: bytes
) -> tuple[Reply, int]:
    """Send ``raw`` from a child process running as ``uid``/``gid``; the reply and its pid."""
    with subprocess.Popen(
        [str(CLIENT_PYTHON), "-I", "-c", CLIENT, path, raw.decode("latin-1")],
        user=uid,
        group=gid,
        extra_groups=extra_groups,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    ) as proc:
        out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err.decode()
    return parse_reply(out), proc.pid


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(DEADLINE), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE + 5,
        check=False,
    )


# --------------------------------------------------------------------------- endpoints


def test_status_answers_backend_status_with_common_headers(ctl: Harness) -> None:
    """GET /v1/status returns the backend's status as JSON with the API version header."""
    reply = call(ctl.path, "GET", "/v1/status")
    assert reply.status == 200
    assert_common_headers(reply)
    assert reply.json == STATUS


def test_connections_are_wrapped_in_an_object(ctl: Harness) -> None:
    """GET /v1/connections returns {"connections": [...]}."""
    reply = call(ctl.path, "GET", "/v1/connections")
    assert reply.status == 200
    assert reply.json == {"connections": CONNECTIONS}


def test_delete_connection_closes_it(ctl: Harness) -> None:
    """DELETE /v1/connections/17 asks the backend to close 17 and answers {"closed": 17}."""
    reply = call(ctl.path, "DELETE", "/v1/connections/17")
    assert reply.status == 200
    assert reply.json == {"closed": 17}
    assert ctl.backend.called("close_connection") == [17]


def test_delete_unknown_connection_is_not_found(ctl: Harness) -> None:
    """Deleting a connection id the backend does not know answers 404 not_found."""
    assert_error(call(ctl.path, "DELETE", "/v1/connections/99"), 404, "not_found")


def test_delete_connection_with_non_numeric_id_is_bad_request(ctl: Harness) -> None:
    """A connection id that is not a non-negative integer answers 400 bad_request."""
    assert_error(call(ctl.path, "DELETE", "/v1/connections/abc"), 400, "bad_request")
    assert_error(call(ctl.path, "DELETE", "/v1/connections/-1"), 400, "bad_request")
    assert ctl.backend.called("close_connection") == []


def test_config_answers_effective_config(ctl: Harness) -> None:
    """GET /v1/config returns the backend's effective config body unchanged."""
    reply = call(ctl.path, "GET", "/v1/config")
    assert reply.status == 200
    assert reply.json == CONFIG


def test_reload_applied(ctl: Harness) -> None:
    """An applied reload answers 200 with result, generation and changes."""
    reply = call(ctl.path, "POST", "/v1/reload")
    assert reply.status == 200
    assert reply.json == {
        "result": "applied",
        "generation": 2,
        "changes": [{"key": "logging.level", "old": "info", "new": "debug"}],
    }


def test_reload_rejected_lists_every_error(ctl: Harness) -> None:
    """A rejected reload answers 422 invalid_config with details.errors."""
    errors = ["server.mode: expected ...", "logging.level: expected ..."]
    ctl.backend.reload_outcome = ReloadOutcome(False, 1, [], errors)
    reply = call(ctl.path, "POST", "/v1/reload")
    assert_error(reply, 422, "invalid_config")
    assert reply.json["error"]["details"] == {"errors": errors}


def test_reload_already_running_is_a_conflict(ctl: Harness) -> None:
    """A BackendConflict from reload answers 409 conflict with the backend's message."""
    ctl.backend.fail["reload"] = BackendConflict("a reload is already running")
    reply = call(ctl.path, "POST", "/v1/reload")
    assert_error(reply, 409, "conflict")
    assert reply.json["error"]["message"] == "a reload is already running"


def test_stop_without_body_is_accepted(ctl: Harness) -> None:
    """POST /v1/stop with no body answers 202 with the backend's body and timeout None."""
    reply = call(ctl.path, "POST", "/v1/stop")
    assert reply.status == 202
    assert reply.json == {"state": "draining", "timeout": None, "active": 3}
    assert ctl.backend.called("stop") == [None]


def test_stop_passes_the_timeout_as_float(ctl: Harness) -> None:
    """POST /v1/stop {"timeout": 5} hands 5.0 seconds to the backend."""
    reply = call(ctl.path, "POST", "/v1/stop", {"timeout": 5})
    assert reply.status == 202
    assert reply.json["timeout"] == 5.0
    assert ctl.backend.called("stop") == [5.0]


@pytest.mark.parametrize(
    "body",
    [{"timeout": "soon"}, {"timeout": True}, {"timeout": -1}, {"timeout": [1]}, {"grace": 5}],
)
def test_stop_with_wrong_types_is_bad_request(ctl: Harness, body: dict[str, Any]) -> None:
    """A stop timeout that is not a non-negative number, or an unknown field, answers 400."""
    assert_error(call(ctl.path, "POST", "/v1/stop", body), 400, "bad_request")
    assert ctl.backend.called("stop") == []


def test_stop_while_unavailable(ctl: Harness) -> None:
    """A BackendUnavailable answers 503 unavailable."""
    ctl.backend.fail["stop"] = BackendUnavailable("the daemon is stopping")
    assert_error(call(ctl.path, "POST", "/v1/stop"), 503, "unavailable")


def test_pause_and_resume(ctl: Harness) -> None:
    """POST /v1/pause and /v1/resume answer the backend's state."""
    assert call(ctl.path, "POST", "/v1/pause").json == {"state": "paused"}
    assert call(ctl.path, "POST", "/v1/resume").json == {"state": "running"}


def test_pause_while_draining_is_a_conflict(ctl: Harness) -> None:
    """A pause the backend refuses answers 409 conflict."""
    ctl.backend.fail["pause"] = BackendConflict("cannot pause while draining")
    assert_error(call(ctl.path, "POST", "/v1/pause"), 409, "conflict")


def test_log_level_is_set(ctl: Harness) -> None:
    """PUT /v1/log-level {"level": "debug"} answers level and previous."""
    reply = call(ctl.path, "PUT", "/v1/log-level", {"level": "debug"})
    assert reply.status == 200
    assert reply.json == {"level": "debug", "previous": "info"}
    assert ctl.backend.called("set_log_level") == ["debug"]


@pytest.mark.parametrize(
    "body",
    [{}, {"level": 3}, {"level": "loud"}, {"level": "DEBUG"}, {"level": "info", "extra": 1}],
)
def test_log_level_with_wrong_types_is_bad_request(ctl: Harness, body: dict[str, Any]) -> None:
    """A missing, mistyped or unknown log level (or an unknown field) answers 400."""
    assert_error(call(ctl.path, "PUT", "/v1/log-level", body), 400, "bad_request")
    assert ctl.backend.called("set_log_level") == []


def test_reopen_logs(ctl: Harness) -> None:
    """POST /v1/reopen-logs answers the backend's body."""
    reply = call(ctl.path, "POST", "/v1/reopen-logs")
    assert reply.status == 200
    assert reply.json == {"reopened": True, "output": "/var/log/sockd/sockd.log"}


def test_metrics_are_prometheus_text(ctl: Harness) -> None:
    """GET /metrics answers the rendered exposition as text/plain version 0.0.4."""
    reply = call(ctl.path, "GET", "/metrics")
    assert reply.status == 200
    assert_common_headers(reply, "text/plain; version=0.0.4; charset=utf-8")
    assert reply.body == b"# TYPE sockd_connections_open gauge\nsockd_connections_open 3\n"


def test_stats_are_json(ctl: Harness) -> None:
    """GET /v1/stats answers the backend's stats as JSON."""
    reply = call(ctl.path, "GET", "/v1/stats")
    assert reply.status == 200
    assert_common_headers(reply, "application/json")
    assert reply.json == STATS
    assert ctl.backend.called("stats") == [None]


def test_logs_history_is_chunked_ndjson(ctl: Harness) -> None:
    """GET /v1/logs?n=2&level=info streams the history as chunked NDJSON and ends."""
    reply = call(ctl.path, "GET", "/v1/logs?n=2&level=info")
    assert reply.status == 200
    assert_common_headers(reply, "application/x-ndjson")
    assert reply.headers["transfer-encoding"] == "chunked"
    assert [json.loads(line) for line in reply.body.splitlines()] == HISTORY
    assert ctl.backend.called("log_history") == [(2, "info")]
    assert ctl.backend.called("log_subscribe") == []


def test_logs_defaults(ctl: Harness) -> None:
    """Without query parameters the history is the last 100 events at debug and up."""
    assert call(ctl.path, "GET", "/v1/logs").status == 200
    assert ctl.backend.called("log_history") == [(100, "debug")]


@pytest.mark.parametrize(
    "query",
    ["n=-1", "n=abc", "n=100001", "n=", "level=loud", "follow=maybe", "bogus=1", "n=1&n=2"],
)
def test_logs_bad_query_is_bad_request(ctl: Harness, query: str) -> None:
    """Out-of-range n, unknown level or follow value, unknown or repeated parameters: 400."""
    assert_error(call(ctl.path, "GET", f"/v1/logs?{query}"), 400, "bad_request")
    assert ctl.backend.called("log_history") == []


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a response head; return it and whatever body bytes came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the head ended: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_chunk(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes]:
    """Read one chunk of a chunked body; return its payload and the bytes after it."""
    data = buffered
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if sep:
            size = int(size_line, 16)
            if len(rest) >= size + 2:
                return rest[:size], rest[size + 2 :]
        chunk = sock.recv(65536)
        assert chunk, f"stream closed: {data!r}"
        data += chunk


def test_logs_follow_delivers_new_events_and_ends_when_client_leaves(ctl: Harness) -> None:
    """With follow=1 an event published after the request started arrives; leaving ends it."""
    sock = connect(ctl.path)
    with sock:
        sock.sendall(build("GET", "/v1/logs?n=1&level=info&follow=true"))
        head, rest = read_head(sock)
        assert b" 200 " in head.split(b"\r\n")[0]
        history, rest = read_chunk(sock, rest)
        assert json.loads(history) == HISTORY[-1]
        (subscription,) = ctl.backend.subscriptions
        assert subscription.level == "info"
        subscription.events.put({"event": "conn.close", "level": "info", "conn_id": 18})
        payload, rest = read_chunk(sock, rest)
        assert json.loads(payload) == {"event": "conn.close", "level": "info", "conn_id": 18}
    assert subscription.closed.wait(DEADLINE), "the subscription was not closed"
    wait_until(lambda: ctl.server.active_connections == 0, "the stream's thread to end")


def test_logs_follow_ends_cleanly_when_the_server_closes(ctl: Harness) -> None:
    """Closing the server ends a follow stream with the final chunk and closes the feed."""
    with connect(ctl.path) as sock:
        sock.sendall(build("GET", "/v1/logs?n=0&follow=1"))
        _, rest = read_head(sock)
        ctl.server.close()
        assert rest + read_all(sock) == b"0\r\n\r\n"
    assert ctl.backend.subscriptions[0].closed.is_set()


def test_non_get_requests_are_logged(ctl: Harness) -> None:
    """Every state-changing request is logged as control.request with who, what and status."""
    call(ctl.path, "POST", "/v1/pause")
    event = ctl.log.wait_for("control.request", method="POST")
    assert event["log_level"] == "info"
    assert event["uid"] == os.geteuid()
    assert event["pid"] == os.getpid()
    assert event["path"] == "/v1/pause"
    assert event["status"] == 200


def test_unexpected_backend_error_is_internal_without_traceback(ctl: Harness) -> None:
    """A backend bug answers 500 internal with no detail; the traceback goes to control.error."""
    ctl.backend.fail["status"] = RuntimeError("secret detail")
    reply = call(ctl.path, "GET", "/v1/status")
    assert_error(reply, 500, "internal")
    assert b"secret" not in reply.body
    event = ctl.log.wait_for("control.error")
    assert "RuntimeError: secret detail" in event["exc_info"]
    assert event["path"] == "/v1/status"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"\r\n\r\n",
        b"GET /v1/status HTTP/9.9\r\n\r\n",
        b"GET /v1/status FTP/1.1\r\n\r\n",
        b"GET /v1/status\r\n\r\n",
        b"GET /v1/status HTTP/1.1 extra\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    ],
    ids=["one-word", "no-target", "empty", "http-9", "ftp", "http-0.9", "four-words", "long"],
)
def test_malformed_request_line_is_bad_request(ctl: Harness, raw: bytes) -> None:
    """A malformed request line answers a JSON 400 bad_request."""
    assert_error(exchange(ctl.path, raw), 400, "bad_request")


def test_transfer_encoding_is_length_required(ctl: Harness) -> None:
    """A body framed with Transfer-Encoding (chunked or not) is refused with 411, unread."""
    for value in ("chunked", "gzip, chunked", "identity"):
        raw = (
            f"PUT /v1/log-level HTTP/1.1\r\nTransfer-Encoding: {value}\r\n\r\n"
            '13\r\n{"level": "debug"}\r\n0\r\n\r\n'
        ).encode()
        assert_error(exchange(ctl.path, raw), 411, "length_required")
    assert ctl.backend.called("set_log_level") == []


@pytest.mark.parametrize(
    "headers",
    [
        "NoColonHere\r\n",
        "X-A: 1\r\n folded\r\n",
        "Bad Name: x\r\n",
        ": nameless\r\n",
        "Content-Length: abc\r\n",
        "Content-Length: 1\r\nContent-Length: 2\r\n",
    ],
    ids=["no-colon", "folded", "space-in-name", "no-name", "cl-text", "cl-twice"],
)
def test_bad_header_is_bad_request(ctl: Harness, headers: str) -> None:
    """A malformed header line or an unusable Content-Length answers 400 (and
    Transfer-Encoding 411: test_transfer_encoding_is_length_required)."""
    raw = f"PUT /v1/log-level HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    assert_error(exchange(ctl.path, raw), 400, "bad_request")
    assert ctl.backend.called("set_log_level") == []


def test_oversized_head_is_bad_request(ctl: Harness) -> None:
    """Headers beyond the head limit answer 400 instead of being buffered."""
    headers = "".join(f"X-Filler-{i}: {'a' * 1000}\r\n" for i in range(40))
    reply = exchange(ctl.path, f"GET /v1/status HTTP/1.1\r\n{headers}\r\n".encode())
    assert_error(reply, 400, "bad_request")


@pytest.mark.parametrize(
    "target", ["/v1/nope", "/v2/status", "/v1/status/", "/v1/connections/17/x", "/", "/v1"]
)
def test_unknown_path_is_not_found(ctl: Harness, target: str) -> None:
    """An unknown path answers 404 not_found."""
    assert_error(call(ctl.path, "GET", target), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/v1/status", "GET"),
        ("GET", "/v1/reload", "POST"),
        ("POST", "/v1/log-level", "PUT"),
        ("GET", "/v1/connections/17", "DELETE"),
        ("DELETE", "/metrics", "GET"),
        ("HEAD", "/v1/status", "GET"),
    ],
)
def test_wrong_method_is_not_allowed_with_allow(
    ctl: Harness, method: str, target: str, allow: str
) -> None:
    """A known path with the wrong method answers 405 and lists the right one in Allow."""
    reply = call(ctl.path, method, target)
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == allow


@pytest.mark.parametrize(
    "body", [b"{level: debug}", b"\xff\xfe", b'["debug"]', b'{"level": NaN}', b'"debug"']
)
def test_invalid_json_is_bad_request(ctl: Harness, body: bytes) -> None:
    """A body that is not a JSON object answers 400 bad_request."""
    assert_error(call(ctl.path, "PUT", "/v1/log-level", body), 400, "bad_request")
    assert ctl.backend.called("set_log_level") == []


def test_body_of_exactly_the_limit_is_accepted(ctl: Harness) -> None:
    """A body of exactly MAX_REQUEST_BODY bytes is read and used."""
    body = b'{"level": "debug"}'
    body += b" " * (MAX_REQUEST_BODY - len(body))
    assert call(ctl.path, "PUT", "/v1/log-level", body).status == 200


def test_oversized_body_is_refused_before_it_is_sent(make_server: Callable[..., Harness]) -> None:
    """A Content-Length over the limit answers 413 at once, without waiting for the body."""
    harness = make_server(request_timeout=60.0)
    raw = (
        f"PUT /v1/log-level HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        f"Content-Length: {MAX_REQUEST_BODY + 1}\r\n\r\n"
    ).encode()
    # Were the server reading the body, this client (which never sends it) would time out.
    reply = exchange(harness.path, raw, timeout=5.0)
    assert_error(reply, 413, "payload_too_large")
    assert reply.interim == []  # no "100 Continue" invitation to send the body
    assert harness.backend.called("set_log_level") == []


def test_oversized_body_sent_anyway_still_gets_its_answer(ctl: Harness) -> None:
    """A client that sends an oversized body regardless still reads the 413, not a reset."""
    body = b"x" * (2 * MAX_REQUEST_BODY)
    assert_error(call(ctl.path, "PUT", "/v1/log-level", body), 413, "payload_too_large")


def test_expect_continue_gets_an_interim_response(ctl: Harness) -> None:
    """A valid request with Expect: 100-continue is invited to send its body."""
    body = json.dumps({"level": "warning"}).encode()
    raw = build(
        "PUT", "/v1/log-level", None, f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n"
    )
    with connect(ctl.path) as sock:
        sock.sendall(raw)
        assert read_head(sock)[0].startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        reply = parse_reply(read_all(sock))
    assert reply.status == 200
    assert reply.json == {"level": "warning", "previous": "info"}


def test_silent_client_is_timed_out(make_server: Callable[..., Harness]) -> None:
    """A client that sends nothing gets 408 timeout once request_timeout has passed."""
    harness = make_server(request_timeout=0.5)
    started = time.monotonic()
    with connect(harness.path) as sock:
        reply = parse_reply(read_all(sock))
    elapsed = time.monotonic() - started
    assert_error(reply, 408, "timeout")
    assert 0.4 <= elapsed < 5.0


def test_trickling_client_is_timed_out_by_the_total_deadline(
    make_server: Callable[..., Harness],
) -> None:
    """A client sending a byte every 50 ms is cut off after request_timeout, not never."""
    harness = make_server(request_timeout=1.0)
    started = time.monotonic()
    sent = 0
    with connect(harness.path) as sock:
        trickle = b"GET /v1/status HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        # Each wait for the answer doubles as the pause between bytes: far shorter than
        # the timeout, so only a deadline over the whole request can end this loop.
        while not select.select([sock], [], [], 0.05)[0]:
            assert time.monotonic() - started < DEADLINE, "the trickler was never cut off"
            sock.send(trickle[sent : sent + 1])
            sent += 1
        reply = parse_reply(read_all(sock))
    elapsed = time.monotonic() - started
    assert_error(reply, 408, "timeout")
    assert sent > 5
    assert elapsed < 4.0


def test_flood_of_connections_is_capped_and_survived(ctl: Harness) -> None:
    """200 simultaneous connections: at most 64 get a thread, the rest a 503; it still answers."""
    baseline = threading.active_count()
    socks: list[socket.socket] = []
    try:
        for _ in range(200):
            # A blocking connect waits for room in the backlog; with a timeout set, an
            # AF_UNIX connect to a full backlog fails at once with EAGAIN instead.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.connect(ctl.path)
            sock.settimeout(DEADLINE)
        # Connections are accepted in order: once the last one has its 503, every one
        # has been accepted while the first 64 still hold their slots.
        assert select.select([socks[-1]], [], [], DEADLINE)[0], "the last client got nothing"
        assert ctl.server.active_connections == control.MAX_CONNECTIONS
        assert threading.active_count() - baseline <= control.MAX_CONNECTIONS
        for sock in socks:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(build("GET", "/v1/status"))
        replies = [parse_reply(read_all(sock)) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    statuses = [reply.status for reply in replies]
    assert statuses == [200] * control.MAX_CONNECTIONS + [503] * (200 - control.MAX_CONNECTIONS)
    busy = next(reply for reply in replies if reply.status == 503)
    assert_error(busy, 503, "unavailable")
    wait_until(lambda: ctl.server.active_connections == 0, "flood threads to end")
    assert call(ctl.path, "GET", "/v1/status").status == 200


# --------------------------------------------------------------------------- socket file


def test_socket_has_the_configured_mode_and_no_temporary_file_remains(
    make_server: Callable[..., Harness], sockdir: str
) -> None:
    """Right after start the socket has exactly the configured mode and is alone in its dir."""
    harness = make_server(mode=0o600)
    info = os.stat(harness.path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert os.listdir(sockdir) == ["c.sock"]


def test_socket_is_never_reachable_with_looser_permissions(
    make_server: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before it is renamed into place the socket already has its final mode, in a 0700 dir."""
    seen: list[tuple[int, int]] = []
    real_rename = os.rename

    def spying_rename(src: str, dst: str) -> None:
        seen.append(
            (
                stat.S_IMODE(os.stat(src).st_mode),
                stat.S_IMODE(os.stat(os.path.dirname(src)).st_mode),
            )
        )
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spying_rename)
    make_server(mode=0o660)
    assert seen == [(0o660, 0o700)]


def test_parent_directory_is_created(make_server: Callable[..., Harness], sockdir: str) -> None:
    """A missing parent directory is created with mode 0755."""
    harness = make_server(socket=os.path.join(sockdir, "run", "c.sock"))
    assert stat.S_IMODE(os.stat(os.path.dirname(harness.path)).st_mode) == 0o755
    assert call(harness.path, "GET", "/v1/status").status == 200


def test_stale_socket_is_replaced(make_server: Callable[..., Harness], sockdir: str) -> None:
    """A socket file nobody listens on (a crashed daemon's) is replaced."""
    path = os.path.join(sockdir, "c.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)
    old_inode = os.stat(path).st_ino
    harness = make_server()
    assert call(harness.path, "GET", "/v1/status").status == 200
    assert os.stat(path).st_ino != old_inode
    assert os.listdir(sockdir) == ["c.sock"]


def test_live_instance_is_not_replaced(ctl: Harness) -> None:
    """Starting on a socket another live server answers on fails and leaves it serving."""
    second = ControlServer(make_settings(ctl.path), FakeBackend(), RecordingLog())
    with pytest.raises(ControlError, match="another sockd is already running on control socket"):
        second.start()
    assert call(ctl.path, "GET", "/v1/status").status == 200


def test_non_socket_path_is_refused_and_left_intact(sockdir: str) -> None:
    """A regular file at the socket path is neither replaced nor removed."""
    path = os.path.join(sockdir, "c.sock")
    with open(path, "w") as fh:
        fh.write("precious")
    server = ControlServer(make_settings(path), FakeBackend(), RecordingLog())
    with pytest.raises(ControlError, match="exists and is not a socket; refusing to replace it"):
        server.start()
    server.close()
    with open(path) as fh:
        assert fh.read() == "precious"
    assert os.listdir(sockdir) == ["c.sock"]


def test_close_removes_the_socket_file(ctl: Harness, sockdir: str) -> None:
    """close() stops serving and removes the socket file."""
    ctl.server.close()
    assert not os.path.exists(ctl.path)
    assert os.listdir(sockdir) == []
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        connect(ctl.path)


def test_close_leaves_a_replaced_file_alone(ctl: Harness) -> None:
    """close() does not unlink a path that is no longer our socket."""
    os.unlink(ctl.path)
    with open(ctl.path, "w") as fh:
        fh.write("someone else's")
    ctl.server.close()
    with open(ctl.path) as fh:
        assert fh.read() == "someone else's"


def test_forked_child_does_not_keep_the_control_socket(ctl: Harness) -> None:
    """A child forked by the daemon (forking mode) has the listening socket closed, not removed."""
    assert ctl.server._server is not None  # private: the descriptor is what the hook closes
    fd = ctl.server._server.socket.fileno()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status only
        code = 1
        try:
            os.fstat(fd)
        except OSError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child still had the listening socket"
    assert stat.S_ISSOCK(os.stat(ctl.path).st_mode)
    assert call(ctl.path, "GET", "/v1/status").status == 200


def test_unknown_group_fails_start(sockdir: str) -> None:
    """An unknown group name is a ControlError at start, and no socket is created."""
    path = os.path.join(sockdir, "c.sock")
    server = ControlServer(
        make_settings(path, group="sockd-no-such-group"), FakeBackend(), RecordingLog()
    )
    with pytest.raises(ControlError, match="sockd-no-such-group"):
        server.start()
    assert os.listdir(sockdir) == []


def test_apply_changes_mode_and_group(ctl: Harness, test_groups: dict[str, int]) -> None:
    """apply() with a new mode and group changes the live socket file in place."""
    inode = os.stat(ctl.path).st_ino
    ctl.server.apply(make_settings(ctl.path, mode=0o640, group=CTL_GROUP))
    info = os.stat(ctl.path)
    assert (info.st_ino, stat.S_IMODE(info.st_mode), info.st_gid) == (
        inode,
        0o640,
        test_groups[CTL_GROUP],
    )
    ctl.server.apply(make_settings(ctl.path, mode=0o660))
    assert os.stat(ctl.path).st_gid == os.getegid()


def test_apply_with_unknown_group_keeps_the_old_settings(ctl: Harness) -> None:
    """A failed apply() raises ControlError and leaves the socket and settings as they were."""
    with pytest.raises(ControlError, match="sockd-no-such-group"):
        ctl.server.apply(make_settings(ctl.path, mode=0o600, group="sockd-no-such-group"))
    assert stat.S_IMODE(os.stat(ctl.path).st_mode) == 0o660
    assert ctl.server.settings.mode == 0o660


def test_apply_moves_the_socket(ctl: Harness, sockdir: str) -> None:
    """apply() with a new path serves there and removes the old socket file."""
    old = ctl.path
    new = os.path.join(sockdir, "moved.sock")
    ctl.server.apply(make_settings(new))
    assert ctl.server.path == new
    assert not os.path.exists(old)
    assert os.listdir(sockdir) == ["moved.sock"]
    assert call(new, "GET", "/v1/status").status == 200


def test_apply_onto_a_live_socket_keeps_serving_the_old_one(
    ctl: Harness, make_server: Callable[..., Harness], sockdir: str
) -> None:
    """Moving onto a path another live server owns fails and keeps the old socket."""
    other = make_server(socket=os.path.join(sockdir, "other.sock"))
    with pytest.raises(ControlError, match="already running"):
        ctl.server.apply(make_settings(other.path))
    assert ctl.server.path != other.path
    assert call(ctl.path, "GET", "/v1/status").status == 200


# --------------------------------------------------------------------------- access


def test_stranger_is_forbidden_and_logged(
    make_server: Callable[..., Harness], nobody: pwd.struct_passwd
) -> None:
    """A uid that is not root, the daemon's or in a group gets 403 and a control.denied event."""
    harness = make_server(mode=0o666)  # the file lets anyone connect: SO_PEERCRED decides
    reply, pid = exchange_as(
        nobody.pw_uid, nobody.pw_gid, [], harness.path, build("GET", "/v1/status")
    )
    assert_error(reply, 403, "forbidden")
    event = harness.log.wait_for("control.denied")
    # Refused in the accept loop, before the request was read: no method or path yet.
    assert event == {
        "event": "control.denied",
        "log_level": "warning",
        "count": 1,
        "uid": nobody.pw_uid,
        "pid": pid,
        "method": None,
        "path": None,
    }
    assert harness.backend.called("status") == []


def test_read_group_member_may_get_but_not_post(
    make_server: Callable[..., Harness],
    nobody: pwd.struct_passwd,
    test_groups: dict[str, int],
) -> None:
    """A supplementary member of read_group gets GET answers and 403 on POST."""
    harness = make_server(mode=0o666, read_group=READ_GROUP)
    groups = [test_groups[READ_GROUP]]
    for target in ("/v1/status", "/v1/stats"):
        reply, _ = exchange_as(
            nobody.pw_uid, nobody.pw_gid, groups, harness.path, build("GET", target)
        )
        assert reply.status == 200, target
    reply, pid = exchange_as(
        nobody.pw_uid, nobody.pw_gid, groups, harness.path, build("POST", "/v1/pause")
    )
    assert_error(reply, 403, "forbidden")
    assert harness.backend.called("pause") == []
    harness.log.wait_for("control.denied", pid=pid, method="POST")
    request = harness.log.wait_for("control.request", pid=pid)
    assert request["status"] == 403


def test_read_group_as_primary_group_may_get(
    make_server: Callable[..., Harness],
    nobody: pwd.struct_passwd,
    test_groups: dict[str, int],
) -> None:
    """A client whose primary gid is read_group may use GET endpoints."""
    harness = make_server(mode=0o666, read_group=READ_GROUP)
    reply, _ = exchange_as(
        nobody.pw_uid, test_groups[READ_GROUP], [], harness.path, build("GET", "/v1/config")
    )
    assert reply.status == 200


def test_control_group_member_may_change_state(
    make_server: Callable[..., Harness],
    nobody: pwd.struct_passwd,
    test_groups: dict[str, int],
) -> None:
    """A member of the control group may use state-changing endpoints; the socket has its gid."""
    harness = make_server(group=CTL_GROUP, read_group=READ_GROUP)
    assert os.stat(harness.path).st_gid == test_groups[CTL_GROUP]
    reply, _ = exchange_as(
        nobody.pw_uid,
        nobody.pw_gid,
        [test_groups[CTL_GROUP]],
        harness.path,
        build("POST", "/v1/pause"),
    )
    assert reply.status == 200
    assert harness.backend.called("pause") == [None]


def test_groups_fall_back_to_the_group_database_when_the_pid_is_not_the_peer() -> None:
    """When /proc/<pid> belongs to another uid, membership comes from the group database."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")
    if nobody.pw_uid == os.geteuid():
        pytest.skip("running as nobody: this process's /proc entry would match")
    peer = Peer(pid=os.getpid(), uid=nobody.pw_uid, gid=nobody.pw_gid)
    expected = {nobody.pw_gid, *os.getgrouplist(nobody.pw_name, nobody.pw_gid)}
    assert peer.groups() == expected


# --------------------------------------------------------------------------- curl


def test_curl_reads_status(ctl: Harness) -> None:
    """curl --unix-socket gets the status document."""
    result = curl("--unix-socket", ctl.path, "http://localhost/v1/status")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == STATUS


def test_curl_sets_the_log_level(ctl: Harness) -> None:
    """curl -X PUT with a JSON body sets the log level."""
    result = curl(
        "--unix-socket",
        ctl.path,
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"level": "error"}',
        "http://localhost/v1/log-level",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"level": "error", "previous": "info"}


def test_curl_reads_the_log_history(ctl: Harness) -> None:
    """curl decodes the chunked NDJSON log history."""
    result = curl("--unix-socket", ctl.path, "http://localhost/v1/logs?n=2")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == HISTORY


def test_curl_sees_413_for_an_oversized_body(ctl: Harness, sockdir: str) -> None:
    """curl posting a body over the limit gets 413 rather than a broken connection."""
    body = os.path.join(sockdir, "body.json")
    with open(body, "w") as fh:
        fh.write('{"level": "debug"' + " " * (MAX_REQUEST_BODY * 2) + "}")
    result = curl(
        "--unix-socket",
        ctl.path,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "PUT",
        "--data-binary",
        f"@{body}",
        "http://localhost/v1/log-level",
    )
    assert result.stdout == "413", result.stderr
