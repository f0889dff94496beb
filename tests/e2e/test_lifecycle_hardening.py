"""Issue 9, lifecycle and data plane: stop deadlines, all-or-nothing reloads, reloads that
cannot wedge the daemon, the backlog at a stop, and the smaller fixes around them.

Every test runs the real ``sockd`` as a subprocess on loopback and waits on what it says
(a log line, an sd_notify datagram, an exit) with a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockctl.client import ControlClient
from tests.conftest import (
    DEADLINE,
    REPO,
    SockdProcess,
    base_config,
    connect,
    recv_line,
    render_config,
    require_reachable_by_others,
)

# --------------------------------------------------------------------------- helpers


def write_config(proc: SockdProcess, sections: dict[str, dict[str, Any]]) -> None:
    proc.config_path.write_text(render_config(sections))


def client_for(tmp: Path) -> ControlClient:
    return ControlClient(str(tmp / "ctl.sock"), timeout=30)


def sockctl(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real sockctl command line against ``tmp/ctl.sock``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from sockctl.cli import main; main()",
            *("--socket", str(tmp / "ctl.sock"), *args),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll an observable condition (a file, a counter) until true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # sleep-ok: polling interval of an observable condition


def read_outcome(sock: socket.socket) -> str:
    """How a connection ended for its client: a line, 'eof', or 'reset'."""
    try:
        line = recv_line(sock)
    except ConnectionResetError:
        return "reset"
    return line.decode() if line else "eof"


class NotifyListener:
    """A NOTIFY_SOCKET bound by the test: records every sd_notify datagram with its time."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.datagrams: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.datagrams.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def pings(self, since: float = 0.0) -> list[float]:
        with self._cond:
            return [t for t, d in self.datagrams if d == "WATCHDOG=1" and t >= since]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = DEADLINE) -> float:
        """Time of the first datagram matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, d in self.datagrams:
                    if predicate(d):
                        return t
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no matching datagram; got {self.datagrams[-10:]!r}"
                self._cond.wait(remaining)

    def wait_pings(self, count: int, since: float, timeout: float = DEADLINE) -> list[float]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(found := self.pings(since)) < count:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{len(found)} of {count} WATCHDOG=1 pings"
                self._cond.wait(remaining)
            return found

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_tmp / "notify.sock")
    yield listener
    listener.close()


# --------------------------------------------------------------------------- 9. stop deadline


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_stop_exits_within_shutdown_timeout(sockd_factory: Any, short_tmp: Path, mode: str) -> None:
    """A handler that ignores the drain and the cut: sockd exits within shutdown_timeout + 0.5 s."""
    config = base_config(
        short_tmp, handler="tests.handlers:CutIgnorer", shutdown_timeout=1, mode=mode
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    sock = connect(address)
    proc.wait_for("test.blocked")
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    rc = proc.proc.wait(DEADLINE)
    elapsed = time.monotonic() - began
    assert rc == 0
    assert 0.9 <= elapsed <= 1.5, f"exited {elapsed:.3f} s after SIGTERM"
    proc.wait_exit()
    stopped = proc.wait_for("server.stopped")
    assert stopped["cut"] == 1
    assert proc.wait_for("conn.close")["ended"] == "drain_deadline"
    sock.close()


# --------------------------------------------------------------------------- 4. atomic reload


def test_reload_failing_to_open_the_log_changes_nothing(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """A reload whose log output cannot be opened is rejected (exit 78) before it binds an
    added port or changes the control socket's mode; the same port is added later."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:MakesDir"))
    (address,) = proc.wait_ready()
    ctl_sock = short_tmp / "ctl.sock"
    mode_before = stat.S_IMODE(os.stat(ctl_sock).st_mode)
    port = free_port()
    log_path = short_tmp / "became-a-dir"
    bad = base_config(
        short_tmp,
        handler="tests.handlers:MakesDir",
        handler_options={"make_dir": str(log_path)},
        listen=["127.0.0.1:0", f"127.0.0.1:{port}"],
    )
    # A free file name when logging.output is validated, a directory when it is opened.
    bad["logging"]["output"] = str(log_path)
    bad["control"]["mode"] = "0600"
    write_config(proc, bad)
    result = sockctl(short_tmp, "reload")
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert "logging.output" in result.stderr and "Is a directory" in result.stderr
    rejected = proc.wait_for("reload.rejected")
    assert any(e.startswith("logging.output:") for e in rejected["errors"])
    assert stat.S_IMODE(os.stat(ctl_sock).st_mode) == mode_before
    with socket.socket() as probe:  # not bound by sockd: free for anyone
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    good = base_config(short_tmp, listen=["127.0.0.1:0", f"127.0.0.1:{port}"])
    good["control"]["mode"] = "0600"
    write_config(proc, good)
    assert client_for(short_tmp).reload()["result"] == "applied"
    assert stat.S_IMODE(os.stat(ctl_sock).st_mode) == 0o600
    with connect(("127.0.0.1", port)) as sock:
        sock.sendall(b"added\n")
        assert recv_line(sock) == b"added\n"
    with connect(address) as sock:
        sock.sendall(b"old\n")
        assert recv_line(sock) == b"old\n"


def test_reload_to_a_fifo_without_reader_is_rejected_not_wedged(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """A log output that is a FIFO nobody reads is rejected at once; opening it does not
    block the main loop (it did, forever)."""
    proc = sockd_factory(base_config(short_tmp))
    proc.wait_ready()
    fifo = short_tmp / "log.fifo"
    os.mkfifo(fifo)
    config = base_config(short_tmp)
    config["logging"]["output"] = str(fifo)
    write_config(proc, config)
    result = sockctl(short_tmp, "reload")
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert "logging.output" in result.stderr
    assert client_for(short_tmp).status()["state"] == "running"


# --------------------------------------------------------------------------- 8. wedged reload


def _slow_check_config(tmp: Path, **options: str | float) -> dict[str, dict[str, Any]]:
    return base_config(tmp, handler="tests.handlers:SlowCheck", handler_options=options)


def test_sigterm_during_a_hung_validation_stops_promptly(
    sockd_factory: Any, short_tmp: Path, notify: NotifyListener
) -> None:
    """While a reload's check_options hangs, the daemon serves, reaps, pings the watchdog
    and answers; a SIGTERM stops it within shutdown_timeout; the waiting reload hears 503."""
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"}
    config = _slow_check_config(short_tmp)
    config["server"]["shutdown_timeout"] = 2
    proc = sockd_factory(config, env=env)
    (address,) = proc.wait_ready()
    started, release = short_tmp / "started", short_tmp / "release"
    hung = _slow_check_config(short_tmp, started=str(started), release=str(release))
    hung["server"]["shutdown_timeout"] = 2
    write_config(proc, hung)
    answers: list[Any] = []

    def reload() -> None:
        try:
            answers.append(client_for(short_tmp).reload())
        except Exception as exc:  # the test's business: recorded and checked below
            answers.append(exc)

    waiter = threading.Thread(target=reload, daemon=True)
    waiter.start()
    wait_until(started.exists, "check_options to start")
    assert client_for(short_tmp).status()["state"] == "reloading"
    since = time.monotonic()
    notify.wait_pings(3, since)  # the main loop goes on while user code hangs
    with connect(address) as sock:
        sock.sendall(b"served\n")
        assert recv_line(sock) == b"served\n"
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert time.monotonic() - began < 2.5
    waiter.join(DEADLINE)
    assert len(answers) == 1 and "stopping" in str(answers[0])
    release.touch()


def test_reload_completes_when_validation_returns(sockd_factory: Any, short_tmp: Path) -> None:
    """A slow check_options holds the reload, not the daemon: children are reaped meanwhile,
    and the reload applies once it returns."""
    config = _slow_check_config(short_tmp)
    config["server"]["mode"] = "forking"
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    started, release = short_tmp / "started", short_tmp / "release"
    hung = _slow_check_config(short_tmp, started=str(started), release=str(release))
    hung["server"]["mode"] = "forking"
    write_config(proc, hung)
    mark = proc.mark()
    proc.signal(signal.SIGHUP)
    wait_until(started.exists, "check_options to start")
    ctl = client_for(short_tmp)
    assert ctl.status()["state"] == "reloading"
    with connect(address) as sock:  # still serving with the old config
        sock.sendall(b"ping\n")
        assert recv_line(sock) == b"ping\n"
    # Forked children are reaped by the main loop: its conn.close shows it was.
    assert proc.wait_for("conn.close", start=mark)["ended"] == "closed"
    release.touch()
    applied = proc.wait_for("reload.applied", start=mark)
    assert "server.handler_options" in applied["changes"]
    # reload.applied is logged just before the state leaves "reloading".
    wait_until(lambda: ctl.status()["state"] == "running", "the reload to end")
    assert ctl.status()["generation"] == 2


def test_validation_past_its_deadline_is_rejected(sockd_factory: Any, short_tmp: Path) -> None:
    """A check_options that never returns: the reload is rejected at the deadline (exit 78,
    a clear error), its thread left behind; the next reload works, and the late thread's
    result, when it comes, changes nothing."""
    proc = sockd_factory(_slow_check_config(short_tmp, validation_timeout=1))
    (address,) = proc.wait_ready()
    started, release = short_tmp / "started", short_tmp / "release"
    hung = _slow_check_config(short_tmp, started=str(started), release=str(release))
    hung["server"]["max_connections"] = 7
    write_config(proc, hung)
    began = time.monotonic()
    result = sockctl(short_tmp, "reload")
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert "handler validation did not finish within 1 s" in result.stderr
    assert time.monotonic() - began < 5
    ctl = client_for(short_tmp)
    assert ctl.status()["state"] == "running"
    write_config(proc, _slow_check_config(short_tmp, tag="next"))
    assert ctl.reload()["result"] == "applied"
    assert ctl.status()["generation"] == 2
    mark = proc.mark()
    release.touch()  # the abandoned validation returns now; its result is dropped
    wait_until(lambda: not started.exists(), "the abandoned check_options to return")
    # A dry run is answered by the main loop after it has seen the late result.
    assert ctl.reload(dry_run=True)["result"] == "valid"
    with connect(address) as sock:
        sock.sendall(b"after\n")
        assert recv_line(sock) == b"after\n"
    assert ctl.status()["generation"] == 2
    assert ctl.config()["config"]["server"]["max_connections"] == 0
    assert not [e for e in proc.events[mark:] if e.get("event", "").startswith("reload.")]


def test_watchdog_stops_when_the_main_loop_is_wedged(
    sockd_factory: Any, short_tmp: Path, notify: NotifyListener
) -> None:
    """WATCHDOG=1 comes from the main loop: with it stuck (here on a lock user code holds)
    the pings stop, though the serving loop is fine; they resume when it is free."""
    release = short_tmp / "release"
    config = base_config(
        short_tmp,
        handler="tests.handlers:LockHog",
        handler_options={"release": str(release)},
        idle_timeout=2,  # housekeeping (which takes the lock) every 0.5 s
    )
    proc = sockd_factory(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    (address,) = proc.wait_ready()
    notify.wait_pings(3, time.monotonic())
    sock = connect(address)
    proc.wait_for("test.blocked")
    # Within a housekeeping interval the main loop blocks; then no ping for a second.
    deadline = time.monotonic() + 5
    while True:
        last = max(notify.pings(), default=0.0)
        if time.monotonic() - last >= 1.0:
            break
        assert time.monotonic() < deadline, "pings went on with the main loop wedged"
        time.sleep(0.05)  # sleep-ok: observing the absence of pings
    release.touch()
    assert recv_line(sock) == b"released\n"
    notify.wait_pings(1, time.monotonic())
    sock.close()
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


def test_watchdog_stops_when_the_serving_loop_is_wedged(
    sockd_factory: Any, short_tmp: Path, notify: NotifyListener
) -> None:
    """The main loop pings only while the serving loop answers its heartbeat: with the
    accept loop stuck (on the lock a handler holds) the pings stop."""
    release = short_tmp / "release"
    config = base_config(
        short_tmp, handler="tests.handlers:LockHog", handler_options={"release": str(release)}
    )
    proc = sockd_factory(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    (address,) = proc.wait_ready()
    notify.wait_pings(3, time.monotonic())
    holder = connect(address)
    proc.wait_for("test.blocked")
    # No housekeeping needs the lock (no idle timeout): the main loop runs on, but the
    # next accept blocks the serving loop on it.
    notify.wait_pings(2, time.monotonic())
    waiting = connect(address)
    deadline = time.monotonic() + 5
    while time.monotonic() - max(notify.pings(), default=0.0) < 1.0:
        assert time.monotonic() < deadline, "pings went on with the serving loop wedged"
        time.sleep(0.05)  # sleep-ok: observing the absence of pings
    release.touch()
    assert recv_line(holder) == b"released\n"
    notify.wait_pings(1, time.monotonic())
    for sock in (holder, waiting):
        sock.close()


def listen_queue(port: int) -> int:
    """Connections waiting in the accept queue of the loopback listener on ``port``
    (the rx_queue column of /proc/net/tcp for a socket in LISTEN state)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return int(queues.split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


def wedge_serving_loop(
    sockd_factory: Any, short_tmp: Path, release: Path
) -> tuple[SockdProcess, tuple[str, int], dict[str, dict[str, Any]], list[socket.socket]]:
    """A sockd whose serving loop is stuck: LockHog holds the registry lock, and a second
    connection's accept waits for it. Returns the process, its address, its config and
    the two client sockets."""
    config = base_config(
        short_tmp, handler="tests.handlers:LockHog", handler_options={"release": str(release)}
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    holder = connect(address)
    proc.wait_for("test.blocked")
    waiting = connect(address)
    # Taken from the queue: the serving loop is in that accept, on the lock, from here on.
    wait_until(lambda: listen_queue(address[1]) == 0, "the serving loop to take the connection")
    return proc, address, config, [holder, waiting]


def test_reload_with_a_stuck_serving_loop_is_refused_and_applies_nothing(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """With the serving loop stuck on a lock, a reload adding an address is refused within
    2 s with a clear error, and nothing of it applies once the loop is free again."""
    release = short_tmp / "release"
    proc, address, config, clients = wedge_serving_loop(sockd_factory, short_tmp, release)
    port = free_port()
    config["server"]["listen"] = ["127.0.0.1:0", f"127.0.0.1:{port}"]
    write_config(proc, config)
    began = time.monotonic()
    result = sockctl(short_tmp, "reload")
    elapsed = time.monotonic() - began
    assert result.returncode == 78, (result.returncode, result.stdout, result.stderr)
    assert "the serving loop is not answering" in result.stderr
    assert "reload refused" in result.stderr
    assert elapsed < 2.0, f"the refusal took {elapsed:.1f} s"
    assert proc.wait_for("reload.rejected")["generation"] == 1
    release.touch()
    assert [recv_line(sock) for sock in clients] == [b"released\n"] * 2  # the loop moved on
    with connect(address) as sock:  # and accepts again: whatever it had queued has run
        assert recv_line(sock) == b"released\n"
    status = client_for(short_tmp).status()
    assert status["generation"] == 1
    assert status["listen"] == [f"{address[0]}:{address[1]}"], status
    with pytest.raises(ConnectionRefusedError):
        connect(("127.0.0.1", port), timeout=2).close()
    assert not proc.all("reload.applied")
    for sock in clients:
        sock.close()


def test_sigterm_during_a_reload_with_a_stuck_serving_loop_stops_promptly(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """A SIGTERM while a reload waits on a stuck serving loop is handled at once (the drain
    begins within a second); the reload hears that the daemon is stopping."""
    release = short_tmp / "release"
    proc, _, config, clients = wedge_serving_loop(sockd_factory, short_tmp, release)
    config["server"]["listen"] = ["127.0.0.1:0", f"127.0.0.1:{free_port()}"]
    write_config(proc, config)
    answers: list[Any] = []

    def reload() -> None:
        try:
            answers.append(client_for(short_tmp).reload())
        except Exception as exc:  # the test's business: recorded and checked below
            answers.append(exc)

    waiter = threading.Thread(target=reload, daemon=True)
    waiter.start()
    # Past the file's validation (milliseconds): the reload now waits on the serving loop.
    time.sleep(0.3)  # sleep-ok: places the signal inside the reload's wait, not a sync
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    proc.wait_for("server.stopping", timeout=5)
    elapsed = time.monotonic() - began
    release.touch()
    assert proc.wait_exit() == 0
    assert elapsed < 1.0, f"the stop began {elapsed:.1f} s after SIGTERM"
    waiter.join(DEADLINE)
    assert len(answers) == 1 and "stopping" in str(answers[0]), answers
    assert not proc.all("reload.applied")
    for sock in clients:
        sock.close()


# --------------------------------------------------------------------------- 7. backlog at stop


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_stop_serves_or_cleanly_closes_the_backlog(
    sockd_factory: Any, short_tmp: Path, mode: str
) -> None:
    """Clients waiting in the listen queue with a request sent are served or get EOF at a
    stop, never a reset; server.stopped counts them."""
    config = base_config(
        short_tmp,
        handler="tests.handlers:SlowReply",
        handler_options={"delay": 0.3},
        max_connections=1,
        shutdown_timeout=5,
        mode=mode,
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    first = connect(address)
    first.sendall(b"first\n")
    proc.wait_for("test.received")
    queued = []
    for i in range(4):
        sock = connect(address)  # completed by the kernel: sockd is at max_connections
        sock.sendall(f"queued-{i}\n".encode())
        queued.append(sock)
    proc.signal(signal.SIGTERM)
    outcomes = [read_outcome(s) for s in [first, *queued]]
    assert outcomes[0] == "done:first\n"
    assert "reset" not in outcomes, outcomes
    assert outcomes[1:] == [f"done:queued-{i}\n" for i in range(4)]
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert stopped["backlog"] == 4
    assert stopped["backlog_closed"] == 0
    assert stopped["finished"] == 5 and stopped["cut"] == 0
    for sock in [first, *queued]:
        sock.close()


def test_backlog_not_served_by_the_deadline_is_closed_without_reset(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Queued clients the drain has no time for get a clean EOF and are counted as closed."""
    config = base_config(
        short_tmp,
        handler="tests.handlers:SlowReply",
        handler_options={"delay": 5},
        max_connections=1,
        shutdown_timeout=0.5,
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    first = connect(address)
    first.sendall(b"first\n")
    proc.wait_for("test.received")
    queued = []
    for i in range(3):
        sock = connect(address)
        sock.sendall(f"queued-{i}\n".encode())
        queued.append(sock)
    proc.signal(signal.SIGTERM)
    outcomes = [read_outcome(s) for s in queued]
    assert outcomes == ["eof"] * 3
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert stopped["backlog"] == 3
    assert stopped["backlog_closed"] == 3
    assert stopped["cut"] == 1
    for sock in [first, *queued]:
        sock.close()


#: (handler, request line, what the reply line must contain) for the drain-aware handlers.
DRAIN_AWARE = [
    pytest.param(
        "tests.handlers:Calculator",
        b'{"action": "add", "values": [1, %d], "id": %d}\n',
        b'"ok": true',
        id="calculator",
    ),
    pytest.param(
        "examples.fileserver.server:FileServerHandler",
        b'{"action": "list", "id": "%d-%d"}\n',
        b'"ok": true',
        id="fileserver",
    ),
    pytest.param("tests.handlers:LineEcho", b"line-%d-%d\n", b"line-", id="line-echo"),
]


@pytest.mark.parametrize("mode", ["threading", "forking"])
@pytest.mark.parametrize(("handler", "request_line", "reply_has"), DRAIN_AWARE)
def test_queued_requests_are_answered_at_a_stop(
    sockd_factory: Any,
    short_tmp: Path,
    mode: str,
    handler: str,
    request_line: bytes,
    reply_has: bytes,
) -> None:
    """A drain-aware handler answers every request its client sent while queued (paused) before
    SIGTERM, then closes; server.stopped counts them finished, none unanswered."""
    files = short_tmp / "files"
    files.mkdir()
    config = base_config(short_tmp, handler=handler, mode=mode, shutdown_timeout=5)
    config["server.handler_options"] = {"root": str(files)}
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    client_for(short_tmp).pause()
    clients = []
    for i in range(5):
        sock = connect(address)  # completed by the kernel; sockd is not accepting
        sock.sendall(request_line % (i, i))
        clients.append(sock)
    proc.signal(signal.SIGTERM)
    replies = [read_outcome(sock) for sock in clients]
    assert all(reply_has.decode() in r for r in replies), replies
    assert [sock.recv(1) for sock in clients] == [b""] * 5  # then closed
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert stopped["backlog"] == 5 and stopped["backlog_closed"] == 0, stopped
    assert stopped["finished"] == 5 and stopped["unanswered"] == 0, stopped
    assert all(e["bytes_out"] > 0 for e in proc.all("conn.close"))
    for sock in clients:
        sock.close()


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_stop_does_not_count_unanswered_connections_as_finished(
    sockd_factory: Any, short_tmp: Path, mode: str
) -> None:
    """A handler that quits at the drain without reading its queued client's request: the
    client gets EOF, and server.stopped counts it unanswered, not finished."""
    config = base_config(short_tmp, handler="tests.handlers:NaiveDrain", mode=mode)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    client_for(short_tmp).pause()
    clients = []
    for i in range(3):
        sock = connect(address)
        sock.sendall(b"request-%d\n" % i)
        clients.append(sock)
    proc.signal(signal.SIGTERM)
    assert [read_outcome(sock) for sock in clients] == ["eof"] * 3
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert stopped["backlog"] == 3 and stopped["backlog_closed"] == 0, stopped
    assert (stopped["finished"], stopped["unanswered"], stopped["cut"]) == (0, 3, 0), stopped
    for sock in clients:
        sock.close()


def test_reload_removing_an_address_resets_none_of_its_queue(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Clients queued on an address a reload removes are served or get EOF, never a reset."""
    config = base_config(
        short_tmp,
        handler="tests.handlers:SlowReply",
        handler_options={"delay": 0.3},
        max_connections=1,
        listen=["127.0.0.1:0", "127.0.0.2:0"],
    )
    proc = sockd_factory(config)
    _, removed = proc.wait_ready(2)
    first = connect(removed)
    first.sendall(b"first\n")
    proc.wait_for("test.received")
    queued = []
    for i in range(3):
        sock = connect(removed)
        sock.sendall(f"queued-{i}\n".encode())
        queued.append(sock)
    config["server"]["listen"] = ["127.0.0.1:0"]
    write_config(proc, config)
    assert client_for(short_tmp).reload()["result"] == "applied"
    outcomes = [read_outcome(s) for s in queued]
    assert all(o in ("eof", f"done:queued-{i}\n") for i, o in enumerate(outcomes)), outcomes
    assert read_outcome(first) == "done:first\n"
    for sock in [first, *queued]:
        sock.close()


def test_connect_after_the_stop_began_is_refused_not_reset(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Once the drain began, a new client's connect fails (refused); it never succeeds and
    then gets reset."""
    config = base_config(short_tmp, handler="tests.handlers:Silent", shutdown_timeout=3)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    holder = connect(address)
    proc.wait_for("test.blocked")
    proc.signal(signal.SIGTERM)
    proc.wait_for("server.stopping")
    with pytest.raises(OSError) as info:
        connect(address, timeout=5).close()
    assert info.value.errno == errno.ECONNREFUSED
    holder.close()
    assert proc.wait_exit() == 0


# --------------------------------------------------------------------------- also fix


def test_refusals_just_before_a_stop_are_logged(sockd_factory: Any, short_tmp: Path) -> None:
    """A refusal in the last second before a stop is in a conn.refused line (flushed at the
    drain), not lost with the rate limit's pending count."""
    proc = sockd_factory(base_config(short_tmp, deny=["127.0.0.1/32"]))
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        assert sock.recv(1) == b""
    proc.wait_for("conn.refused")
    with connect(address) as sock:
        assert sock.recv(1) == b""  # refused, so counted: the stop comes right after
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    total = sum(e["counts"].get("denied", 0) for e in proc.all("conn.refused"))
    assert total == 2


def test_handler_raising_systemexit_is_a_handler_error(sockd_factory: Any, short_tmp: Path) -> None:
    """SystemExit or KeyboardInterrupt from a threading handler: handler.error with the
    traceback, ended="error", nothing on raw stderr."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:Exits"))
    (address,) = proc.wait_ready()
    for request, name in ((b"exit", "SystemExit"), (b"interrupt", "KeyboardInterrupt")):
        mark = proc.mark()
        with connect(address) as sock:
            sock.sendall(request)
            assert sock.recv(10) == b""
        error = proc.wait_for("handler.error", start=mark)
        assert error["error"].startswith(name)
        assert name in error["exception"]
        assert proc.wait_for("conn.close", start=mark)["ended"] == "error"
    with connect(address) as sock:  # the thread pool survived both
        sock.sendall(b"exit")
        assert sock.recv(10) == b""
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    assert "Traceback" not in proc.stderr


def test_forking_handler_raising_systemexit_is_a_handler_error(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Forking mode logs a handler's SystemExit the same way: handler.error, ended="error"."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:Exits", mode="forking"))
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        sock.sendall(b"exit")
        assert sock.recv(10) == b""
    assert "SystemExit" in proc.wait_for("handler.error")["exception"]
    assert proc.wait_for("conn.close")["ended"] == "error"


def test_idle_timeout_spares_a_steady_download(sockd_factory: Any, short_tmp: Path) -> None:
    """A client that only reads a slow but steady stream is not idle: it gets all of it."""
    config = base_config(
        short_tmp,
        handler="tests.handlers:Trickle",
        handler_options={"seconds": 1.5, "every": 0.1},
        idle_timeout=0.5,
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    received = b""
    with connect(address) as sock:
        while chunk := sock.recv(65536):
            received += chunk
    assert received.endswith(b"end\n")
    assert proc.wait_for("conn.close")["ended"] == "closed"


def test_bad_watchdog_usec_is_a_startup_error(sockd_factory: Any, short_tmp: Path) -> None:
    """WATCHDOG_USEC=abc: one line on stderr and one server.error in the log, exit 1, no
    control socket left behind."""
    proc = sockd_factory(env={"WATCHDOG_USEC": "abc"})
    assert proc.wait_exit() == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["sockd: WATCHDOG_USEC='abc' is not a positive integer"], proc.stderr
    [logged] = proc.all("server.error")
    assert logged["error"] == "WATCHDOG_USEC='abc' is not a positive integer"
    assert not (short_tmp / "ctl.sock").exists()


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param("\u00b2", "'\u00b2'", id="superscript-two"),
        pytest.param("9" * 5000, "'99999999999999999999'... (5000 characters)", id="5000-digits"),
    ],
)
def test_non_ascii_or_huge_watchdog_usec_is_a_startup_error(
    sockd_factory: Any, short_tmp: Path, value: str, shown: str
) -> None:
    """WATCHDOG_USEC that str.isdigit() takes but is no number ("²", 5000 digits): one
    short line on stderr naming the variable, exit 1, no control socket left behind."""
    proc = sockd_factory(env={"WATCHDOG_USEC": value})
    assert proc.wait_exit() == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"sockd: WATCHDOG_USEC={shown} is not a positive integer"], proc.stderr
    assert not (short_tmp / "ctl.sock").exists()


def test_broken_notify_socket_is_logged_once(sockd_factory: Any, short_tmp: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on is logged once (server.error, where=sd_notify), not
    on every notification."""
    missing = short_tmp / "no-such-notify.sock"
    proc = sockd_factory(env={"NOTIFY_SOCKET": str(missing)})
    proc.wait_ready()
    error = proc.wait_for("server.error", lambda e: e.get("where") == "sd_notify")
    assert str(missing) in error["error"]
    for _ in range(2):  # each reload sends RELOADING=1 and READY=1
        mark = proc.mark()
        proc.signal(signal.SIGHUP)
        proc.wait_for("reload.applied", start=mark)
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0
    errors = [e for e in proc.all("server.error") if e.get("where") == "sd_notify"]
    assert len(errors) == 1


# --------------------------------------------------------------------------- thread limit


class UidSockd(SockdProcess):
    """``SockdProcess``, but the daemon runs as ``uid`` (through setpriv), with at most
    ``nproc`` tasks (processes and threads) for that uid if given."""

    def __init__(self, config_path: Path, uid: int, nproc: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
        env["PYTHONPATH"] = str(REPO)
        self.config_path = config_path
        setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        self.proc = subprocess.Popen(
            [*setpriv, sys.executable, "-m", "sockd", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            # Lowering a limit needs no privilege; it is inherited through setpriv's exec.
            # preexec_fn is safe here: the test process forks before any thread of its
            # own takes a lock the child would need.
            preexec_fn=(  # noqa: PLW1509
                (lambda: resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc)))
                if nproc
                else None
            ),
        )
        self.events = []
        self.raw_lines = []
        self.stderr = ""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()


def _unused_uid() -> int:
    """A uid no account has and no process runs as: RLIMIT_NPROC counts per uid."""
    import pwd

    taken = {p.pw_uid for p in pwd.getpwall()}
    running = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                running.add(os.stat(f"/proc/{entry}").st_uid)
    for uid in range(61_000 + os.getpid() % 1000, 65_000):
        if uid not in taken and uid not in running:
            return uid
    pytest.skip("no unused uid found for the thread-limit test")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_thread_limit_refusals_are_counted_not_tracebacks(short_tmp: Path, mode: str) -> None:
    """At the process's task limit (RLIMIT_NPROC for its uid) a connection that gets no
    thread (or child) is closed and counted as refused (reason="threads"), no traceback."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs sockd under a uid of its own with a thread limit")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    require_reachable_by_others()
    uid = _unused_uid()
    os.chown(short_tmp, uid, uid)
    config = base_config(short_tmp, handler="tests.handlers:Silent", max_spare_threads=0, mode=mode)
    path = short_tmp / "sockd.toml"
    path.write_text(render_config(config))
    probe = UidSockd(path, uid)  # how many threads sockd runs before any connection
    try:
        probe.wait_ready()
        baseline = _threads(probe.pid)
        probe.signal(signal.SIGTERM)
        assert probe.wait_exit() == 0
    finally:
        probe.kill()
    # Room for exactly two connection threads or children (nothing else runs as this uid).
    proc = UidSockd(path, uid, nproc=baseline + 2)
    try:
        (address,) = proc.wait_ready()
        held = [connect(address) for _ in range(2)]
        proc.wait_count("test.blocked", 2)
        refused = []
        for _ in range(3):
            sock = connect(address)
            refused.append(read_outcome(sock))
            sock.close()
        assert refused == ["eof"] * 3
        summary = proc.wait_for("conn.refused", timeout=5)
        assert summary["counts"] == {"threads": 3}
        assert not proc.all("server.error")
        for sock in held:
            sock.close()
        proc.wait_count("conn.close", 2)  # their threads are gone: control requests fit
        metrics = client_for(short_tmp).metrics()
        assert 'sockd_connections_refused_total{reason="threads"} 3' in metrics
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
        assert "Traceback" not in proc.stderr
    finally:
        proc.kill()
