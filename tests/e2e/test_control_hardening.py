"""Issue 9's control-channel hardening against the real sockd, driven by the real sockctl.

Hostile local users are real processes under real uids: ``nobody`` without groups (a
stranger), ``nobody`` in a read_group this module creates and removes (a reader), and a
fake control server run as ``nobody`` in a directory ``nobody`` owns (a planted socket).
Each test waits on what the daemon says or does (a log line, an answer, an exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.procstat import rss_kb
from sockd.protocol import MAX_STOP_TIMEOUT
from tests.conftest import (
    DEADLINE,
    SockdProcess,
    base_config,
    connect,
    recv_exactly,
    render_config,
    system_group,
)
from tests.e2e.test_control_e2e import SOCKCTL, ctl, ctl_json, sockctl
from tests.integration.test_control import CLIENT_PYTHON
from tests.integration.test_control_hardening import hold

pytestmark = pytest.mark.skipif(
    SOCKCTL is None, reason="the sockctl command is not installed (pip install -e .)"
)

READ_GROUP = "sockd-e2e-hard"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nobody() -> pwd.struct_passwd:
    """``nobody``, the hostile local user (needs root to switch to it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs clients and servers as the unprivileged user nobody")
    from tests.conftest import require_reachable_by_others

    require_reachable_by_others()
    require_reachable_by_others(CLIENT_PYTHON)
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")


@pytest.fixture(scope="module")
def read_gid(nobody: pwd.struct_passwd) -> Iterator[int]:
    """A read_group created with groupadd for this module and removed after it."""
    with system_group(READ_GROUP) as gid:
        yield gid


def as_user(user: pwd.struct_passwd, groups: list[int] | None = None) -> list[str]:
    """A setpriv prefix running a command as ``user`` with exactly ``groups``."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    group_opt = "--groups=" + ",".join(map(str, groups)) if groups else "--clear-groups"
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", group_opt]


def start_shared(
    sockd_factory: Callable[..., SockdProcess], tmp: Path, **control: Any
) -> tuple[SockdProcess, tuple[str, int]]:
    """sockd whose socket anyone may connect to (0666), so SO_PEERCRED is the only gate."""
    config = base_config(tmp)
    config["control"].update({"mode": "0666", **control})
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    proc.wait_for("control.listening")
    return proc, address


def raw(path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    """One raw request; the status and the JSON body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(path))
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


# --------------------------------------------------------------------------- item 1: lockout


def test_root_can_status_reload_and_stop_while_a_reader_and_a_stranger_hold_all_they_can(
    sockd_factory: Callable[..., SockdProcess],
    short_tmp: Path,
    nobody: pwd.struct_passwd,
    read_gid: int,
) -> None:
    """With a reader holding 200 idle connections and a stranger 200 more, root's
    ``sockctl status``, ``reload`` and ``stop`` all succeed; the refusals are logged as a
    few rate-limited control.busy / control.denied lines that count every one."""
    proc, _ = start_shared(sockd_factory, short_tmp, read_group=READ_GROUP, request_timeout=60)
    sock_path = str(short_tmp / "ctl.sock")
    reader = hold(nobody, [read_gid], sock_path, 200, expect=200 - 32)
    stranger = hold(nobody, [], sock_path, 200, expect=200)
    try:
        assert reader.report["statuses"] == {"503": 168} and reader.report["held"] == 32
        assert stranger.report["statuses"] == {"403": 200}
        status = ctl_json(short_tmp, "status")
        assert status["state"] == "running"
        assert ctl_json(short_tmp, "reload")["result"] == "applied"
        stop = ctl(short_tmp, "stop")
        assert stop.returncode == 0, stop.stderr
    finally:
        reader.release()
        stranger.release()
    assert proc.wait_exit() == 0
    busy = proc.all("control.busy")
    denied = proc.all("control.denied")
    assert sum(e["count"] for e in busy) == 168 and len(busy) <= 4, busy
    assert sum(e["count"] for e in denied) == 200 and len(denied) <= 4, denied
    assert {e.get("reason") for e in busy if not e.get("summary")} == {"connections"}


# Run as a stranger: connects without blocking until the backlog is full (EAGAIN), says
# how many it holds, then holds them until its stdin closes.
FILL_BACKLOG = r"""
import socket, sys
held = []
while True:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(sys.argv[1])
    except BlockingIOError:
        break
    held.append(sock)
print(len(held), flush=True)
sys.stdin.readline()
"""


def wait_blocked_in_connect(proc: subprocess.Popen[str]) -> None:
    """Wait until ``proc`` sleeps in the kernel waiting for room in a Unix backlog."""
    wchan = Path(f"/proc/{proc.pid}/wchan")
    deadline = time.monotonic() + DEADLINE
    while wchan.read_text() != "unix_wait_for_peer":
        assert proc.poll() is None, f"sockctl did not wait: {proc.communicate()}"
        assert time.monotonic() < deadline, f"sockctl never waited for room ({wchan.read_text()})"
        time.sleep(0.01)  # sleep-ok: poll period of a deadline-bound wait on /proc


def test_a_stranger_filling_the_backlog_does_not_make_root_see_not_running(
    sockd_factory: Callable[..., SockdProcess], short_tmp: Path, nobody: pwd.struct_passwd
) -> None:
    """While sockd cannot accept (SIGSTOP) a stranger fills its control backlog; root's
    ``sockctl status`` waits for room instead of exiting 3 "not running", and gets the
    status once sockd resumes and turns the stranger away."""
    proc, _ = start_shared(sockd_factory, short_tmp)
    sock_path = str(short_tmp / "ctl.sock")
    if not Path(f"/proc/{os.getpid()}/wchan").exists():
        pytest.skip("/proc/PID/wchan is not available: cannot see sockctl wait for room")
    proc.signal(signal.SIGSTOP)
    filler = subprocess.Popen(
        [str(CLIENT_PYTHON), "-I", "-c", FILL_BACKLOG, sock_path],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert filler.stdout is not None
        assert int(filler.stdout.readline()) > 0
        assert SOCKCTL is not None
        with subprocess.Popen(
            [SOCKCTL, "--socket", sock_path, "--json", "--timeout", "20", "status"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        ) as status:
            try:
                wait_blocked_in_connect(status)
            finally:
                proc.signal(signal.SIGCONT)
            out, err = status.communicate(timeout=DEADLINE)
        assert status.returncode == 0, err
        assert json.loads(out)["state"] == "running"
    finally:
        proc.signal(signal.SIGCONT)
        filler.communicate("\n", timeout=DEADLINE)
    assert sum(e["count"] for e in proc.wait_count("control.denied", 1)) >= 1


# --------------------------------------------------------------------------- item 2: followers


FOLLOW = b"GET /v1/logs?n=0&follow=1 HTTP/1.1\r\nHost: x\r\n\r\n"


def failing_actions(address: tuple[str, int], count: int) -> None:
    """``count`` JSON actions that raise, pipelined on one connection: one handler.error
    event (with its traceback) each, as fast as the daemon can log them."""
    with connect(address) as sock:
        line = b'{"action": "fail"}\n'
        for start in range(0, count, 1000):
            batch = min(1000, count - start)
            sock.sendall(line * batch)
            received = 0
            while received < batch:
                chunk = sock.recv(1 << 20)
                assert chunk, "the daemon closed the action connection"
                received += chunk.count(b"\n")


def test_followers_that_never_read_cost_no_memory_and_a_late_reader_learns_what_it_missed(
    sockd_factory: Callable[..., SockdProcess], short_tmp: Path
) -> None:
    """30 log followers that never read, while 20,000 events are logged, grow the daemon
    by far less than one event queue each; a follower that reads late gets a
    logs.dropped line with the count it missed, and sockctl logs -f shows it."""
    config = base_config(short_tmp, handler="tests.handlers:Calculator")
    config["logging"]["level"] = "info"
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    proc.wait_for("control.listening")
    sock_path = str(short_tmp / "ctl.sock")
    followers = []
    # sockctl logs -f whose stdout nobody reads: it blocks, and so stops reading too.
    blocked = subprocess.Popen(
        [str(SOCKCTL), "--socket", sock_path, "logs", "-n", "0", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        for _ in range(31):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(DEADLINE)
            sock.connect(sock_path)
            sock.sendall(FOLLOW)
            # The head is written once the follower is subscribed; then it stops reading.
            assert sock.recv(12) == b"HTTP/1.1 200"
            followers.append(sock)
        late = followers[-1]
        # A marker event, read by the blocked sockctl: it is following from here on.
        assert ctl(short_tmp, "log-level", "info").returncode == 0
        assert blocked.stdout is not None
        seen = b""
        while b"log.level_changed" not in seen:
            chunk = os.read(blocked.stdout.fileno(), 1 << 16)
            assert chunk, "sockctl logs -f ended early"
            seen += chunk
        before = rss_kb(proc.pid)
        failing_actions(address, 20_000)
        proc.wait_count("handler.error", 20_000, timeout=60)
        grown_mb = (rss_kb(proc.pid) - before) / 1024
        # Before the fix each follower queued up to 10,000 events of its own: ~300 MB here.
        assert grown_mb < 40, f"the daemon grew by {grown_mb:.0f} MB with 30 idle followers"
        data = b""
        while b'"logs.dropped"' not in data or b"\n" not in data.split(b'"logs.dropped"')[1]:
            chunk = late.recv(1 << 20)
            assert chunk, "the follow stream ended"
            data += chunk
        notice = next(
            json.loads(line)
            for line in data.split(b"\n")
            if b'"logs.dropped"' in line and line.startswith(b"{")
        )
        assert notice["level"] == "warning" and notice["missed"] > 0
        text = b""
        while b"missed here" not in text:
            chunk = os.read(blocked.stdout.fileno(), 1 << 16)
            assert chunk, "sockctl logs -f ended before the notice"
            text += chunk
        assert b"log events missed here: this stream fell behind sockd's log --" in text
    finally:
        for sock in followers:
            sock.close()
        blocked.kill()
        blocked.wait(DEADLINE)
    assert proc.proc.poll() is None
    assert proc.all("control.error") == []


def test_readers_may_follow_16_at_once(
    sockd_factory: Callable[..., SockdProcess],
    short_tmp: Path,
    nobody: pwd.struct_passwd,
    read_gid: int,
) -> None:
    """A reader holding 16 log follows gets 503 for a 17th: sockctl logs -f exits 1 with
    the daemon's message naming the limit; root can still follow."""
    start_shared(sockd_factory, short_tmp, read_group=READ_GROUP)
    sock_path = str(short_tmp / "ctl.sock")
    follow = FOLLOW.decode()
    holder = hold(nobody, [read_gid], sock_path, 17, expect=1, payload=follow)
    try:
        assert holder.report["statuses"] == {"503": 1} and holder.report["held"] == 16
        extra = sockctl(
            "--socket", sock_path, "logs", "-f", prefix=as_user(nobody, [read_gid]), timeout=20
        )
        assert extra.returncode == 1, extra.stderr
        assert "the 'read' role may have 16 at once" in extra.stderr
        assert len(extra.stderr.splitlines()) == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mine:
            mine.settimeout(DEADLINE)
            mine.connect(sock_path)
            mine.sendall(FOLLOW)
            assert mine.recv(64).startswith(b"HTTP/1.1 200 ")
    finally:
        holder.release()


# --------------------------------------------------------------------------- item 3: numbers


def test_out_of_range_numbers_are_refused_by_sockctl_and_by_the_daemon(
    sockd_factory: Callable[..., SockdProcess], short_tmp: Path
) -> None:
    """``stop --timeout 1e303`` and friends exit 2 in one line and send nothing;
    ``POST /v1/stop {"timeout": 1e303}`` is a 400 and the daemon keeps serving; a stop
    of exactly a day is accepted."""
    config = base_config(short_tmp)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    proc.wait_for("control.listening")
    for args in (
        ("stop", "--timeout", "1e303"),
        ("stop", "--timeout", "inf"),
        ("stop", "--timeout", "nan"),
        ("stop", "--timeout", "86400.5"),
        ("stop", "--timeout", "-1"),
        ("--timeout", "1e303", "status"),
        ("--timeout", "0", "status"),
        ("kick", "9223372036854775808"),
        ("logs", "-n", "100001"),
    ):
        result = ctl(short_tmp, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (args, result.stderr)
        assert result.stderr.startswith("sockctl: "), result.stderr
        assert "Traceback" not in result.stderr
    assert [e for e in proc.all("control.request") if e.get("method") != "GET"] == []
    sock_path = short_tmp / "ctl.sock"
    for body in (b'{"timeout": 1e303}', b'{"timeout": 86400.001}', b'{"timeout": 1e400}'):
        request = b"POST /v1/stop HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        status, answer = raw(sock_path, request)
        assert status == 400, answer
        assert "from 0 to 86400" in answer["error"]["message"]
    delete = b"DELETE /v1/connections/9223372036854775808 HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    status, answer = raw(sock_path, delete)
    assert status == 400 and "from 0 to 9223372036854775807" in answer["error"]["message"]
    with connect(address) as sock:  # the data plane is untouched
        sock.sendall(b"ping\n")
        assert recv_exactly(sock, 5) == b"ping\n"
    assert proc.proc.poll() is None and proc.all("server.stopping") == []
    assert ctl_json(short_tmp, "stop", "--timeout", f"{MAX_STOP_TIMEOUT:g}")["timeout"] == 86400
    assert proc.wait_exit() == 0


# --------------------------------------------------------------------------- also: 411, redaction


def test_a_dry_run_body_without_length_is_411_and_nothing_is_reloaded(
    sockd_factory: Callable[..., SockdProcess], short_tmp: Path
) -> None:
    """``{"dry_run": true}`` without Content-Length, at once or after the 411 came back
    (the reviewer's late body), is a 411: no reload, no dry run, the generation stays;
    a POST with neither length nor body (curl -X POST) is a 411 too; Content-Length: 0
    reloads."""
    proc = sockd_factory(base_config(short_tmp))
    proc.wait_ready()
    proc.wait_for("control.listening")
    sock_path = short_tmp / "ctl.sock"
    generation = ctl_json(short_tmp, "status")["generation"]
    head = b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
    for request in (head + b'{"dry_run": true}', head):
        status, answer = raw(sock_path, request)
        assert status == 411 and answer["error"]["code"] == "length_required"
        assert "send Content-Length: 0 for no body" in answer["error"]["message"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(sock_path))
        sock.sendall(head)
        assert sock.recv(12) == b"HTTP/1.1 411"
        with contextlib.suppress(OSError):
            sock.sendall(b'{"dry_run": true}')
    assert ctl_json(short_tmp, "status")["generation"] == generation
    assert proc.all("reload.applied") == [] and proc.all("reload.rejected") == []
    status, answer = raw(sock_path, head.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"))
    assert (status, answer["result"], answer["generation"]) == (200, "applied", generation + 1)


def test_readers_see_handler_options_redacted(
    sockd_factory: Callable[..., SockdProcess],
    short_tmp: Path,
    nobody: pwd.struct_passwd,
    read_gid: int,
) -> None:
    """``sockctl config`` as a read_group member shows "<redacted>" for every handler
    option value (keys kept); root sees the values."""
    config = base_config(short_tmp, handler="tests.handlers:Options")
    config["server"]["handler_options"] = {"password": "s3cret", "dsn": "postgres://u:pw@db/x"}
    config["control"].update(mode="0666", read_group=READ_GROUP)
    proc = sockd_factory(config)
    proc.wait_ready()
    proc.wait_for("control.listening")
    reader = ctl(short_tmp, "--json", "config", prefix=as_user(nobody, [read_gid]))
    assert reader.returncode == 0, reader.stderr
    options = json.loads(reader.stdout)["config"]["server"]["handler_options"]
    assert options == {"password": "<redacted>", "dsn": "<redacted>"}
    assert "s3cret" not in reader.stdout and "pw@db" not in reader.stdout
    mine = ctl_json(short_tmp, "config")["config"]["server"]["handler_options"]
    assert mine == {"password": "s3cret", "dsn": "postgres://u:pw@db/x"}


def test_status_after_a_reload_of_handler_options_shows_no_secret(
    sockd_factory: Callable[..., SockdProcess],
    short_tmp: Path,
    nobody: pwd.struct_passwd,
    read_gid: int,
) -> None:
    """After a reload that changed handler_options, a reader's ``sockctl --json status``
    (and root's) shows the change in last_reload with its keys but no old or new value;
    the reload's own answer still shows root the values."""
    config = base_config(short_tmp, handler="tests.handlers:Options")
    config["server"]["handler_options"] = {"password": "0ld-s3cret"}
    config["control"].update(mode="0666", read_group=READ_GROUP)
    proc = sockd_factory(config)
    proc.wait_ready()
    proc.wait_for("control.listening")
    config["server"]["handler_options"] = {"password": "n3w-s3cret", "dsn": "pg://u:pw@db"}
    proc.config_path.write_text(render_config(config))
    reload = ctl_json(short_tmp, "reload")
    new = {"password": "n3w-s3cret", "dsn": "pg://u:pw@db"}
    change = {"key": "server.handler_options", "old": {"password": "0ld-s3cret"}, "new": new}
    assert change in reload["changes"]
    reader = ctl(short_tmp, "--json", "status", prefix=as_user(nobody, [read_gid]))
    assert reader.returncode == 0, reader.stderr
    for shown in (reader.stdout, json.dumps(ctl_json(short_tmp, "status"))):
        assert "s3cret" not in shown and "pw@db" not in shown, shown
        changes = json.loads(shown)["last_reload"]["changes"]
        (change,) = [c for c in changes if c["key"] == "server.handler_options"]
        assert change["old"] == {"password": "<redacted>"}
        assert change["new"] == {"password": "<redacted>", "dsn": "<redacted>"}
    assert "s3cret" not in ctl(short_tmp, "status", prefix=as_user(nobody, [read_gid])).stdout


# --------------------------------------------------------------------------- socket mode on reload


def test_a_reload_to_a_group_sockd_is_not_in_leaves_the_socket_mode_alone(
    short_tmp: Path,
) -> None:
    """sockd running as an unprivileged uid, socket mode 0600: a reload to mode 0660 with
    a group it is not in (root) is rejected with a message naming the group, and the
    socket keeps mode 0600 and its group; sockd serves on."""
    from tests.e2e.test_lifecycle_hardening import UidSockd
    from tests.integration.test_control_hardening import unused_uid

    if os.geteuid() != 0:
        pytest.skip("needs root: runs sockd under a uid of its own")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    from tests.conftest import require_reachable_by_others

    require_reachable_by_others()
    uid = unused_uid()
    os.chown(short_tmp, uid, uid)
    config = base_config(short_tmp)
    config["control"]["mode"] = "0600"
    path = short_tmp / "sockd.toml"
    path.write_text(render_config(config))
    proc = UidSockd(path, uid)
    try:
        proc.wait_ready()
        proc.wait_for("control.listening")
        sock_path = short_tmp / "ctl.sock"
        before = sock_path.stat()
        assert (stat.S_IMODE(before.st_mode), before.st_uid) == (0o600, uid)
        config["control"].update(mode="0660", group="root")
        path.write_text(render_config(config))
        proc.signal(signal.SIGHUP)
        rejected = proc.wait_for("reload.rejected")
        after = sock_path.stat()
        assert stat.S_IMODE(after.st_mode) == 0o600, f"mode now 0{after.st_mode:o}"
        assert after.st_gid == before.st_gid
        assert "group 'root' (gid 0)" in " ".join(rejected["errors"]), rejected
        assert proc.all("reload.applied") == []
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()


# --------------------------------------------------------------------------- item 5: the directory


@pytest.mark.parametrize("kind", ["owned-by-nobody", "world-writable", "tmp-itself"])
def test_sockd_refuses_a_socket_directory_others_control(
    sockd_factory: Callable[..., SockdProcess],
    short_tmp: Path,
    nobody: pwd.struct_passwd,
    kind: str,
) -> None:
    """sockd does not start with its socket in a directory another user owns or can write
    (nor directly in /tmp); the one-line error names the directory, owner and mode."""
    if kind == "tmp-itself":
        directory = Path("/tmp")
        expected = "directory /tmp is writable by others (mode 1777)"
    else:
        directory = short_tmp / "sockets"
        directory.mkdir()
        if kind == "owned-by-nobody":
            os.chown(directory, nobody.pw_uid, nobody.pw_gid)
            expected = f"directory {directory} is owned by uid {nobody.pw_uid} (nobody)"
        else:
            directory.chmod(0o777)
            expected = f"directory {directory} is writable by others (mode 0777)"
    path = directory / f"sk-{os.getpid()}-{kind}.sock"
    config = base_config(short_tmp)
    config["control"]["socket"] = str(path)
    proc = sockd_factory(config)
    assert proc.wait_exit() != 0
    assert expected in proc.stderr, proc.stderr
    assert "refusing to create control socket" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not path.exists()


FAKE_DAEMON = r"""
import json, os, socket, sys
path, answers = sys.argv[1], json.loads(sys.argv[2])
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen()
print(json.dumps({"ready": True}), flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    print(json.dumps({"received": data.decode("latin-1")}), flush=True)
    if data:
        target = data.split(b" ")[1].decode()
        body = json.dumps(answers.get(target, {})).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nX-Sockd-Api-Version: 1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
    conn.close()
"""

STATUS = {
    "api_version": 1,
    "pid": 1,
    "version": "0.1.0",
    "state": "running",
    "started_at": "2026-11-27T10:00:00.000000Z",
    "uptime_s": 1.0,
    "mode": "threading",
    "handler": "x:Y",
    "listen": [],
    "config_path": None,
    "generation": 1,
    "log_level": "info",
    "connections": {"active": 0, "total": 0, "refused": 0},
    "last_reload": None,
}
ANSWERS = {
    "/v1/status": STATUS,
    "/v1/stop": {"state": "draining", "timeout": 1.0, "active": 0},
    "/v1/pause": {"state": "paused"},
}


@contextlib.contextmanager
def fake_daemon(user: pwd.struct_passwd, path: Path) -> Iterator[subprocess.Popen[str]]:
    """A fake control server run as ``user`` at ``path``, printing what each client sent."""
    proc = subprocess.Popen(
        [str(CLIENT_PYTHON), "-I", "-c", FAKE_DAEMON, str(path), json.dumps(ANSWERS)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        proc.kill()
        proc.wait(DEADLINE)


def received(fake: subprocess.Popen[str]) -> str:
    """What the fake's next client sent (waits for that client's line)."""
    assert fake.stdout is not None
    line = fake.stdout.readline()
    assert line, "the fake daemon exited"
    text: str = json.loads(line)["received"]
    return text


def test_sockctl_sends_no_state_change_to_a_socket_another_user_planted(
    short_tmp: Path, nobody: pwd.struct_passwd
) -> None:
    """A socket served by nobody in a directory nobody made under /tmp: root's ``sockctl
    stop`` and ``pause`` exit 4 naming the uid and send nothing; ``status`` still reads."""
    planted = short_tmp / "planted"
    planted.mkdir()
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    path = planted / "control.sock"
    with fake_daemon(nobody, path) as fake:
        for command in ("stop", "pause"):
            result = sockctl("--socket", str(path), command)
            assert result.returncode == 4, (result.stdout, result.stderr)
            assert f"it is served by uid {nobody.pw_uid} (nobody)" in result.stderr
            assert result.stderr.count("\n") == 1
            assert received(fake) == ""  # connected, checked, closed: not a byte sent
        status = sockctl("--socket", str(path), "--json", "status")
        assert status.returncode == 0, status.stderr
        assert received(fake).startswith("GET /v1/status ")


def test_sockctl_trusts_the_owner_of_a_directory_root_made_or_of_its_config(
    short_tmp: Path, nobody: pwd.struct_passwd
) -> None:
    """The owner of a socket directory root created (as /run/sockd for User=sockd) and
    the owner of the --config file are trusted with state changes."""
    run = Path("/run")
    info = run.stat()
    if info.st_uid != 0 or info.st_mode & 0o022:
        pytest.skip("/run is not root's and closed to others here")
    made = Path(tempfile.mkdtemp(dir=run, prefix="skh"))
    try:
        made.chmod(0o755)
        os.chown(made, nobody.pw_uid, nobody.pw_gid)
        path = made / "control.sock"
        with fake_daemon(nobody, path) as fake:
            result = sockctl("--socket", str(path), "--json", "stop")
            assert result.returncode == 0, result.stderr
            assert received(fake).startswith("POST /v1/stop ")
    finally:
        shutil.rmtree(made, ignore_errors=True)
    planted = short_tmp / "planted"
    planted.mkdir()
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    path = planted / "control.sock"
    config = short_tmp / "theirs.toml"
    config.write_text(f'[control]\nsocket = "{path}"\n')
    os.chown(config, nobody.pw_uid, nobody.pw_gid)
    with fake_daemon(nobody, path) as fake:
        result = sockctl("--config", str(config), "--json", "pause")
        assert result.returncode == 0, result.stderr
        assert received(fake).startswith("POST /v1/pause ")
