"""The control channel end to end: the real sockd subprocess driven by the real ``sockctl``.

In-process HTTP-layer tests with a fake backend live in tests/integration/test_control.py
and sockctl against a fake server in tests/unit/test_sockctl_cli.py; here every endpoint
and every command goes through the installed ``sockctl`` executable (or curl) to a daemon
started with ``python -m sockd``, and the effect is checked where an operator would see
it: the data plane, the daemon's log lines, its exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sockctl.client import UnixHTTPConnection
from sockd.protocol import METRICS
from tests.conftest import (
    DEADLINE,
    REPO,
    SockdProcess,
    base_config,
    children_of,
    connect,
    recv_exactly,
    recv_line,
    render_config,
    require_reachable_by_others,
    system_group,
)

_T = TypeVar("_T")


def _find_sockctl() -> str | None:
    """The installed ``sockctl`` script next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "sockctl"
    if beside.exists():
        return str(beside)
    return shutil.which("sockctl")


SOCKCTL = _find_sockctl()
pytestmark = pytest.mark.skipif(
    SOCKCTL is None, reason="the sockctl command is not installed (pip install -e .)"
)

READ_GROUP = "sockd-e2e-read"


# --------------------------------------------------------------------------- helpers


def sockctl(
    *args: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``sockctl`` executable; ``prefix`` runs it through setpriv."""
    assert SOCKCTL is not None
    full_env = {k: v for k, v in os.environ.items() if k != "SOCKD_CONTROL_SOCKET"}
    # sockctl check runs sockd --check-config, which imports the handler: tests.handlers
    # must resolve.
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [*prefix, SOCKCTL, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd="/",  # readable by every uid the permission tests switch to
        timeout=timeout,
        check=False,
    )


def ctl(tmp: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``sockctl --socket TMP/ctl.sock ARGS``."""
    return sockctl("--socket", str(tmp / "ctl.sock"), *args, **kwargs)


def ctl_json(tmp: Path, *args: str) -> Any:
    """``sockctl --json ARGS``, which must succeed; its stdout parsed."""
    result = ctl(tmp, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def poll_until(check: Callable[[], _T | None], what: str, timeout: float = DEADLINE) -> _T:
    """Poll an observable condition (a log file's content) until true or the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # sleep-ok: poll period of a deadline-bound wait


def echo(sock: socket.socket, payload: bytes) -> None:
    """One echo round trip that must come back whole."""
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def label(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def conn_by_port(tmp: Path, port: int) -> dict[str, Any]:
    """The daemon's entry for the connection whose client side uses ``port``."""
    listed = ctl_json(tmp, "connections")["connections"]
    matches = [c for c in listed if c["peer"] == f"127.0.0.1:{port}"]
    assert len(matches) == 1, listed
    entry: dict[str, Any] = matches[0]
    return entry


def http(path: Path, method: str, target: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    """One raw HTTP request over the control socket: status, headers, decoded JSON body."""
    conn = UnixHTTPConnection(str(path), DEADLINE)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        conn.request(method, target, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data)
    finally:
        conn.close()


def close_event(proc: SockdProcess, conn_id: int) -> dict[str, Any]:
    return proc.wait_for("conn.close", lambda e: e.get("conn_id") == conn_id)


def require_curl() -> str:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    return curl


def require_root_and_nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root: runs sockctl as the unprivileged user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    require_reachable_by_others()
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")


def as_nobody(nobody: pwd.struct_passwd, groups: Sequence[int] = ()) -> list[str]:
    """A setpriv prefix running the command as nobody with exactly ``groups`` added."""
    group_opt = "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"
    return [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        group_opt,
    ]


# --------------------------------------------------------------------------- status


def test_status_human_and_json(sockd_factory: Any, short_tmp: Path) -> None:
    """``status`` shows running, the listen address, generation and the daemon's own pid."""
    proc = sockd_factory()
    (address,) = proc.wait_ready()
    result = ctl(short_tmp, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sockd ") and f"(pid {proc.pid}): running" in lines[0]
    assert re.search(rf"^\s*listen:\s+{re.escape(label(address))}$", result.stdout, re.M)
    assert re.search(r"^\s*config:\s+.*\(generation 1\)$", result.stdout, re.M)
    status = ctl_json(short_tmp, "status")
    assert status["state"] == "running"
    assert status["pid"] == proc.pid
    assert status["listen"] == [label(address)]
    assert status["generation"] == 1
    assert status["api_version"] == 1
    assert status["config_path"] == str(proc.config_path)
    assert status["connections"] == {"active": 0, "total": 0, "refused": 0}


def test_socket_path_from_config_and_environment(sockd_factory: Any, short_tmp: Path) -> None:
    """The socket comes from ``--socket`` > ``--config`` > ``$SOCKD_CONTROL_SOCKET``."""
    proc = sockd_factory()
    proc.wait_ready()
    real = str(short_tmp / "ctl.sock")
    bogus = str(short_tmp / "nobody-here.sock")
    by_env = sockctl("--json", "status", env={"SOCKD_CONTROL_SOCKET": real})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["pid"] == proc.pid
    by_config = sockctl(
        "--config",
        str(proc.config_path),
        "--json",
        "status",
        env={"SOCKD_CONTROL_SOCKET": bogus},
    )
    assert by_config.returncode == 0, by_config.stderr
    assert json.loads(by_config.stdout)["pid"] == proc.pid
    by_socket = sockctl("--socket", bogus, "--config", str(proc.config_path), "status")
    assert by_socket.returncode == 3
    assert bogus in by_socket.stderr


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_connections_have_live_byte_counts(sockd_factory: Any, short_tmp: Path, mode: str) -> None:
    """Byte counts of an open connection grow as it exchanges; forking mode names the child."""
    proc = sockd_factory(base_config(short_tmp, mode=mode))
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        port = sock.getsockname()[1]
        echo(sock, b"a" * 100)
        first = conn_by_port(short_tmp, port)
        assert first["bytes_in"] == 100
        assert first["bytes_out"] == 100
        assert first["listen"] == label(address)
        echo(sock, b"b" * 5000)
        second = conn_by_port(short_tmp, port)
        assert second["id"] == first["id"]
        assert second["bytes_in"] == 5100
        assert second["bytes_out"] == 5100
        assert second["age_s"] >= first["age_s"]
        if mode == "forking":
            assert isinstance(first["pid"], int)
            assert first["pid"] != proc.pid
            assert first["pid"] in children_of(proc.pid)
            opened = proc.wait_for("conn.open", lambda e: e["conn_id"] == first["id"])
            assert opened["pid"] == first["pid"]
        else:
            assert first["pid"] is None
        table = ctl(short_tmp, "connections")
        assert table.returncode == 0, table.stderr
        header, row, footer = table.stdout.splitlines()
        assert header.split() == ["ID", "PEER", "LISTEN", "AGE", "IN", "OUT", "PID"]
        cells = row.split()
        assert cells[0] == str(first["id"])
        assert cells[1] == f"127.0.0.1:{port}"
        assert cells[-1] == (str(first["pid"]) if mode == "forking" else "-")
        assert footer == "1 connection"
    close = close_event(proc, first["id"])
    assert (close["bytes_in"], close["bytes_out"]) == (5100, 5100)
    assert ctl_json(short_tmp, "connections") == {"connections": []}


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_kick_closes_exactly_that_connection(
    sockd_factory: Any, short_tmp: Path, mode: str
) -> None:
    """``kick ID`` ends that connection (the client reads EOF, ended=kicked), no other."""
    proc = sockd_factory(base_config(short_tmp, mode=mode))
    (address,) = proc.wait_ready()
    victim, bystander = connect(address), connect(address)
    try:
        echo(victim, b"v")
        echo(bystander, b"b")
        victim_id = conn_by_port(short_tmp, victim.getsockname()[1])["id"]
        bystander_port = bystander.getsockname()[1]
        result = ctl(short_tmp, "kick", str(victim_id))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"closed connection {victim_id}"
        assert victim.recv(16) == b""
        assert close_event(proc, victim_id)["ended"] == "kicked"
        echo(bystander, b"still served")
        remaining = ctl_json(short_tmp, "connections")["connections"]
        assert [c["peer"] for c in remaining] == [f"127.0.0.1:{bystander_port}"]
    finally:
        victim.close()
        bystander.close()
    unknown = ctl(short_tmp, "--json", "kick", "999999")
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout)["error"]["code"] == "not_found"
    assert unknown.stderr.startswith("sockctl: ") and "999999" in unknown.stderr


def test_kick_by_peer_closes_that_address_only(sockd_factory: Any, short_tmp: Path) -> None:
    """``kick --peer 127.0.0.2`` ends both connections from that address and no other;
    ``connections --peer`` lists by address or network."""
    proc = sockd_factory(base_config(short_tmp))
    (address,) = proc.wait_ready()
    socks = [
        socket.create_connection(address, timeout=DEADLINE, source_address=(source, 0))
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.1")
    ]
    try:
        for sock in socks:
            echo(sock, b"x")
        listed = ctl_json(short_tmp, "connections", "--peer", "127.0.0.2")["connections"]
        assert sorted(c["peer"].rsplit(":", 1)[0] for c in listed) == ["127.0.0.2"] * 2
        assert len(ctl_json(short_tmp, "connections", "--peer", "127.0.0.0/8")["connections"]) == 3
        result = ctl(short_tmp, "kick", "--peer", "127.0.0.2")
        assert result.returncode == 0, result.stderr
        assert sorted(result.stdout.splitlines()) == sorted(
            f"closed connection {c['id']}" for c in listed
        )
        for sock in socks[:2]:
            assert sock.recv(16) == b""
        for conn in listed:
            assert close_event(proc, conn["id"])["ended"] == "kicked"
        echo(socks[2], b"still served")
    finally:
        for sock in socks:
            sock.close()


# --------------------------------------------------------------------------- config, reload


def test_config_prints_effective_toml_and_json(sockd_factory: Any, short_tmp: Path) -> None:
    """``config`` prints valid sockd TOML of the effective settings; ``--json`` the raw dump."""
    config = base_config(short_tmp, handler="tests.handlers:PlainEcho", shutdown_timeout=7)
    proc = sockd_factory(config)
    proc.wait_ready()
    result = ctl(short_tmp, "config")
    assert result.returncode == 0, result.stderr
    parsed = tomllib.loads(result.stdout)
    assert parsed["server"]["handler"] == "tests.handlers:PlainEcho"
    assert parsed["server"]["shutdown_timeout"] == 7
    assert parsed["control"]["socket"] == str(short_tmp / "ctl.sock")
    assert "# group is not set" in result.stdout
    dumped = short_tmp / "dumped.toml"
    dumped.write_text(result.stdout)
    check = sockctl("check", str(dumped))
    assert check.returncode == 0, check.stdout
    dump = ctl_json(short_tmp, "config")
    assert dump["path"] == str(proc.config_path)
    assert dump["generation"] == 1
    assert dump["config"]["server"]["handler"] == "tests.handlers:PlainEcho"
    assert dump["config"]["logging"]["level"] == "debug"


def test_reload_prints_changes_and_rejects_with_every_error(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """``reload`` lists each change; an invalid file exits 78 listing every problem, no change."""
    config = base_config(short_tmp)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    config["logging"]["level"] = "info"
    config["server"]["shutdown_timeout"] = 7
    proc.config_path.write_text(render_config(config))
    result = ctl(short_tmp, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "reload applied: generation 2, 2 changes",
        "  server.shutdown_timeout: 5.0 -> 7.0",
        '  logging.level: "debug" -> "info"',
    ]
    assert proc.wait_for("reload.applied")["generation"] == 2
    unchanged = ctl_json(short_tmp, "reload")
    assert unchanged == {"result": "applied", "generation": 3, "changes": []}

    proc.config_path.write_text(
        render_config(
            {
                "server": {"listen": ["nonsense"], "mode": "forked"},
                "logging": {"level": "loud"},
                "control": {"socket": str(short_tmp / "ctl.sock")},
            }
        )
    )
    mark = proc.mark()
    # As an operator would: --config names the file just edited, errors and all.
    rejected = sockctl("--config", str(proc.config_path), "reload")
    assert rejected.returncode == 78
    err = rejected.stderr.splitlines()
    assert err[0].startswith("sockctl: reload rejected, sockd keeps its current configuration")
    problems = [line.removeprefix("sockctl:").strip() for line in err[1:]]
    assert len(problems) == 3, err
    assert any(p.startswith("server.listen:") and "nonsense" in p for p in problems)
    assert any(p.startswith("server.mode:") and "forked" in p for p in problems)
    assert any(p.startswith("logging.level:") and "loud" in p for p in problems)
    assert len(proc.wait_for("reload.rejected", start=mark)["errors"]) == 3
    as_json = ctl(short_tmp, "--json", "reload")
    assert as_json.returncode == 78
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == "invalid_config"
    assert len(error["details"]["errors"]) == 3
    status = ctl_json(short_tmp, "status")
    assert status["state"] == "running"
    assert status["generation"] == 3
    assert status["log_level"] == "info"
    assert status["last_reload"]["result"] == "rejected"
    with connect(address) as sock:
        echo(sock, b"still serving")


def test_reload_dry_run_shows_changes_and_problems_and_applies_nothing(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """``reload --dry-run`` validates the daemon's file and lists what would change; the
    running config, generation and reload counters stay as they were."""
    config = base_config(short_tmp)
    proc = sockd_factory(config)
    proc.wait_ready()
    config["logging"]["level"] = "warning"
    proc.config_path.write_text(render_config(config))
    result = ctl(short_tmp, "reload", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "dry run: the config file is valid; a reload would apply 1 change:",
        '  logging.level: "debug" -> "warning"',
    ]
    assert ctl_json(short_tmp, "reload", "--dry-run") == {
        "result": "valid",
        "generation": 1,
        "changes": [{"key": "logging.level", "old": "debug", "new": "warning"}],
    }
    config["logging"]["level"] = "loud"
    proc.config_path.write_text(render_config(config))
    bad = ctl(short_tmp, "reload", "--dry-run")
    assert bad.returncode == 78
    err = bad.stderr.splitlines()
    assert err[0] == "sockctl: dry run: the config file has 1 problem; nothing was applied:"
    assert err[1].removeprefix("sockctl:").strip().startswith("logging.level:")
    status = ctl_json(short_tmp, "status")
    assert (status["generation"], status["log_level"], status["last_reload"]) == (1, "debug", None)
    assert proc.all("reload.applied") == [] and proc.all("reload.rejected") == []


def test_reload_reports_control_mode_as_written(sockd_factory: Any, short_tmp: Path) -> None:
    """A control.mode change reads as the octal string the config and ``config`` use."""
    config = base_config(short_tmp)
    config["control"]["mode"] = "0666"
    proc = sockd_factory(config)
    proc.wait_ready()
    assert ctl_json(short_tmp, "config")["config"]["control"]["mode"] == "0666"
    config["control"]["mode"] = "0660"
    proc.config_path.write_text(render_config(config))
    result = ctl(short_tmp, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ['  control.mode: "0666" -> "0660"']


# --------------------------------------------------------------------------- stop


def test_stop_is_answered_202_before_exit_and_drains(sockd_factory: Any, short_tmp: Path) -> None:
    """POST /v1/stop answers 202 while a connection holds the drain open; the drain finishes it."""
    proc = sockd_factory(
        base_config(short_tmp, handler="tests.handlers:Silent", shutdown_timeout=20)
    )
    (address,) = proc.wait_ready()
    held = connect(address)
    proc.wait_for("test.blocked")
    status, headers, body = http(short_tmp / "ctl.sock", "POST", "/v1/stop", {"timeout": 15})
    assert status == 202
    assert headers["X-Sockd-Api-Version"] == "1"
    assert body == {"state": "draining", "timeout": 15.0, "active": 1, "supervisor": None}
    assert proc.proc.poll() is None  # answered before the process exits
    stopping = proc.wait_for("server.stopping")
    assert stopping["active"] == 1
    assert stopping["timeout_s"] == 15.0
    assert ctl_json(short_tmp, "status")["state"] == "draining"
    with pytest.raises(OSError):
        connect(address, timeout=2).close()  # the drain refuses new connections at once
    paused = ctl(short_tmp, "pause")
    assert paused.returncode == 1
    assert "draining" in paused.stderr
    reloaded = ctl(short_tmp, "reload")
    assert reloaded.returncode == 1
    assert "stopping" in reloaded.stderr
    held.close()  # the Silent handler sees EOF and returns: the drain ends by itself
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert (stopped["finished"], stopped["cut"]) == (1, 0)


def test_a_second_stop_reports_the_drain_and_cuts_nothing(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Re-running ``sockctl stop`` during a drain (a script's retry) reports the drain in
    progress, with its own timeout, and leaves open connections to finish."""
    proc = sockd_factory(
        base_config(short_tmp, handler="tests.handlers:ReplyOnLine", shutdown_timeout=60)
    )
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        proc.wait_for("test.blocked")
        first = ctl_json(short_tmp, "stop", "--timeout", "40")
        assert (first["state"], first["timeout"], first["active"]) == ("draining", 40, 1)
        proc.wait_for("server.stopping")
        second = ctl_json(short_tmp, "stop", "--timeout", "1")
        assert (second["state"], second["timeout"], second["active"]) == ("draining", 40, 1)
        sock.sendall(b"finish\n")
        assert recv_line(sock) == b"done:finish\n"
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert (stopped["finished"], stopped["cut"]) == (1, 0)


def test_two_racing_stops_both_report_the_stop_in_force(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Two stops sent at once (no ordering between them) both answer with the timeout
    the drain actually uses: the first the daemon took."""
    proc = sockd_factory(
        base_config(short_tmp, handler="tests.handlers:ReplyOnLine", shutdown_timeout=60)
    )
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        proc.wait_for("test.blocked")
        answers: list[dict[str, Any]] = []
        barrier = threading.Barrier(2, timeout=DEADLINE)

        def stop(timeout: int) -> None:
            barrier.wait()
            answers.append(ctl_json(short_tmp, "stop", "--timeout", str(timeout)))

        threads = [threading.Thread(target=stop, args=(t,)) for t in (40, 30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE * 2)
        in_force = proc.wait_for("server.stopping")["timeout_s"]
        assert in_force in (40, 30)
        assert [a["timeout"] for a in answers] == [in_force, in_force]
        sock.sendall(b"finish\n")
        assert recv_line(sock) == b"done:finish\n"
    assert proc.wait_exit() == 0


def test_stop_command_on_an_idle_daemon(sockd_factory: Any, short_tmp: Path) -> None:
    """``sockctl stop`` gets its answer even though an idle daemon exits at once, status 0."""
    proc = sockd_factory()
    proc.wait_ready()
    result = ctl(short_tmp, "stop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sockd is stopping: no open connections"
    assert proc.wait_exit() == 0
    assert proc.wait_for("server.stopping")["source"] == "control"
    assert not (short_tmp / "ctl.sock").exists()


def test_stop_wait_returns_after_the_daemon_is_gone(sockd_factory: Any, short_tmp: Path) -> None:
    """``stop --timeout 1 --wait`` cuts a never-ending connection and returns once sockd exited."""
    proc = sockd_factory(
        base_config(short_tmp, handler="tests.handlers:Silent", shutdown_timeout=30)
    )
    (address,) = proc.wait_ready()
    held = connect(address)
    proc.wait_for("test.blocked")
    began = time.monotonic()
    result = ctl(short_tmp, "stop", "--timeout", "1", "--wait")
    elapsed = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "sockd stopped"
    assert proc.proc.poll() == 0  # already exited when sockctl returned
    assert 1.0 <= elapsed < 10.0  # the 1 s override, not the configured 30 s
    assert held.recv(16) == b""
    held.close()
    proc.wait_exit()
    stopped = proc.wait_for("server.stopped")
    assert (stopped["finished"], stopped["cut"]) == (0, 1)
    assert proc.wait_for("conn.close")["ended"] == "drain_deadline"


# --------------------------------------------------------------------------- pause


def test_pause_holds_new_connections_and_resume_serves_them(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """While paused a new connection waits unserved in the backlog; in-flight ones continue."""
    config = base_config(short_tmp)
    config["logging"]["level"] = "info"
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    in_flight = connect(address)
    echo(in_flight, b"before")
    result = ctl(short_tmp, "pause")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sockd is paused")
    proc.wait_for("server.paused")
    assert ctl_json(short_tmp, "status")["state"] == "paused"
    newcomer = connect(address)  # the kernel completes the handshake into the backlog
    newcomer.sendall(b"waiting")
    listed = ctl_json(short_tmp, "connections")["connections"]
    assert [c["peer"] for c in listed] == [f"127.0.0.1:{in_flight.getsockname()[1]}"]
    echo(in_flight, b"during the pause")
    readable, _, _ = select.select([newcomer], [], [], 0.3)
    assert readable == []  # not served: nobody accepted it
    assert ctl_json(short_tmp, "status")["connections"]["total"] == 1
    resumed = ctl(short_tmp, "--json", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"state": "running"}
    proc.wait_for("server.resumed")
    assert recv_exactly(newcomer, 7) == b"waiting"
    assert ctl_json(short_tmp, "status")["state"] == "running"
    echo(in_flight, b"after")
    in_flight.close()
    newcomer.close()


# --------------------------------------------------------------------------- logging


def test_log_level_debug_shows_conn_open(sockd_factory: Any, short_tmp: Path) -> None:
    """``log-level debug`` takes effect at once: the next connection logs ``conn.open``."""
    config = base_config(short_tmp)
    config["logging"]["level"] = "info"
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        echo(sock, b"quiet")
    proc.wait_for("conn.close")
    assert proc.all("conn.open") == []
    result = ctl(short_tmp, "log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("log level: info -> debug")
    changed = proc.wait_for("log.level_changed")
    assert (changed["new_level"], changed["previous_level"]) == ("debug", "info")
    assert changed["level"] == "warning"  # the event's own severity, not the new level
    assert ctl_json(short_tmp, "status")["log_level"] == "debug"
    mark = proc.mark()
    with connect(address) as sock:
        port = sock.getsockname()[1]
        echo(sock, b"loud")
    proc.wait_for("conn.open", lambda e: e["peer_port"] == port, start=mark)
    assert ctl_json(short_tmp, "log-level", "info") == {"level": "info", "previous": "debug"}


def _file_events(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):  # a line still being written: next poll
            events.append(json.loads(line))
    return events


def _wait_file_event(
    path: Path, predicate: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    return poll_until(
        lambda: next((e for e in _file_events(path) if predicate(e)), None), f"{what} in {path}"
    )


def _one_connection(address: tuple[str, int]) -> int:
    with connect(address) as sock:
        echo(sock, b"logged")
        port: int = sock.getsockname()[1]
    return port


def test_reopen_logs_after_rotation_and_on_sigusr1(sockd_factory: Any, short_tmp: Path) -> None:
    """After logrotate renames the file, ``reopen-logs`` (and SIGUSR1) write to a new one."""
    log = short_tmp / "sockd.log"
    config = base_config(short_tmp)
    config["logging"]["output"] = str(log)
    config["logging"]["level"] = "info"
    proc = sockd_factory(config)
    listening = _wait_file_event(log, lambda e: e["event"] == "server.listening", "startup")
    host, _, port_text = listening["address"].rpartition(":")
    address = (host, int(port_text))
    assert proc.raw_lines == []  # every line goes to the file, none to stdout

    rotated = short_tmp / "sockd.log.1"
    log.rename(rotated)
    port = _one_connection(address)
    _wait_file_event(rotated, lambda e: e.get("peer_port") == port, "conn.close before reopen")
    result = ctl(short_tmp, "reopen-logs")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reopened the log output: {log}"
    reopened = _wait_file_event(log, lambda e: e["event"] == "log.reopened", "log.reopened")
    assert reopened["source"] == "control"
    port = _one_connection(address)
    _wait_file_event(log, lambda e: e.get("peer_port") == port, "conn.close after reopen")
    assert all(e.get("peer_port") != port for e in _file_events(rotated))

    rotated2 = short_tmp / "sockd.log.2"
    log.rename(rotated2)
    proc.signal(signal.SIGUSR1)
    reopened = _wait_file_event(log, lambda e: e["event"] == "log.reopened", "SIGUSR1 reopen")
    assert reopened["source"] == "SIGUSR1"
    port = _one_connection(address)
    _wait_file_event(log, lambda e: e.get("peer_port") == port, "conn.close after SIGUSR1")
    assert all(e.get("peer_port") != port for e in _file_events(rotated2))
    assert ctl_json(short_tmp, "reopen-logs") == {"reopened": True, "output": str(log)}


def test_logs_last_n_json_and_human(sockd_factory: Any, short_tmp: Path) -> None:
    """``logs -n 5`` gives exactly the last five events, as NDJSON or one readable line each."""
    proc = sockd_factory()
    (address,) = proc.wait_ready()
    for _ in range(3):  # one after the other: concurrent lines may reach stdout out of order
        port = _one_connection(address)
        proc.wait_for("conn.close", lambda e, port=port: e["peer_port"] == port)
    expected = proc.events[-5:]  # the daemon is idle now: its ring ends with these
    result = ctl(short_tmp, "logs", "-n", "5", "--json")
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert got == expected
    human = ctl(short_tmp, "logs", "-n", "5")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert len(lines) == 5
    pattern = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[a-z_]+\.")
    assert all(pattern.match(line) for line in lines), lines
    assert any(" conn.close " in line and "ended=closed" in line for line in lines)
    warnings = ctl(short_tmp, "logs", "--level", "warning", "--json")
    assert warnings.returncode == 0
    assert warnings.stdout == ""  # nothing at warning or above happened


def _reader(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _next_line(lines: queue.Queue[str | None], deadline: float) -> str:
    try:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise AssertionError("sockctl logs -f printed nothing before the deadline") from None
    assert line is not None, "sockctl logs -f ended early"
    return line


def test_logs_follow_streams_new_events_until_ctrl_c(sockd_factory: Any, short_tmp: Path) -> None:
    """``logs -f --json`` prints history, then a new ``conn.close`` live; SIGINT ends it with 0."""
    assert SOCKCTL is not None
    proc = sockd_factory()
    (address,) = proc.wait_ready()
    follower = subprocess.Popen(
        [SOCKCTL, "--socket", str(short_tmp / "ctl.sock"), "logs", "-f", "--json", "-n", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(follower.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + DEADLINE
        first = json.loads(_next_line(lines, deadline))
        assert first["event"] in {e["event"] for e in proc.events}  # history first
        port = _one_connection(address)
        while True:
            event = json.loads(_next_line(lines, deadline))
            if event["event"] == "conn.close" and event["peer_port"] == port:
                break
        assert event["bytes_in"] == len(b"logged")
        follower.send_signal(signal.SIGINT)
        assert follower.wait(DEADLINE) == 0
        assert follower.stderr is not None
        assert "Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    # The daemon noticed the client left and finished the streaming request.
    proc.wait_for("control.request", lambda e: e["path"] == "/v1/logs" and e["status"] == 200)


# --------------------------------------------------------------------------- metrics


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """A strict reading of text format 0.0.4: types by family, then every sample."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"{name} typed twice"
            types[name] = kind
        else:
            match = _SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            name = match["name"]
            assert name in types, f"{name} sampled before its TYPE line"
            raw = match["labels"] or ""
            labels = dict(_LABEL.findall(raw))
            assert ",".join(f'{k}="{v}"' for k, v in labels.items()) == raw, line
            samples.append((name, labels, float(match["value"])))
    assert helps == set(types), "every family has HELP and TYPE"
    return types, samples


DOCUMENTED_METRICS = {
    "sockd_connections_open": "gauge",
    "sockd_connections_total": "counter",
    "sockd_connections_refused_total": "counter",
    "sockd_bytes_received_total": "counter",
    "sockd_bytes_sent_total": "counter",
    "sockd_handler_errors_total": "counter",
    "sockd_reloads_total": "counter",
    "sockd_uptime_seconds": "gauge",
    "sockd_info": "gauge",
    "sockd_threads_started_total": "counter",
    "sockd_threads_spare": "gauge",
}


def _refused_from(address: tuple[str, int]) -> None:
    """Connect from 127.0.0.2, which the test config denies: the daemon closes it."""
    with socket.socket() as sock:
        sock.settimeout(DEADLINE)
        sock.bind(("127.0.0.2", 0))
        sock.connect(address)
        # A refusal may reset instead of closing: refused either way.
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(16) == b""


def test_stats_and_metrics_through_curl(sockd_factory: Any, short_tmp: Path) -> None:
    """``stats`` shows the counters from /v1/stats; curl gets the same as /metrics text."""
    proc = sockd_factory(base_config(short_tmp, deny=["127.0.0.2/32"]))
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        echo(sock, b"m" * 64)
    _refused_from(address)
    proc.wait_for("conn.close")
    result = ctl(short_tmp, "stats")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^connections total:\s+1$", result.stdout, re.M), result.stdout
    assert re.search(r"^connections refused:\s+1 \(\w+: 1\)$", result.stdout, re.M)
    assert re.search(r"^sockd:\s+.*mode=threading", result.stdout, re.M)
    stats = ctl_json(short_tmp, "stats")
    samples = {
        (m["name"], tuple(sorted(s["labels"].items()))): s["value"]
        for m in stats["metrics"]
        for s in m["samples"]
    }
    assert samples[("sockd_connections_total", ())] == 1
    assert samples[("sockd_bytes_received_total", ())] == 64
    assert samples[("sockd_bytes_sent_total", ())] == 64

    curl = require_curl()
    headers = short_tmp / "headers.txt"
    fetched = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "10",
            "-D",
            str(headers),
            "--unix-socket",
            str(short_tmp / "ctl.sock"),
            "http://localhost/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr
    head = headers.read_text().lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: text/plain; version=0.0.4" in head
    types, parsed = parse_prometheus(fetched.stdout)
    for name, kind in DOCUMENTED_METRICS.items():
        assert types.get(name) == kind, name
    values = {(n, tuple(sorted(ls.items()))): v for n, ls, v in parsed}
    assert values[("sockd_connections_total", ())] == 1
    assert values[("sockd_connections_open", ())] == 0
    assert values[("sockd_bytes_received_total", ())] == 64
    assert values[("sockd_reloads_total", (("result", "applied"),))] == 0
    assert sum(v for (n, _), v in values.items() if n == "sockd_connections_refused_total") == 1
    # Every reason is there from the start, at 0 until it happens (for rate() alerts).
    for reason in ("max_connections", "max_per_ip"):
        assert values[("sockd_connections_refused_total", (("reason", reason),))] == 0
    for reason in ("max_connections", "max_children", "fd_limit"):
        assert values[("sockd_throttled_total", (("reason", reason),))] == 0
    # /metrics and /v1/stats come from one catalogue: same names, kinds and order, and
    # (uptime and open connections aside, which move) the same samples.
    assert list(types.items()) == [(spec.name, spec.kind) for spec in METRICS]
    assert [(m["name"], m["kind"], m["help"]) for m in stats["metrics"]] == [
        (spec.name, spec.kind, spec.help) for spec in METRICS
    ]
    moving = {"sockd_uptime_seconds", "sockd_connections_open", "sockd_threads_spare"}
    assert {k: v for k, v in samples.items() if k[0] not in moving} == {
        k: v for k, v in values.items() if k[0] not in moving
    }
    info = [ls for n, ls, _ in parsed if n == "sockd_info"]
    assert info == [{"mode": "threading", "version": ctl_json(short_tmp, "status")["version"]}]
    assert values[("sockd_uptime_seconds", ())] > 0


# --------------------------------------------------------------------------- check


def test_check_good_and_bad_files(short_tmp: Path) -> None:
    """``check`` relays ``sockd --check-config``: OK and 0, or every problem and 78."""
    good = short_tmp / "good.toml"
    good.write_text(render_config(base_config(short_tmp)))
    ok = sockctl("check", str(good))
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.strip() == f"{good}: OK"
    bad = short_tmp / "bad.toml"
    bad.write_text('[server]\nmode = "forked"\nhandler = "no.such.module:H"\n')
    result = sockctl("check", str(bad))
    assert result.returncode == 78
    assert result.stdout == ""
    lines = result.stderr.splitlines()  # sockd --check-config's own lines, relayed
    assert len(lines) == 2
    assert all(line.startswith(f"sockd: {bad}: ") for line in lines)
    assert any("server.mode:" in line for line in lines)
    assert any("server.handler:" in line for line in lines)
    default_file = sockctl("--config", str(bad), "check")
    assert default_file.returncode == 78
    as_json = sockctl("--json", "check", str(bad))
    assert as_json.returncode == 78
    report = json.loads(as_json.stdout)
    assert report["path"] == str(bad)
    assert report["ok"] is False
    assert len(report["problems"]) == 2
    not_toml = short_tmp / "syntax.toml"
    not_toml.write_text("[control]\nsocket = /tmp/unquoted\n")
    unreadable = sockctl("--config", str(not_toml), "status")
    assert unreadable.returncode == 78
    assert str(not_toml) in unreadable.stderr


# --------------------------------------------------------------------------- reachability


def test_no_daemon_exits_3_naming_the_path(short_tmp: Path) -> None:
    """No daemon (no socket file, or one nobody listens on): exit 3, one line with the path."""
    missing = short_tmp / "absent.sock"
    result = sockctl("--socket", str(missing), "status")
    assert result.returncode == 3
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("sockctl: ") and str(missing) in line
    dead = short_tmp / "dead.sock"
    with socket.socket(socket.AF_UNIX) as orphan:
        orphan.bind(str(dead))  # a socket file nobody listens on
    result = sockctl("--socket", str(dead), "reload")
    assert result.returncode == 3
    (line,) = result.stderr.splitlines()
    assert str(dead) in line


def test_stale_socket_of_a_killed_daemon_is_replaced(sockd_factory: Any, short_tmp: Path) -> None:
    """A SIGKILLed daemon's socket file reads as not running; the next start replaces it."""
    path = short_tmp / "ctl.sock"
    first = sockd_factory()
    first.wait_ready()
    first.signal(signal.SIGKILL)
    first.wait_exit()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind
    down = ctl(short_tmp, "status")
    assert down.returncode == 3
    assert str(path) in down.stderr
    second = sockd_factory(name="again.toml")
    (address,) = second.wait_ready()
    status = ctl_json(short_tmp, "status")
    assert status["pid"] == second.pid
    assert status["listen"] == [label(address)]


def test_second_daemon_on_the_same_socket_is_refused(sockd_factory: Any, short_tmp: Path) -> None:
    """A second sockd on a live control socket exits 1 with one line; the first keeps serving."""
    path = short_tmp / "ctl.sock"
    first = sockd_factory()
    (address,) = first.wait_ready()
    inode = os.lstat(path).st_ino
    second = sockd_factory(name="second.toml")
    assert second.wait_exit() == 1
    errors = [line for line in second.stderr.splitlines() if line]
    assert len(errors) == 1, second.stderr
    assert "another sockd is already running" in errors[0]
    assert str(path) in errors[0]
    assert os.lstat(path).st_ino == inode  # its file was not touched
    assert ctl_json(short_tmp, "status")["pid"] == first.pid
    with connect(address) as sock:
        echo(sock, b"first still serves")


def test_curl_reads_status(sockd_factory: Any, short_tmp: Path) -> None:
    """``curl --unix-socket PATH http://localhost/v1/status`` gets the daemon's status."""
    curl = require_curl()
    proc = sockd_factory()
    (address,) = proc.wait_ready()
    result = subprocess.run(
        [
            curl,
            "-sS",
            "-i",
            "--max-time",
            "10",
            "--unix-socket",
            str(short_tmp / "ctl.sock"),
            "http://localhost/v1/status",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition("\n\n")  # text mode: CRLF read as LF
    assert head.startswith("HTTP/1.1 200")
    assert "x-sockd-api-version: 1" in head.lower()
    status = json.loads(body)
    assert status["pid"] == proc.pid
    assert status["state"] == "running"
    assert status["listen"] == [label(address)]


# --------------------------------------------------------------------------- permissions


@pytest.fixture
def read_group() -> Iterator[int]:
    """The gid of a throwaway group created for the read-only access test."""
    require_root_and_nobody()
    with system_group(READ_GROUP) as gid:
        yield gid


def test_stranger_is_denied_by_credentials(sockd_factory: Any, short_tmp: Path) -> None:
    """As nobody on a 0666 socket, only SO_PEERCRED stops ``status``: exit 4, ``control.denied``."""
    nobody = require_root_and_nobody()
    config = base_config(short_tmp)
    config["control"]["mode"] = "0666"
    proc = sockd_factory(config)
    proc.wait_ready()
    assert stat.S_IMODE(os.stat(short_tmp / "ctl.sock").st_mode) == 0o666
    result = ctl(short_tmp, "status", prefix=as_nobody(nobody))
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "permission denied" in result.stderr
    denied = proc.wait_for("control.denied")
    assert denied["uid"] == nobody.pw_uid
    assert denied["path"] is None  # refused at accept, before the request was read
    # With the default 0660 the file mode refuses first (EACCES): also exit 4.
    config["control"]["mode"] = "0660"
    proc.config_path.write_text(render_config(config))
    assert [c["key"] for c in ctl_json(short_tmp, "reload")["changes"]] == ["control.mode"]
    assert stat.S_IMODE(os.stat(short_tmp / "ctl.sock").st_mode) == 0o660
    mark = proc.mark()
    result = ctl(short_tmp, "status", prefix=as_nobody(nobody))
    assert result.returncode == 4
    assert "permission denied connecting to" in result.stderr
    ctl_json(short_tmp, "status")  # a later event, so the check below has seen everything
    proc.wait_for("control.request", lambda e: e["path"] == "/v1/status", start=mark)
    assert all(e["event"] != "control.denied" for e in proc.events[mark:])


def test_read_group_may_read_but_not_change(
    sockd_factory: Any, short_tmp: Path, read_group: int
) -> None:
    """A read_group member gets ``status`` but ``reload`` exits 4 with ``control.denied``."""
    nobody = require_root_and_nobody()
    config = base_config(short_tmp)
    config["control"].update(mode="0666", read_group=READ_GROUP)
    proc = sockd_factory(config)
    proc.wait_ready()
    member = as_nobody(nobody, [read_group])
    status = ctl(short_tmp, "--json", "status", prefix=member)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == proc.pid
    reload = ctl(short_tmp, "reload", prefix=member)
    assert reload.returncode == 4, (reload.stdout, reload.stderr)
    assert "permission denied" in reload.stderr
    denied = proc.wait_for("control.denied")
    assert (denied["uid"], denied["method"], denied["path"]) == (
        nobody.pw_uid,
        "POST",
        "/v1/reload",
    )
    assert proc.all("reload.applied") == []
    outsider = ctl(short_tmp, "status", prefix=as_nobody(nobody))
    assert outsider.returncode == 4


def test_read_group_works_with_the_default_socket_mode(
    sockd_factory: Any, short_tmp: Path, read_group: int
) -> None:
    """With the default mode 0660, a read_group member can still run ``status``."""
    nobody = require_root_and_nobody()
    config = base_config(short_tmp)
    config["control"]["read_group"] = READ_GROUP
    proc = sockd_factory(config)
    proc.wait_ready()
    status = ctl(short_tmp, "--json", "status", prefix=as_nobody(nobody, [read_group]))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == proc.pid
