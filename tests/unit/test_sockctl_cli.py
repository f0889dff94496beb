"""sockctl against a real HTTP server on a real Unix socket, answering canned responses.

The fake daemon is ``http.server.BaseHTTPRequestHandler`` on a threading
``socketserver.UnixStreamServer``: real sockets, real HTTP framing and chunked
encoding, so the client's transport is exercised, not mocked. Each test sets the
answers it needs and can inspect the requests the server received.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner, Result

from sockctl import cli
from sockctl.client import (
    ControlClient,
    NotASocket,
    NotRunning,
    PermissionDenied,
    _connect_error,
    wait_until_stopped,
)
from sockd import cli as sockd_cli
from sockd.protocol import API_VERSION_HEADER, CONTROL_SOCKET_ENV, DEFAULT_CONTROL_SOCKET
from tests.conftest import DEADLINE, require_reachable_by_others

# --- the fake daemon ------------------------------------------------------------------

STATUS: dict[str, Any] = {
    "api_version": 1,
    "pid": 4242,
    "version": "0.1.0",
    "state": "running",
    "started_at": "2026-11-27T10:00:00.000000Z",
    "uptime_s": 192.5,
    "mode": "threading",
    "handler": "sockd.handlers:EchoHandler",
    "listen": ["127.0.0.1:9000"],
    "config_path": "/etc/sockd/sockd.toml",
    "generation": 1,
    "log_level": "info",
    "connections": {"active": 3, "total": 120, "refused": 0},
    "last_reload": None,
}
CONNECTIONS: dict[str, Any] = {
    "connections": [
        {
            "id": 17,
            "peer": "127.0.0.1:51234",
            "listen": "127.0.0.1:9000",
            "started_at": "2026-11-27T10:00:00.000000Z",
            "age_s": 3.2,
            "bytes_in": 120,
            "bytes_out": 2048,
            "pid": None,
        }
    ]
}
CONFIG: dict[str, Any] = {
    "path": "/etc/sockd/sockd.toml",
    "generation": 1,
    "config": {
        "server": {"listen": ["127.0.0.1:9000"], "mode": "threading", "handler_options": {}},
        "logging": {"level": "info", "ring_size": 1000},
        "control": {"socket": "/run/sockd/control.sock", "mode": "0660", "group": None},
    },
}
STATS: dict[str, Any] = {
    "metrics": [
        {
            "name": name,
            "kind": "counter" if name.endswith("_total") else "gauge",
            "help": "",
            "samples": [{"labels": labels, "value": value} for labels, value in samples],
        }
        for name, samples in [
            ("sockd_connections_open", [({}, 3)]),
            ("sockd_connections_total", [({}, 120)]),
            ("sockd_bytes_received_total", [({}, 1229)]),
            ("sockd_reloads_total", [({"result": "applied"}, 2), ({"result": "rejected"}, 1)]),
            ("sockd_uptime_seconds", [({}, 192.5)]),
            ("sockd_info", [({"version": "0.1.0", "mode": "threading"}, 1)]),
        ]
    ]
}
EVENTS = [
    {
        "timestamp": "2026-11-27T10:00:01.250000Z",
        "level": "info",
        "event": "conn.open",
        "peer": "127.0.0.1:51234",
        "id": 17,
    },
    {
        "timestamp": "2026-11-27T10:00:02.500000Z",
        "level": "warning",
        "event": "conn.close",
        "id": 17,
        "reason": "idle timeout",
    },
]


@dataclass
class Canned:
    """One canned answer: status, body (object → JSON, str/bytes → as is), version header."""

    status: int = 200
    body: Any = None
    version: str | None = "1"
    content_type: str = "application/json"


@dataclass
class Seen:
    """A request as the fake daemon received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Route = Canned | Callable[["Handler"], None]


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers from ``server.routes``; HTTP/1.1 so chunked streaming works."""

    protocol_version = "HTTP/1.1"
    timeout = 5  # a stuck test must not hang the server's close
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet (and avoid the stdlib's client_address[0] on a Unix socket)."""

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(
            Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers), body)
        )
        route = self.server.routes.get((self.command, parts.path))
        if route is None:
            route = Canned(404, {"error": {"code": "not_found", "message": "unknown path"}})
        if isinstance(route, Canned):
            self.answer(route)
        else:
            route(self)

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch  # noqa: N815 - stdlib's names

    def answer(self, canned: Canned) -> None:
        if isinstance(canned.body, bytes):
            data = canned.body
        elif isinstance(canned.body, str):
            data = canned.body.encode()
        else:
            data = json.dumps(canned.body).encode()
        self.send_response(canned.status)
        if canned.version is not None:
            self.send_header(API_VERSION_HEADER, canned.version)
        self.send_header("Content-Type", canned.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self, close: bool = False) -> None:
        """A chunked NDJSON answer's head; ``close`` says ``Connection: close`` as sockd does."""
        self.send_response(200)
        self.send_header(API_VERSION_HEADER, "1")
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        if close:
            self.send_header("Connection", "close")
        self.end_headers()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def wait_for_disconnect(self) -> bool:
        """Block until the client closes its end; True if it did."""
        try:
            return self.rfile.read(1) == b""
        except OSError:
            return True


class FakeServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threading Unix-socket HTTP server; ``server_close`` joins its handler threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], Route] = {}
        super().__init__(path, Handler)

    def set(self, method: str, path: str, route: Route) -> None:
        self.routes[(method, path)] = route

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (sockctl refusing a version) is not an error;
        anything else is reported as socketserver does, on ``sys.stderr``, which in this
        thread may be the CliRunner's capture of sockctl's own stderr (a flake)."""
        if not isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionResetError):
            super().handle_error(request, client_address)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed AF_UNIX's limit)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="sc")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(sockdir: str) -> Iterator[FakeServer]:
    """The fake daemon serving the spec's example answers until the test ends."""
    server = FakeServer(os.path.join(sockdir, "c.sock"))
    server.set("GET", "/v1/status", Canned(body=STATUS))
    server.set("GET", "/v1/connections", Canned(body=CONNECTIONS))
    server.set("GET", "/v1/config", Canned(body=CONFIG))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()  # joins the handler threads
        assert not thread.is_alive()


def run(*args: str, env: dict[str, str | None] | None = None, color: bool = False) -> Result:
    """Invoke sockctl in-process, with $SOCKD_CONTROL_SOCKET cleared unless given."""
    environment: dict[str, str | None] = {CONTROL_SOCKET_ENV: None, "NO_COLOR": None}
    environment.update(env or {})
    runner = CliRunner(catch_exceptions=False)
    return runner.invoke(cli.main, list(args), env=environment, color=color)


def ask(server: FakeServer, *args: str) -> Result:
    return run("--socket", server.path, *args)


def write_config(directory: str, socket_path: str, name: str = "sockd.toml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as fh:
        fh.write(
            '[server]\nhandler = "socketserver:BaseRequestHandler"\n'
            f'[control]\nsocket = "{socket_path}"\n'
        )
    return path


# --- commands -------------------------------------------------------------------------


def test_status_prints_the_view(daemon: FakeServer) -> None:
    """`status` shows the headline with the state and aligned fields, exit 0."""
    result = ask(daemon, "status")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("sockd 0.1.0 (pid 4242): running\n")
    assert "  uptime:      3m 12s, since 2026-11-27" in result.stdout
    assert "  connections: 3 active, 120 total, 0 refused" in result.stdout
    assert [(s.method, s.path) for s in daemon.seen] == [("GET", "/v1/status")]


def test_status_json_is_the_raw_answer(daemon: FakeServer) -> None:
    """`--json status` prints exactly the daemon's object."""
    result = ask(daemon, "--json", "status")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == STATUS


def test_status_checks_the_api_version_in_the_body(daemon: FakeServer) -> None:
    """A status body reporting another api_version exits 5 even with the right header."""
    daemon.set("GET", "/v1/status", Canned(body={**STATUS, "api_version": 2}))
    result = ask(daemon, "status")
    assert result.exit_code == 5
    assert "version 2" in result.stderr


def test_status_missing_keys_is_a_protocol_error(daemon: FakeServer) -> None:
    """An answer lacking documented keys fails with one line naming them, exit 1."""
    daemon.set("GET", "/v1/status", Canned(body={"api_version": 1, "state": "running"}))
    result = ask(daemon, "status")
    assert result.exit_code == 1
    assert result.stderr.startswith("sockctl: status: the answer lacks ")
    assert len(result.stderr.splitlines()) == 1


def test_connections_table(daemon: FakeServer) -> None:
    """`connections` prints an aligned table with humanised bytes and ages."""
    result = ask(daemon, "connections")
    assert result.exit_code == 0
    header, row, footer = result.stdout.splitlines()
    assert header.split() == ["ID", "PEER", "LISTEN", "AGE", "IN", "OUT", "PID"]
    assert row.split() == [
        *("17", "127.0.0.1:51234", "127.0.0.1:9000", "3.2s"),
        *("120", "B", "2.0", "KiB", "-"),
    ]
    assert footer == "1 connection"


def test_connections_empty(daemon: FakeServer) -> None:
    """No connections reads as a sentence, not an empty table."""
    daemon.set("GET", "/v1/connections", Canned(body={"connections": []}))
    assert ask(daemon, "connections").stdout == "no open connections\n"


def test_connections_json(daemon: FakeServer) -> None:
    """`--json connections` prints the daemon's object."""
    assert json.loads(ask(daemon, "--json", "connections").stdout) == CONNECTIONS


def test_kick_closes_by_id(daemon: FakeServer) -> None:
    """`kick 17` sends DELETE /v1/connections/17 and confirms."""
    daemon.set("DELETE", "/v1/connections/17", Canned(body={"closed": 17}))
    result = ask(daemon, "kick", "17")
    assert result.exit_code == 0
    assert result.stdout == "closed connection 17\n"
    assert daemon.seen[-1].method == "DELETE"


def _conn(conn_id: int, peer: str, listen: str = "127.0.0.1:9000") -> dict[str, Any]:
    return {**CONNECTIONS["connections"][0], "id": conn_id, "peer": peer, "listen": listen}


MIXED = {
    "connections": [
        _conn(1, "10.1.2.3:4000"),
        _conn(2, "10.9.9.9:4001", listen="[::]:9000"),
        _conn(3, "[2001:db8::7]:4002"),
        _conn(4, "192.0.2.1:4003"),
        _conn(5, "[::ffff:10.7.7.7]:4004", listen="[::]:9000"),
    ]
}


def test_connections_filtered_by_peer_and_listen(daemon: FakeServer) -> None:
    """--peer takes an address or a network (v4 or v6); --listen one listen address."""
    daemon.set("GET", "/v1/connections", Canned(body=MIXED))

    def ids(*args: str) -> list[int]:
        result = ask(daemon, "--json", "connections", *args)
        assert result.exit_code == 0, result.stderr
        return [c["id"] for c in json.loads(result.stdout)["connections"]]

    assert ids("--peer", "10.0.0.0/8") == [1, 2, 5]  # 5: IPv4 on a dual-stack socket
    assert ids("--peer", "10.1.2.3") == [1]
    assert ids("--peer", "2001:db8::/32") == [3]
    assert ids("--listen", "[::]:9000") == [2, 5]
    assert ids("--peer", "10.0.0.0/8", "--listen", "127.0.0.1:9000") == [1]
    assert ask(daemon, "connections", "--peer", "172.16.0.0/12").stdout == ("no open connections\n")
    bad = ask(daemon, "connections", "--peer", "10.0.0.0/33")
    assert bad.exit_code == 2
    assert "expected an address or a network like 10.0.0.0/8" in bad.stderr


def test_kick_by_peer_closes_every_match(daemon: FakeServer) -> None:
    """kick --peer closes each matching connection; one already gone (404) is skipped."""
    daemon.set("GET", "/v1/connections", Canned(body=MIXED))
    daemon.set("DELETE", "/v1/connections/1", Canned(body={"closed": 1}))
    gone = {"error": {"code": "not_found", "message": "no connection 2"}}
    daemon.set("DELETE", "/v1/connections/2", Canned(404, gone))
    daemon.set("DELETE", "/v1/connections/5", Canned(body={"closed": 5}))
    result = ask(daemon, "kick", "--peer", "10.0.0.0/8")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "closed connection 1\nclosed connection 5\n"
    deleted = [s.path for s in daemon.seen if s.method == "DELETE"]
    assert deleted == ["/v1/connections/1", "/v1/connections/2", "/v1/connections/5"]
    as_json = ask(daemon, "--json", "kick", "--peer", "10.1.2.3/32")
    assert json.loads(as_json.stdout) == {"closed": [1], "peer": "10.1.2.3/32"}


def test_kick_by_peer_without_a_match_exits_1(daemon: FakeServer) -> None:
    """Nothing to close is a failure a script can see (exit 1), with the network named."""
    daemon.set("GET", "/v1/connections", Canned(body=MIXED))
    result = ask(daemon, "kick", "--peer", "172.16.0.0/12")
    assert result.exit_code == 1
    assert result.stderr == "sockctl: no open connection from 172.16.0.0/12\n"


@pytest.mark.parametrize("args", [(), ("3", "--peer", "10.0.0.0/8")])
def test_kick_needs_an_id_or_a_peer(daemon: FakeServer, args: tuple[str, ...]) -> None:
    """Neither or both is a usage error (exit 2) and sends nothing."""
    result = ask(daemon, "kick", *args)
    assert result.exit_code == 2
    assert "give a connection ID or --peer" in result.stderr
    assert daemon.seen == []


def test_kick_unknown_id_is_a_daemon_failure(daemon: FakeServer) -> None:
    """A 404 not_found answer prints the daemon's message and exits 1."""
    error = {"error": {"code": "not_found", "message": "no connection 99"}}
    daemon.set("DELETE", "/v1/connections/99", Canned(404, error))
    result = ask(daemon, "kick", "99")
    assert result.exit_code == 1
    assert result.stderr == "sockctl: no connection 99\n"


def test_kick_needs_a_number(daemon: FakeServer) -> None:
    """`kick abc` is a usage error (exit 2) and sends nothing."""
    assert ask(daemon, "kick", "abc").exit_code == 2
    assert daemon.seen == []


@pytest.mark.parametrize("given", ["abc", "1.5", "-1"])
def test_kick_names_what_it_expected(daemon: FakeServer, given: str) -> None:
    """`kick abc` says a connection id was expected, not "a valid integer range"; exit 2."""
    result = ask(daemon, "kick", "--", given)
    assert result.exit_code == 2
    assert f"expected a connection id (a non-negative integer), got '{given}'" in result.stderr
    assert "integer range" not in result.stderr
    assert daemon.seen == []


def test_config_prints_valid_toml(daemon: FakeServer) -> None:
    """`config` prints TOML that parses back to the effective values (unset keys omitted)."""
    result = ask(daemon, "config")
    assert result.exit_code == 0
    parsed = tomllib.loads(result.stdout)
    expected = json.loads(json.dumps(CONFIG["config"]))
    del expected["control"]["group"]
    assert parsed == expected
    assert "# group is not set" in result.stdout


def test_reload_applied_lists_changes(daemon: FakeServer) -> None:
    """An applied reload prints the generation and each `key: old -> new`."""
    answer = {
        "result": "applied",
        "generation": 2,
        "changes": [{"key": "logging.level", "old": "info", "new": "debug"}],
    }
    daemon.set("POST", "/v1/reload", Canned(body=answer))
    result = ask(daemon, "reload")
    assert result.exit_code == 0
    assert result.stdout == (
        'reload applied: generation 2, 1 change\n  logging.level: "info" -> "debug"\n'
    )


def test_reload_rejected_prints_every_error_and_exits_78(daemon: FakeServer) -> None:
    """A 422 invalid_config answer lists every problem on stderr and exits 78."""
    errors = ['server.mode: expected "threading" or "forking"', "server.bogus: unknown key"]
    body = {
        "error": {
            "code": "invalid_config",
            "message": "2 problems in /etc/sockd/sockd.toml",
            "details": {"errors": errors},
        }
    }
    daemon.set("POST", "/v1/reload", Canned(422, body))
    result = ask(daemon, "reload")
    assert result.exit_code == 78
    lines = result.stderr.splitlines()
    assert lines[0].startswith("sockctl: reload rejected, sockd keeps its current configuration")
    assert lines[1:] == [f"sockctl:   {e}" for e in errors]
    assert result.stdout == ""


def test_reload_rejected_says_it_once(daemon: FakeServer) -> None:
    """With sockd's own error body, the rejection is said once, then each problem follows."""
    errors = ['server.mode: expected "threading" or "forking"', "server.bogus: unknown key"]
    body = {
        "error": {
            "code": "invalid_config",
            "message": "reload rejected: the configuration has 2 problems; "
            "the daemon keeps running as before",
            "details": {"errors": errors},
        }
    }
    daemon.set("POST", "/v1/reload", Canned(422, body))
    result = ask(daemon, "reload")
    assert result.exit_code == 78
    assert result.stderr.splitlines() == [
        "sockctl: reload rejected, sockd keeps its current configuration (2 problems):",
        *(f"sockctl:   {e}" for e in errors),
    ]


def test_reload_rejected_json_prints_the_error_object(daemon: FakeServer) -> None:
    """With --json a rejected reload also prints the daemon's error object on stdout."""
    body = {"error": {"code": "invalid_config", "message": "bad", "details": {"errors": ["x"]}}}
    daemon.set("POST", "/v1/reload", Canned(422, body))
    result = ask(daemon, "--json", "reload")
    assert result.exit_code == 78
    assert json.loads(result.stdout) == body


def test_reload_conflict_exits_1(daemon: FakeServer) -> None:
    """A 409 conflict answer exits 1 with the daemon's message."""
    body = {"error": {"code": "conflict", "message": "a reload is already running"}}
    daemon.set("POST", "/v1/reload", Canned(409, body))
    result = ask(daemon, "reload")
    assert result.exit_code == 1
    assert result.stderr == "sockctl: a reload is already running\n"


def test_stop_sends_the_timeout(daemon: FakeServer) -> None:
    """`stop --timeout 5` posts {"timeout": 5.0} and reports the drain."""
    daemon.set("POST", "/v1/stop", Canned(202, {"state": "draining", "timeout": 5.0, "active": 3}))
    result = ask(daemon, "stop", "--timeout", "5")
    assert result.exit_code == 0
    assert daemon.seen[-1].json() == {"timeout": 5.0}
    assert (
        result.stdout == "sockd is draining: waiting up to 5.0s for 3 open connections to finish\n"
    )


def test_stop_warns_when_systemd_supervises(daemon: FakeServer) -> None:
    """`stop` of a daemon systemd started warns in one stderr line, after the one request
    that stops it (its answer says who supervises the daemon)."""
    daemon.set(
        "POST",
        "/v1/stop",
        Canned(202, {"state": "draining", "timeout": 5.0, "active": 0, "supervisor": "systemd"}),
    )
    result = ask(daemon, "stop")
    assert result.exit_code == 0
    assert result.stderr == (
        "sockctl: warning: sockd runs under systemd: use systemctl stop sockd (or "
        "sockd@NAME), or systemd will not restart it (Restart= sees a clean exit); "
        "stopping it anyway\n"
    )
    assert [(seen.method, seen.path) for seen in daemon.seen] == [("POST", "/v1/stop")]


@pytest.mark.parametrize(
    ("supervisor", "execstop"),
    [(None, False), ("systemd", True), ("absent", False)],
    ids=["by-hand", "systemd-execstop", "older-daemon"],
)
def test_stop_is_quiet_unless_behind_systemds_back(
    daemon: FakeServer, supervisor: str | None, execstop: bool
) -> None:
    """No warning for a daemon started by hand, for the unit's own ExecStop= ($MAINPID is
    the daemon's pid, which the fake daemon in this process has), or for a daemon too old
    to say."""
    answer: dict[str, Any] = {"state": "draining", "timeout": 5.0, "active": 0}
    if supervisor != "absent":
        answer["supervisor"] = supervisor
    daemon.set("POST", "/v1/stop", Canned(202, answer))
    mainpid = str(os.getpid()) if execstop else None
    result = run("--socket", daemon.path, "stop", env={"MAINPID": mainpid})
    assert result.exit_code == 0
    assert result.stderr == ""


def test_status_view_names_the_supervisor(daemon: FakeServer) -> None:
    """`status` shows a supervisor row only when the daemon reports one."""
    daemon.set("GET", "/v1/status", Canned(body={**STATUS, "supervisor": "systemd"}))
    assert "  supervisor:  systemd\n" in ask(daemon, "status").stdout
    daemon.set("GET", "/v1/status", Canned(body={**STATUS, "supervisor": None}))
    assert "supervisor" not in ask(daemon, "status").stdout


def test_stop_without_timeout_sends_no_body(daemon: FakeServer) -> None:
    """Plain `stop` leaves the timeout to the daemon's shutdown_timeout."""
    daemon.set("POST", "/v1/stop", Canned(202, {"state": "draining", "timeout": 30.0, "active": 0}))
    assert ask(daemon, "--json", "stop").exit_code == 0
    assert daemon.seen[-1].body == b""


def test_stop_wait_returns_once_the_socket_is_gone(daemon: FakeServer) -> None:
    """`stop --wait` waits until the control socket stops answering, then says so."""

    def stop_then_vanish(handler: Handler) -> None:
        handler.answer(Canned(202, {"state": "draining", "timeout": 5.0, "active": 0}))
        handler.wfile.flush()
        os.unlink(daemon.path)

    daemon.set("POST", "/v1/stop", stop_then_vanish)
    result = ask(daemon, "stop", "--wait")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("sockd stopped\n")


def test_stop_wait_gives_up_after_the_deadline(
    daemon: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stop --wait` exits 1 when the daemon is still there past timeout + grace."""
    monkeypatch.setattr(cli, "WAIT_GRACE_S", 0.1)
    daemon.set("POST", "/v1/stop", Canned(202, {"state": "draining", "timeout": 0.0, "active": 1}))
    result = ask(daemon, "stop", "--wait")
    assert result.exit_code == 1
    assert "still running" in result.stderr


def test_wait_until_stopped_follows_the_pid(sockdir: str) -> None:
    """With a pid, the wait ends when that process exits, whatever the socket does."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.stdin is not None
        missing = os.path.join(sockdir, "none.sock")
        assert wait_until_stopped(missing, child.pid, 0.05) is False
        child.stdin.close()  # the child reads EOF and exits
        assert wait_until_stopped(missing, child.pid, 10) is True
    finally:
        child.kill()
        child.wait()


def test_pause_and_resume(daemon: FakeServer) -> None:
    """`pause` and `resume` post to their endpoints and name the new state."""
    daemon.set("POST", "/v1/pause", Canned(body={"state": "paused"}))
    daemon.set("POST", "/v1/resume", Canned(body={"state": "running"}))
    assert ask(daemon, "pause").stdout.startswith("sockd is paused")
    assert ask(daemon, "resume").stdout.startswith("sockd is running")
    assert [s.path for s in daemon.seen] == ["/v1/pause", "/v1/resume"]


def test_pause_while_draining_exits_1(daemon: FakeServer) -> None:
    """A 409 conflict on pause exits 1."""
    body = {"error": {"code": "conflict", "message": "sockd is draining"}}
    daemon.set("POST", "/v1/pause", Canned(409, body))
    assert ask(daemon, "pause").exit_code == 1


def test_log_level_puts_the_level(daemon: FakeServer) -> None:
    """`log-level DEBUG` sends PUT {"level": "debug"} and shows before and after."""
    daemon.set("PUT", "/v1/log-level", Canned(body={"level": "debug", "previous": "info"}))
    result = ask(daemon, "log-level", "DEBUG")
    assert result.exit_code == 0
    assert daemon.seen[-1].json() == {"level": "debug"}
    assert result.stdout.startswith("log level: info -> debug")


def test_log_level_rejects_unknown_levels(daemon: FakeServer) -> None:
    """An unknown level is a usage error (exit 2, one line) and sends nothing."""
    result = ask(daemon, "log-level", "loud")
    assert result.exit_code == 2
    assert result.stderr == (
        "sockctl: level must be one of debug, info, warning, error, critical (or warn), "
        "got 'loud'\n"
    )
    assert daemon.seen == []


@pytest.mark.parametrize("spelling", ["warn", "WARN", "Warning"])
def test_log_level_warn_is_warning(daemon: FakeServer, spelling: str) -> None:
    """`log-level warn` (any case) sends the canonical name, warning."""
    daemon.set("PUT", "/v1/log-level", Canned(body={"level": "warning", "previous": "info"}))
    result = ask(daemon, "log-level", spelling)
    assert result.exit_code == 0, result.stderr
    assert daemon.seen[-1].json() == {"level": "warning"}


def test_logs_level_warn_asks_for_warning(daemon: FakeServer) -> None:
    """`logs --level warn` asks the daemon for level=warning."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    assert ask(daemon, "logs", "--level", "warn").exit_code == 0
    assert daemon.seen[-1].query["level"] == ["warning"]


def test_reopen_logs(daemon: FakeServer) -> None:
    """`reopen-logs` posts and names the reopened file."""
    answer = {"reopened": True, "output": "/var/log/sockd/sockd.log"}
    daemon.set("POST", "/v1/reopen-logs", Canned(body=answer))
    result = ask(daemon, "reopen-logs")
    assert result.stdout == "reopened the log output: /var/log/sockd/sockd.log\n"
    assert json.loads(ask(daemon, "--json", "reopen-logs").stdout) == answer


def test_stats_reads_the_stats_endpoint(daemon: FakeServer) -> None:
    """`stats` shows GET /v1/stats humanised: bytes, durations, labelled breakdowns."""
    daemon.set("GET", "/v1/stats", Canned(body=STATS))
    result = ask(daemon, "stats")
    assert result.exit_code == 0
    rows = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert rows["sockd"].strip() == "version=0.1.0, mode=threading"
    assert rows["connections open"].strip() == "3"
    assert rows["bytes received"].strip() == "1.2 KiB"
    assert rows["reloads"].strip() == "3 (applied: 2, rejected: 1)"
    assert rows["uptime"].strip() == "3m 12s"
    starts = {
        len(line) - len(line.split(":", 1)[1].lstrip()) for line in result.stdout.splitlines()
    }
    assert len(starts) == 1  # every value starts in the same column


def test_stats_labels_the_thread_metrics(daemon: FakeServer) -> None:
    """`stats` shows sockd's thread metrics as `threads started` and `spare threads`."""
    answer = json.loads(json.dumps(STATS))
    for name, value in (("sockd_threads_started_total", 5), ("sockd_threads_spare", 2)):
        answer["metrics"].append(
            {"name": name, "kind": "gauge", "help": "", "samples": [{"labels": {}, "value": value}]}
        )
    daemon.set("GET", "/v1/stats", Canned(body=answer))
    result = ask(daemon, "stats")
    assert result.exit_code == 0
    rows = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert rows["threads started"].strip() == "5"
    assert rows["spare threads"].strip() == "2"
    assert "sockd_threads" not in result.stdout


def test_stats_json_is_the_daemons_answer(daemon: FakeServer) -> None:
    """`--json stats` prints GET /v1/stats's answer as it came (as --json does everywhere)."""
    daemon.set("GET", "/v1/stats", Canned(body=STATS))
    assert json.loads(ask(daemon, "--json", "stats").stdout) == STATS


def test_stats_refuses_an_answer_without_its_shape(daemon: FakeServer) -> None:
    """A stats answer whose metric lacks its samples is a one-line protocol error, exit 1."""
    daemon.set("GET", "/v1/stats", Canned(body={"metrics": [{"name": "x"}]}))
    result = ask(daemon, "stats")
    assert result.exit_code == 1
    assert result.stderr.startswith("sockctl: stats: the answer lacks")


def _stream(events: list[dict[str, Any]]) -> Callable[[Handler], None]:
    """A /v1/logs route: the events as chunked NDJSON, then the end of the stream."""

    def route(handler: Handler) -> None:
        handler.start_stream()
        for event in events:
            handler.chunk(json.dumps(event).encode() + b"\n")
        handler.chunk(b"")

    return route


def test_logs_prints_readable_lines(daemon: FakeServer) -> None:
    """`logs` asks for n=100 at debug and prints `time LEVEL event key=value` lines."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    result = ask(daemon, "logs")
    assert result.exit_code == 0
    first, second = result.stdout.splitlines()
    assert first.endswith(" INFO     conn.open peer=127.0.0.1:51234 id=17")
    assert second.endswith(' WARNING  conn.close id=17 reason="idle timeout"')
    assert daemon.seen[-1].query == {"n": ["100"], "level": ["debug"]}
    assert "\x1b[" not in result.stdout


def test_logs_colours_when_asked(daemon: FakeServer) -> None:
    """On a colour terminal the level is styled; --no-color turns that off."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    assert "\x1b[" in run("--socket", daemon.path, "logs", color=True).stdout
    assert "\x1b[" not in run("--socket", daemon.path, "--no-color", "logs", color=True).stdout


def test_logs_json_is_ndjson(daemon: FakeServer) -> None:
    """`logs --json` prints each event as one JSON line, and passes -n and --level on."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    result = ask(daemon, "logs", "--json", "-n", "2", "--level", "warning")
    assert [json.loads(line) for line in result.stdout.splitlines()] == EVENTS
    assert daemon.seen[-1].query == {"n": ["2"], "level": ["warning"]}


def test_logs_follow_prints_streamed_events(daemon: FakeServer) -> None:
    """`logs -f` sends follow=1 and prints both streamed events, exit 0 at the stream's end."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    result = ask(daemon, "logs", "-f")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2
    assert daemon.seen[-1].query["follow"] == ["1"]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_logs_follow_says_when_the_daemon_ends_the_stream(
    daemon: FakeServer, json_flag: list[str]
) -> None:
    """When the daemon ends a `logs -f` stream cleanly, one stderr line says so; exit 0."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    result = ask(daemon, "logs", "-f", *json_flag)
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2  # stdout keeps only the events
    assert result.stderr == "sockctl: sockd closed the log stream (stopped?)\n"


def test_logs_without_follow_ends_quietly(daemon: FakeServer) -> None:
    """Plain `logs` ends when the history does: nothing on stderr."""
    daemon.set("GET", "/v1/logs", _stream(EVENTS))
    result = ask(daemon, "logs")
    assert result.exit_code == 0
    assert result.stderr == ""


def test_logs_follow_broken_stream_exits_1(daemon: FakeServer) -> None:
    """A `logs -f` stream cut off without its last chunk is an error (exit 1), not an end."""

    def cut_off(handler: Handler) -> None:
        handler.start_stream()
        handler.chunk(json.dumps(EVENTS[0]).encode() + b"\n")
        handler.close_connection = True  # no terminating chunk: the daemon died

    daemon.set("GET", "/v1/logs", cut_off)
    result = ask(daemon, "logs", "-f")
    assert result.exit_code == 1
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.startswith("sockctl: the log stream from ")
    assert "closed the log stream" not in result.stderr


def test_logs_follow_waits_through_silence_longer_than_the_timeout(daemon: FakeServer) -> None:
    """A follow is not cut by the client's timeout: a quiet daemon is not a hung one."""

    def route(handler: Handler) -> None:
        handler.start_stream(close=True)  # http.client then drops its socket reference
        handler.chunk(json.dumps(EVENTS[0]).encode() + b"\n")
        time.sleep(1.0)  # sleep-ok: the quiet period under test, over 3 client timeouts
        handler.chunk(json.dumps(EVENTS[1]).encode() + b"\n")
        handler.chunk(b"")

    daemon.set("GET", "/v1/logs", route)
    with contextlib.closing(ControlClient(daemon.path, timeout=0.3).logs(follow=True)) as events:
        assert list(events) == EVENTS


def test_logs_without_follow_keeps_its_timeout(daemon: FakeServer) -> None:
    """Plain `logs` (history only) still gives up on a daemon that stops mid-answer."""
    release = threading.Event()

    def route(handler: Handler) -> None:
        handler.start_stream(close=True)
        handler.chunk(json.dumps(EVENTS[0]).encode() + b"\n")
        release.wait(DEADLINE)

    daemon.set("GET", "/v1/logs", route)
    try:
        result = run("--socket", daemon.path, "--timeout", "0.3", "logs")
    finally:
        release.set()
    assert result.exit_code == 1
    assert result.stderr == f"sockctl: sockd at {daemon.path} stopped sending logs\n"


def test_client_yields_each_event_as_it_arrives(daemon: FakeServer) -> None:
    """The client yields an event while the stream is still open, before the next exists."""
    go_on = threading.Event()
    gone = threading.Event()

    def route(handler: Handler) -> None:
        handler.start_stream()
        handler.chunk(json.dumps(EVENTS[0]).encode() + b"\n")
        go_on.wait(10)
        # An event split across chunks must still come out whole.
        line = json.dumps(EVENTS[1]).encode() + b"\n"
        handler.chunk(line[:10])
        handler.chunk(line[10:])
        if handler.wait_for_disconnect():
            gone.set()

    daemon.set("GET", "/v1/logs", route)
    events = ControlClient(daemon.path, timeout=5).logs(follow=True)
    assert next(events) == EVENTS[0]
    go_on.set()
    assert next(events) == EVENTS[1]
    events.close()
    assert gone.wait(5), "closing the generator must close the connection"


def test_logs_follow_ctrl_c_exits_0(daemon: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during `logs -f` ends quietly with exit 0 and closes the stream."""
    gone = threading.Event()

    def route(handler: Handler) -> None:
        handler.start_stream()
        for event in EVENTS:
            handler.chunk(json.dumps(event).encode() + b"\n")
        if handler.wait_for_disconnect():
            gone.set()

    daemon.set("GET", "/v1/logs", route)
    real_logs = ControlClient.logs

    def interrupted(self: ControlClient, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The real stream, then the operator's Ctrl-C after the second event."""
        with contextlib.closing(real_logs(self, **kwargs)) as events:
            yield next(events)
            yield next(events)
            raise KeyboardInterrupt

    monkeypatch.setattr(ControlClient, "logs", interrupted)
    result = ask(daemon, "logs", "-f")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2
    assert result.stderr == ""
    assert gone.wait(5)


# --- errors ---------------------------------------------------------------------------


def test_no_socket_file_exits_3_naming_the_path(sockdir: str) -> None:
    """A missing socket file exits 3 with one line naming the path tried."""
    path = os.path.join(sockdir, "missing.sock")
    result = run("--socket", path, "status")
    assert result.exit_code == 3
    assert result.stderr == f"sockctl: sockd is not running: no control socket ({path})\n"


def test_socket_nobody_listens_on_exits_3(sockdir: str) -> None:
    """A socket file nobody listens on (ECONNREFUSED) exits 3 naming the path."""
    path = os.path.join(sockdir, "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)  # bound, never listening: connect() is refused
        result = run("--socket", path, "status")
    assert result.exit_code == 3
    assert path in result.stderr
    assert "nothing is listening" in result.stderr


def test_socket_path_that_is_a_file_or_directory_exits_3(sockdir: str) -> None:
    """A --socket path that is a regular file or a directory says so (not "not running"), exit 3."""
    regular = os.path.join(sockdir, "control.sock")
    with open(regular, "w"):
        pass
    for path, kind in ((regular, "a regular file"), (sockdir, "a directory")):
        result = run("--socket", path, "status")
        assert result.exit_code == 3
        assert result.stderr == f"sockctl: {path} is not a socket ({kind})\n"


def test_forbidden_exits_4(daemon: FakeServer) -> None:
    """A 403 forbidden answer exits 4."""
    body = {"error": {"code": "forbidden", "message": "uid 1000 may only read"}}
    daemon.set("POST", "/v1/reload", Canned(403, body))
    result = ask(daemon, "reload")
    assert result.exit_code == 4
    assert result.stderr == "sockctl: permission denied by sockd: uid 1000 may only read\n"


def test_eacces_on_connect_exits_4(sockdir: str, daemon: FakeServer) -> None:
    """A socket the caller may not open (EACCES) exits 4, checked as an unprivileged user."""
    if os.geteuid() != 0:
        os.chmod(daemon.path, 0)
        result = ask(daemon, "status")
        assert result.exit_code == 4, result.stderr
        return
    # root passes every permission check: drop to nobody in a child process
    require_reachable_by_others()
    os.chmod(sockdir, 0o711)  # noqa: S103 - nobody must reach the socket, not open it
    os.chmod(daemon.path, 0o600)
    code = "import sys; from sockctl.cli import main; main(sys.argv[1:])"
    child = subprocess.run(
        [sys.executable, "-c", code, "--socket", daemon.path, "status"],
        user=65534,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )
    assert child.returncode == 4, child.stderr
    assert child.stderr.startswith(f"sockctl: permission denied connecting to {daemon.path}")


def test_connect_errors_map_to_their_exit_codes() -> None:
    """EACCES maps to PermissionDenied, ENOENT and ECONNREFUSED to NotRunning."""
    assert isinstance(_connect_error("/x", PermissionError(13, "denied")), PermissionDenied)
    assert isinstance(_connect_error("/x", FileNotFoundError(2, "no")), NotRunning)
    assert isinstance(_connect_error("/x", ConnectionRefusedError(111, "no")), NotRunning)
    assert _connect_error("/x", OSError(36, "File name too long")).exit_code == 3


def test_connect_refused_on_a_non_socket_is_not_a_socket(sockdir: str) -> None:
    """ECONNREFUSED on a path that is no socket maps to NotASocket, still a NotRunning (3)."""
    error = _connect_error(sockdir, ConnectionRefusedError(111, "refused"))
    assert isinstance(error, NotASocket)
    assert isinstance(error, NotRunning)
    assert error.exit_code == 3
    assert error.kind == "a directory"


@pytest.mark.parametrize("version", [None, "2", "one"])
def test_missing_or_other_api_version_exits_5(daemon: FakeServer, version: str | None) -> None:
    """An answer without X-Sockd-Api-Version, or with another value, exits 5."""
    daemon.set("GET", "/v1/status", Canned(body=STATUS, version=version))
    result = ask(daemon, "status")
    assert result.exit_code == 5
    assert len(result.stderr.splitlines()) == 1


def test_version_is_checked_before_the_error(daemon: FakeServer) -> None:
    """Even an error answer is refused when its API version differs (exit 5, not 1)."""
    body = {"error": {"code": "conflict", "message": "x"}}
    daemon.set("POST", "/v1/pause", Canned(409, body, version="2"))
    assert ask(daemon, "pause").exit_code == 5


def test_garbage_answer_exits_1(daemon: FakeServer) -> None:
    """Bytes that are not HTTP at all exit 1 with one line."""

    def garbage(handler: Handler) -> None:
        handler.wfile.write(b"hello, I am not HTTP\r\n\r\n")
        handler.close_connection = True

    daemon.set("GET", "/v1/status", garbage)
    result = ask(daemon, "status")
    assert result.exit_code == 1
    assert result.stderr.startswith("sockctl: no valid answer from")
    assert len(result.stderr.splitlines()) == 1


def test_non_json_body_exits_1(daemon: FakeServer) -> None:
    """A well-formed HTTP answer whose body is not JSON exits 1."""
    daemon.set("GET", "/v1/status", Canned(body="<html>oops</html>", content_type="text/html"))
    result = ask(daemon, "status")
    assert result.exit_code == 1
    assert "not JSON" in result.stderr


def test_error_without_error_object_exits_1(daemon: FakeServer) -> None:
    """An error status without the API's error object is a protocol error, exit 1."""
    daemon.set("GET", "/v1/status", Canned(500, {"oops": True}))
    result = ask(daemon, "status")
    assert result.exit_code == 1
    assert "without the control API's error object" in result.stderr


def test_no_answer_in_time_exits_1(daemon: FakeServer) -> None:
    """A daemon that accepts but never answers fails after --timeout, exit 1."""
    release = threading.Event()
    daemon.set("GET", "/v1/status", lambda handler: release.wait(5) and None)
    try:
        result = ask(daemon, "--timeout", "0.2", "status")
    finally:
        release.set()
    assert result.exit_code == 1
    assert "did not answer within 0.2s" in result.stderr


def test_unexpected_errors_are_one_line(
    daemon: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in sockctl prints one `sockctl:` line and exits 1, never a traceback."""

    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli.render, "status_view", broken)
    result = ask(daemon, "status")
    assert result.exit_code == 1
    assert result.stderr == "sockctl: unexpected error: RuntimeError: boom (a bug in sockctl)\n"


# --- where the socket is --------------------------------------------------------------


def test_socket_option_beats_config_and_env(daemon: FakeServer, sockdir: str) -> None:
    """--socket wins over --config and $SOCKD_CONTROL_SOCKET."""
    config = write_config(sockdir, os.path.join(sockdir, "wrong1.sock"))
    env = {CONTROL_SOCKET_ENV: os.path.join(sockdir, "wrong2.sock")}
    result = run("--socket", daemon.path, "--config", config, "status", env=env)
    assert result.exit_code == 0, result.stderr


def test_empty_socket_option_is_a_usage_error(daemon: FakeServer) -> None:
    """`--socket ''` exits 2 with one line instead of falling back to another socket."""
    result = run("--socket", "", "status", env={CONTROL_SOCKET_ENV: daemon.path})
    assert result.exit_code == 2
    assert result.stderr == "sockctl: --socket needs a path, got an empty string\n"
    assert daemon.seen == []


def test_config_option_beats_env(daemon: FakeServer, sockdir: str) -> None:
    """--config's control.socket wins over $SOCKD_CONTROL_SOCKET."""
    config = write_config(sockdir, daemon.path)
    env = {CONTROL_SOCKET_ENV: os.path.join(sockdir, "wrong.sock")}
    result = run("--config", config, "status", env=env)
    assert result.exit_code == 0, result.stderr


def test_env_beats_default(daemon: FakeServer) -> None:
    """$SOCKD_CONTROL_SOCKET is used when neither --socket nor --config is given."""
    assert run("status", env={CONTROL_SOCKET_ENV: daemon.path}).exit_code == 0


def test_default_socket_path_is_tried_last() -> None:
    """With nothing set, sockctl tries /run/sockd/control.sock and names it."""
    if os.path.exists(DEFAULT_CONTROL_SOCKET):
        pytest.skip(f"a real control socket exists at {DEFAULT_CONTROL_SOCKET}")
    result = run("status")
    assert result.exit_code == 3
    assert DEFAULT_CONTROL_SOCKET in result.stderr


def test_unparsable_config_option_exits_78(sockdir: str) -> None:
    """A --config file that is not TOML exits 78 in one line naming the line and column."""
    path = os.path.join(sockdir, "bad.toml")
    with open(path, "w") as fh:
        fh.write('[server]\nmode = "threading"\n[control\n')
    result = run("--config", path, "status")
    assert result.exit_code == 78
    assert result.stderr == (
        f"sockctl: {path}: TOML syntax error at line 3, column 9: Expected ']' at the end "
        "of a table declaration (sockctl reads only control.socket from it; --socket PATH "
        "does without it)\n"
    )


def test_unreadable_config_option_exits_78_in_one_line(sockdir: str) -> None:
    """A --config file that cannot be read exits 78 in one line saying why."""
    path = os.path.join(sockdir, "missing.toml")
    result = run("--config", path, "status")
    assert result.exit_code == 78
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"sockctl: {path}: cannot read it: No such file or directory")


def test_socket_option_skips_a_broken_config_file(sockdir: str, daemon: FakeServer) -> None:
    """With --socket, a --config file with a syntax error is not read: status works."""
    path = os.path.join(sockdir, "broken.toml")
    with open(path, "w") as fh:
        fh.write("[control]\nsocket = /unquoted\n")
    result = run("--socket", daemon.path, "--config", path, "status")
    assert result.exit_code == 0, result.stderr


def test_config_option_reads_only_the_socket(sockdir: str, daemon: FakeServer) -> None:
    """Errors elsewhere in a --config file do not stop sockctl reaching the daemon.

    That is what lets `systemctl reload` deliver a bad file to the daemon, which
    rejects it and logs reload.rejected.
    """
    path = os.path.join(sockdir, "semantic.toml")
    with open(path, "w") as fh:
        fh.write(f'[server]\nmode = "sideways"\n[control]\nsocket = "{daemon.path}"\n')
    assert run("--config", path, "status").exit_code == 0


def test_config_relative_socket_is_taken_from_the_config_directory(
    sockdir: str, daemon: FakeServer
) -> None:
    """A relative control.socket means the same file to sockctl as to sockd: next to the
    config, wherever sockctl runs from."""
    assert os.path.dirname(daemon.path) == sockdir
    assert os.getcwd() != sockdir
    path = write_config(sockdir, os.path.basename(daemon.path), name="relative.toml")
    assert run("--config", path, "status").exit_code == 0


# --- check ----------------------------------------------------------------------------


def test_check_good_file(sockdir: str) -> None:
    """`check FILE` on a valid file prints `FILE: OK` and exits 0."""
    path = write_config(sockdir, "/run/sockd/control.sock")
    result = run("check", path)
    assert result.exit_code == 0
    assert result.stdout == f"{path}: OK\n"


def test_check_bad_file_lists_every_problem(sockdir: str) -> None:
    """`check FILE` relays sockd's problems (one a line, on stderr) and its exit 78."""
    path = os.path.join(sockdir, "bad.toml")
    with open(path, "w") as fh:
        fh.write('[server]\nmode = "sideways"\nbogus = 1\n')
    result = run("check", path)
    assert result.exit_code == 78
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"sockd: {path}: server.") for line in lines)


def test_check_json_and_config_default(sockdir: str) -> None:
    """`--config FILE --json check` checks that file and prints path, ok and problems."""
    path = os.path.join(sockdir, "missing.toml")
    result = run("--config", path, "--json", "check")
    assert result.exit_code == 78
    answer = json.loads(result.stdout)
    assert answer["path"] == path
    assert answer["ok"] is False
    assert answer["problems"][0].startswith("cannot read config file")


def test_check_relays_what_sockd_says(sockdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`check` runs sockd --check-config --config FILE and relays its output and status."""
    script = "import sys; print('out', sys.argv[1:]); print('err', file=sys.stderr); sys.exit(42)"
    monkeypatch.setattr(cli, "sockd_command", lambda: [sys.executable, "-c", script])
    result = run("check", "/x.toml")
    assert result.exit_code == 42
    assert result.stdout == "out ['--check-config', '--config', '/x.toml']\n"
    assert result.stderr == "err\n"


def test_check_without_sockd(monkeypatch: pytest.MonkeyPatch) -> None:
    """`check` with no sockd executable to run says so in one line and exits 1."""
    monkeypatch.setattr(cli, "sockd_command", lambda: None)
    result = run("check", "/x.toml")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("sockctl: cannot check: no sockd executable")


def test_sockd_command_is_the_one_beside_the_interpreter() -> None:
    """sockctl runs the sockd installed beside its own Python when there is one."""
    beside = os.path.join(os.path.dirname(sys.executable), "sockd")
    if not os.access(beside, os.X_OK):
        pytest.skip(f"no sockd beside {sys.executable} (pip install -e .)")
    assert cli.sockd_command() == [beside]


@pytest.mark.parametrize("command", ["", *sorted(cli.main.commands)])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_everywhere(command: str, flag: str) -> None:
    """`-h` and `--help` print help for sockctl and for every command, exit 0."""
    args = [command, flag] if command else [flag]
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    usage = result.stdout.splitlines()[0]  # CliRunner names the program "main"
    assert usage.startswith(f"Usage: main {command} ".replace("  ", " "))
    assert "-h, --help" in result.stdout


def test_version_option() -> None:
    """`--version` names sockctl, its version and the control API version."""
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == "sockctl 0.1.0 (control API v1)\n"


def test_sockd_version_has_the_same_shape() -> None:
    """`sockd --version` reads like sockctl's: name, version, control API version."""
    result = CliRunner().invoke(sockd_cli.main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == "sockd 0.1.0 (control API v1)\n"


#: Each command with the arguments and canned answers it needs to succeed.
JSON_CASES: dict[str, tuple[list[str], dict[tuple[str, str], Route]]] = {
    "status": ([], {}),
    "connections": ([], {}),
    "kick": (["17"], {("DELETE", "/v1/connections/17"): Canned(body={"closed": 17})}),
    "config": ([], {}),
    "reload": (
        [],
        {
            ("POST", "/v1/reload"): Canned(
                body={"result": "applied", "generation": 2, "changes": []}
            )
        },
    ),
    "stop": (
        [],
        {("POST", "/v1/stop"): Canned(202, {"state": "draining", "timeout": 5.0, "active": 0})},
    ),
    "pause": ([], {("POST", "/v1/pause"): Canned(body={"state": "paused"})}),
    "resume": ([], {("POST", "/v1/resume"): Canned(body={"state": "running"})}),
    "log-level": (
        ["warn"],
        {("PUT", "/v1/log-level"): Canned(body={"level": "warning", "previous": "info"})},
    ),
    "reopen-logs": (
        [],
        {("POST", "/v1/reopen-logs"): Canned(body={"reopened": True, "output": "/var/log/x"})},
    ),
    "stats": ([], {("GET", "/v1/stats"): Canned(body=STATS)}),
    "logs": ([], {("GET", "/v1/logs"): _stream(EVENTS)}),
    "check": (["CONFIG"], {}),
}


def test_json_cases_cover_every_command() -> None:
    """The --json-after-the-command test below knows every sockctl command."""
    assert set(JSON_CASES) == set(cli.main.commands)


@pytest.mark.parametrize("command", sorted(JSON_CASES))
def test_json_after_the_command(daemon: FakeServer, sockdir: str, command: str) -> None:
    """`sockctl COMMAND --json` prints the same JSON as `sockctl --json COMMAND`."""
    args, routes = JSON_CASES[command]
    args = [write_config(sockdir, daemon.path) if a == "CONFIG" else a for a in args]
    for (method, path), route in routes.items():
        daemon.set(method, path, route)
    before = ask(daemon, "--json", command, *args)
    after = ask(daemon, command, *args, "--json")
    assert after.exit_code == before.exit_code == 0, after.stderr
    assert after.stdout == before.stdout
    if command == "logs":  # NDJSON: one event per line
        assert [json.loads(line) for line in after.stdout.splitlines()] == EVENTS
    else:
        json.loads(after.stdout)  # one JSON document


def test_client_raises_typed_errors_without_printing(sockdir: str, capsys: Any) -> None:
    """The client raises SockctlError subclasses and prints nothing itself."""
    with pytest.raises(NotRunning) as info:
        ControlClient(os.path.join(sockdir, "x.sock")).status()
    assert info.value.exit_code == 3
    assert capsys.readouterr() == ("", "")


# --- issue 9: bounded numbers, dropped events, untrusted daemons ----------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("stop", "--timeout", "1e303"), "--timeout must be a number of seconds from 0 to 86400"),
        (("stop", "--timeout", "inf"), "--timeout must be a number of seconds from 0 to 86400"),
        (("stop", "--timeout", "nan"), "--timeout must be a number of seconds from 0 to 86400"),
        (("stop", "--timeout", "-0.1"), "--timeout must be a number of seconds from 0 to 86400"),
        (("--timeout", "1e303", "status"), "--timeout must be a number of seconds above 0"),
        (("--timeout", "0", "status"), "--timeout must be a number of seconds above 0"),
        (("logs", "-n", "100001"), "--lines must be an integer from 0 to 100000"),
        (("logs", "-n", "-1"), "--lines must be an integer from 0 to 100000"),
        (("kick", "9223372036854775808"), "an integer up to 9223372036854775807"),
    ],
)
def test_numbers_out_of_range_are_one_line_usage_errors(
    daemon: FakeServer, args: tuple[str, ...], named: str
) -> None:
    """A number the daemon would refuse exits 2 with one `sockctl:` line; nothing is sent."""
    result = ask(daemon, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("sockctl: ") and result.stderr.count("\n") == 1
    assert named in result.stderr
    assert daemon.seen == []


def test_stop_timeout_of_exactly_a_day_is_sent(daemon: FakeServer) -> None:
    """The top of the range (86400 s) is a valid stop timeout."""
    answer = {"state": "draining", "timeout": 86400.0, "active": 0}
    daemon.set("POST", "/v1/stop", Canned(202, answer))
    assert ask(daemon, "stop", "--timeout", "86400").exit_code == 0
    assert daemon.seen[-1].json() == {"timeout": 86400.0}


DROPPED = {
    "timestamp": "2026-11-27T10:00:03.100000Z",
    "level": "warning",
    "event": "logs.dropped",
    "missed": 1500,
}


def test_logs_follow_shows_where_events_were_dropped(daemon: FakeServer) -> None:
    """A logs.dropped line in the stream is one notice line between the events around it;
    --json passes it through unchanged."""
    daemon.set("GET", "/v1/logs", _stream([EVENTS[0], DROPPED, EVENTS[1]]))
    result = ask(daemon, "logs", "-f")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[1].endswith(
        "-- 1,500 log events missed here: this stream fell behind sockd's log --"
    )
    as_json = ask(daemon, "logs", "-f", "--json")
    assert json.loads(as_json.stdout.splitlines()[1]) == DROPPED


def test_state_changes_say_their_body_is_empty(daemon: FakeServer) -> None:
    """A POST or DELETE without a body carries Content-Length: 0, so the daemon need not
    wait to see whether a body follows."""
    daemon.set("POST", "/v1/pause", Canned(body={"state": "paused"}))
    daemon.set("DELETE", "/v1/connections/17", Canned(body={"closed": 17}))
    assert ask(daemon, "pause").exit_code == 0
    assert ask(daemon, "kick", "17").exit_code == 0
    assert [s.headers.get("Content-Length") for s in daemon.seen] == ["0", "0"]
