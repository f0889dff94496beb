"""Limits, access rules and faults against the real daemon: it keeps serving and says why."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sockctl.client import ControlClient
from tests.conftest import (
    base_config,
    children_of,
    connect,
    cpu_seconds,
    metric,
    recv_exactly,
    recv_line,
)


def echo_once(address: tuple[str, int], payload: bytes = b"ping", **kw: Any) -> bytes:
    with socket.create_connection(address, timeout=10, **kw) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def served(sock: socket.socket, timeout: float) -> bool:
    """Whether an echo comes back on ``sock`` within ``timeout`` seconds."""
    sock.settimeout(timeout)
    sock.sendall(b"?")
    try:
        return sock.recv(1) == b"?"
    except TimeoutError:
        return False
    finally:
        sock.settimeout(10)


def closed_by_server(sock: socket.socket) -> bool:
    """EOF or a reset (unread data makes the kernel reset instead of FIN)."""
    sock.settimeout(5)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def labelled_metric(ctl: ControlClient, name: str, label: str) -> float:
    for line in ctl.metrics().splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refused_total(proc: Any, reason: str, expected: int) -> int:
    """Sum a reason over the summarised conn.refused lines until ``expected`` is reached."""
    deadline = time.monotonic() + 10
    while True:
        total = sum(e["counts"].get(reason, 0) for e in proc.all("conn.refused"))
        if total >= expected or time.monotonic() > deadline:
            return total
        proc.wait_for("conn.refused", start=proc.mark(), timeout=3)


def ctl_for(tmp: Path) -> ControlClient:
    return ControlClient(str(tmp / "ctl.sock"), timeout=10)


def test_max_connections_wait_leaves_excess_in_backlog(sockd_factory: Any, short_tmp: Path) -> None:
    """At max_connections the next client waits (not refused) and is served when a slot frees."""
    proc = sockd_factory(base_config(short_tmp, max_connections=2))
    (address,) = proc.wait_ready()
    first, second = connect(address), connect(address)
    assert served(first, 5) and served(second, 5)
    waiting = connect(address)  # the kernel completes the handshake; sockd does not accept
    assert not served(waiting, 0.5)
    throttled = proc.wait_for("server.throttled")
    assert throttled["counts"] == {"max_connections": 1}
    first.close()
    assert served(waiting, 5)
    assert labelled_metric(ctl_for(short_tmp), "sockd_throttled_total", "max_connections") >= 1
    second.close()
    waiting.close()


def test_max_connections_refuse_closes_at_once(sockd_factory: Any, short_tmp: Path) -> None:
    """With on_limit = "refuse" the excess is closed at once, counted and logged (summarised)."""
    proc = sockd_factory(base_config(short_tmp, max_connections=1, on_limit="refuse"))
    (address,) = proc.wait_ready()
    holder = connect(address)
    assert served(holder, 5)
    for _ in range(5):
        with connect(address) as extra:
            extra.settimeout(5)
            assert extra.recv(10) == b""
    refused = proc.wait_for("conn.refused")
    assert refused["counts"]["max_connections"] >= 1
    assert len(proc.all("conn.refused")) < 5  # one summary line, not one per peer
    ctl = ctl_for(short_tmp)
    assert labelled_metric(ctl, "sockd_connections_refused_total", "max_connections") == 5
    assert served(holder, 5)
    holder.close()


def test_max_per_ip_counts_each_address(sockd_factory: Any, short_tmp: Path) -> None:
    """A third connection from one address is closed; another address still gets in."""
    proc = sockd_factory(base_config(short_tmp, listen=["127.0.0.1:0"], max_per_ip=2))
    (address,) = proc.wait_ready()
    a, b = connect(address), connect(address)
    assert served(a, 5) and served(b, 5)
    with connect(address) as third:
        third.settimeout(5)
        assert third.recv(10) == b""
    assert echo_once(address, b"other", source_address=("127.0.0.2", 0)) == b"other"
    assert refused_total(proc, "max_per_ip", 1) == 1
    a.close()
    b.close()


def test_rate_per_ip_refuses_a_burst_beyond_the_bucket(sockd_factory: Any, short_tmp: Path) -> None:
    """With rate_burst = 3 and a slow rate, the 4th..10th immediate connections from one
    address are closed unserved; another address is unaffected; the refusals are
    counted and summarised under rate_per_ip."""
    config = base_config(short_tmp, listen=["127.0.0.1:0"], rate_per_ip=0.2, rate_burst=3)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    answered = 0
    for _ in range(10):
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"x")
            with contextlib.suppress(ConnectionResetError):
                answered += sock.recv(1) == b"x"
    # 3 from the bucket; at 0.2/s at most one more token can appear in a slow run.
    assert 3 <= answered <= 4, answered
    assert echo_once(address, b"other", source_address=("127.0.0.2", 0)) == b"other"
    assert refused_total(proc, "rate_per_ip", 10 - answered) == 10 - answered
    samples = ctl_for(short_tmp).metrics()
    assert f'sockd_connections_refused_total{{reason="rate_per_ip"}} {10 - answered}' in samples


def test_allow_and_deny_refuse_before_handler(sockd_factory: Any, short_tmp: Path) -> None:
    """Denied peers never reach handler code (no conn.open); deny wins over allow."""
    config = base_config(
        short_tmp,
        listen=["127.0.0.1:0"],
        allow=["127.0.0.0/24"],
        deny=["127.0.0.3/32"],
        handler="tests.handlers:Boom",
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    for source in ("127.0.0.3", "127.0.1.1"):
        with socket.create_connection(address, timeout=5, source_address=(source, 0)) as sock:
            sock.sendall(b"boom")
            assert closed_by_server(sock)
    assert echo_once(address, b"hi", source_address=("127.0.0.2", 0)) == b"hi"
    proc.wait_for("conn.close")
    assert refused_total(proc, "denied", 2) == 2
    assert {k for e in proc.all("conn.refused") for k in e["counts"]} == {"denied"}
    opened = [e["peer_addr"] for e in proc.all("conn.open")]
    assert opened == ["127.0.0.2"]
    assert proc.all("handler.error") == []


def test_idle_timeout_closes_silent_connections(sockd_factory: Any, short_tmp: Path) -> None:
    """A connection that sends nothing is closed after idle_timeout; a chatty one is not."""
    config = base_config(short_tmp, idle_timeout=0.5, handler="tests.handlers:Silent")
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    quiet = connect(address)
    chatty = connect(address)
    stop = threading.Event()

    def chat() -> None:
        while not stop.wait(0.1):  # traffic every 0.1 s: the workload, not a synchronisation
            chatty.sendall(b".")

    talker = threading.Thread(target=chat, daemon=True)
    talker.start()
    quiet.settimeout(10)
    assert quiet.recv(10) == b""  # closed by the server
    closed = proc.wait_for("conn.close")
    assert closed["ended"] == "idle_timeout"
    assert closed["duration_ms"] >= 500
    stop.set()
    talker.join(5)
    open_ids = [c["id"] for c in ctl_for(short_tmp).connections()["connections"]]
    assert len(open_ids) == 1  # the chatty one survived
    chatty.close()
    quiet.close()


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_max_connection_duration_closes_even_a_busy_connection(
    sockd_factory: Any, short_tmp: Path, mode: str
) -> None:
    """A client trickling a byte every 0.1 s (never idle) is closed at
    max_connection_duration, with ended="max_duration"; the server keeps serving."""
    config = base_config(
        short_tmp, max_connection_duration=0.6, handler="tests.handlers:Silent", mode=mode
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    trickler = connect(address)
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.1):  # the workload: never idle for long
                trickler.sendall(b".")

    talker = threading.Thread(target=trickle, daemon=True)
    talker.start()
    try:
        trickler.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while trickler.recv(10):  # Silent never answers: only the close ends this
                pass
        closed = proc.wait_for("conn.close")
        assert closed["ended"] == "max_duration"
        assert 600 <= closed["duration_ms"] < 5000
    finally:
        stop.set()
        talker.join(5)
        trickler.close()
    mark = proc.mark()
    with connect(address):  # still accepting and running handlers
        proc.wait_for("test.blocked", start=mark)


def test_forking_max_children_does_not_block_loop(sockd_factory: Any, short_tmp: Path) -> None:
    """At max_children the loop keeps running: control answers, SIGTERM drains promptly."""
    config = base_config(
        short_tmp,
        mode="forking",
        max_children=2,
        handler="tests.handlers:Silent",
        shutdown_timeout=1,
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    held = [connect(address) for _ in range(2)]
    deadline = time.monotonic() + 10
    while len(proc.all("test.blocked")) < 2 and time.monotonic() < deadline:
        proc.wait_for("test.blocked", timeout=1)
    assert len(proc.all("test.blocked")) == 2
    waiting = connect(address)
    proc.wait_for("server.throttled")
    status = ctl_for(short_tmp).status()
    assert status["connections"]["active"] == 2
    assert len(children_of(proc.pid)) == 2
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(15) == 0
    for sock in [*held, waiting]:
        sock.close()


def test_handler_errors_in_setup_and_finish(sockd_factory: Any, short_tmp: Path) -> None:
    """Exceptions in setup() and finish() are logged; the daemon keeps serving."""
    for handler in ("SetupBoom", "FinishBoom"):
        proc = sockd_factory(
            base_config(short_tmp, handler=f"tests.handlers:{handler}"), name=f"{handler}.toml"
        )
        (address,) = proc.wait_ready()
        for _ in range(3):
            with connect(address) as sock:
                sock.sendall(b"x")
                # SetupBoom closes without reading "x": the kernel may answer with a reset.
                assert closed_by_server(sock) if handler == "SetupBoom" else sock.recv(10) == b"x"
        error = proc.wait_for("handler.error")
        assert "exploded on purpose" in error["exception"]
        assert len(proc.wait_count("handler.error", 3)) == 3
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0


def test_broken_peers_do_not_harm_others(sockd_factory: Any, short_tmp: Path) -> None:
    """Resets mid-stream, half-closes and silent connects leave other clients unaffected."""
    proc = sockd_factory(base_config(short_tmp))
    (address,) = proc.wait_ready()
    bystander = connect(address)
    for _ in range(10):  # reset while the server is still sending a large echo back
        sock = connect(address)
        sock.sendall(b"z" * 1_000_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    with connect(address) as half:  # half-close: the reply still arrives in full
        half.sendall(b"h" * 100_000)
        half.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := half.recv(65536):
            got += chunk
        assert got == b"h" * 100_000
    silent = [connect(address) for _ in range(5)]
    assert served(bystander, 5)
    assert echo_once(address) == b"ping"
    for sock in silent:
        sock.close()
    bystander.close()
    assert ctl_for(short_tmp).status()["state"] == "running"


def test_fd_limit_stops_accepting_before_emfile(sockd_factory: Any, short_tmp: Path) -> None:
    """Under a low ulimit -n, excess connections wait; control answers; service resumes."""
    proc = sockd_factory(base_config(short_tmp), nofile=80)
    (address,) = proc.wait_ready()
    socks = [connect(address) for _ in range(60)]
    answered = [s for s in socks if served(s, 0.3)]
    assert 5 <= len(answered) < 60
    proc.wait_for("server.throttled", lambda e: "fd_limit" in e["counts"])
    ctl = ctl_for(short_tmp)
    assert ctl.status()["connections"]["active"] == len(answered)
    before = cpu_seconds(proc.pid)
    time.sleep(1.0)  # sleep-ok: a fixed window to measure CPU use, not a synchronisation
    assert cpu_seconds(proc.pid) - before < 0.3  # not spinning
    for sock in answered:
        sock.close()
    waiting = [s for s in socks if s not in answered]
    assert all(served(s, 5) for s in waiting[: len(answered) - 1])
    for sock in socks:
        sock.close()
    assert proc.all("accept.error") == []


def test_emfile_backs_off_and_recovers(sockd_factory: Any, short_tmp: Path) -> None:
    """A handler that uses up every descriptor: accept errors are logged rate-limited,
    the loop backs off instead of spinning, control still answers, service resumes."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:FdHog"), nofile=64)
    (address,) = proc.wait_ready()
    hog = connect(address)
    proc.wait_for("test.hogging")
    pending = [connect(address) for _ in range(3)]
    error = proc.wait_for("accept.error")
    assert error["errno"] == "EMFILE"
    before = cpu_seconds(proc.pid)
    time.sleep(1.5)  # sleep-ok: a fixed window to measure CPU use, not a synchronisation
    assert cpu_seconds(proc.pid) - before < 0.4  # backing off, not spinning
    assert len(proc.all("accept.error")) <= 4  # rate-limited
    status = ControlClient(str(short_tmp / "ctl.sock"), timeout=10).status()
    assert status["state"] == "running"
    hog.close()
    proc.wait_for("conn.close")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda s: s.sendall(b"."), pending))
    assert proc.wait_for("conn.open", lambda e: e["conn_id"] > 1)


def test_sighup_storm_serialises_reloads(sockd_factory: Any, short_tmp: Path) -> None:
    """50 SIGHUPs in a burst give serialised reloads and a consistent state."""
    proc = sockd_factory(base_config(short_tmp))
    (address,) = proc.wait_ready()
    ctl = ctl_for(short_tmp)
    for _ in range(50):
        os.kill(proc.pid, signal.SIGHUP)
    ctl.reload()  # by the time this is handled, the signals have reached the main loop
    last = ctl.reload()  # ... and their (coalesced) reload ran right after the first one
    proc.wait_for("reload.applied", lambda e: e["generation"] == last["generation"])
    status = ctl.status()
    applied = proc.all("reload.applied")
    assert 3 <= len(applied) <= 52
    assert [e["generation"] for e in applied] == list(range(2, 2 + len(applied)))
    assert status["generation"] == last["generation"]
    assert status["state"] == "running"
    assert echo_once(address) == b"ping"


def test_sigterm_during_reload_still_drains(sockd_factory: Any, short_tmp: Path) -> None:
    """SIGHUP immediately followed by SIGTERM: the in-flight request completes, exit 0."""
    config = base_config(short_tmp, handler="tests.handlers:SlowReply")
    config["server.handler_options"] = {"delay": 0.5}
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    sock = connect(address)
    sock.sendall(b"req\n")
    proc.wait_for("test.received")
    os.kill(proc.pid, signal.SIGHUP)
    os.kill(proc.pid, signal.SIGTERM)
    assert recv_line(sock) == b"done:req\n"
    assert proc.wait_exit() == 0
    assert proc.wait_for("server.stopped")["cut"] == 0
    sock.close()


def test_killed_child_is_logged_and_counted(sockd_factory: Any, short_tmp: Path) -> None:
    """SIGKILL to a forking child: child.exited with the signal, conn.close ended=killed."""
    proc = sockd_factory(base_config(short_tmp, mode="forking", handler="tests.handlers:Silent"))
    (address,) = proc.wait_ready()
    sock = connect(address)
    child = proc.wait_for("test.blocked")["pid"]
    os.kill(child, signal.SIGKILL)
    exited = proc.wait_for("child.exited")
    assert exited["signal"] == "SIGKILL"
    assert exited["pid"] == child
    closed = proc.wait_for("conn.close")
    assert closed["ended"] == "killed"
    assert metric(ctl_for(short_tmp), "sockd_children_killed_total") == 1
    assert ctl_for(short_tmp).status()["state"] == "running"
    assert children_of(proc.pid) == []  # reaped, no zombie
    sock.close()
    with connect(address):
        proc.wait_count("test.blocked", 2)  # still accepting and forking


def test_control_flood_does_not_stall_data_plane(sockd_factory: Any, short_tmp: Path) -> None:
    """Hundreds of concurrent, slow control clients; echoes keep flowing; control recovers."""
    config = base_config(short_tmp)
    config["control"]["request_timeout"] = 2
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    path = str(short_tmp / "ctl.sock")
    slow: list[socket.socket] = []
    for _ in range(300):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(path)
            sock.sendall(b"GET /v1/sta")  # and never finish the request
        except OSError:
            sock.close()
            continue
        slow.append(sock)
    assert len(slow) >= 64
    latencies = []
    with connect(address) as data:
        for _ in range(200):
            began = time.monotonic()
            data.sendall(b"x" * 64)
            assert recv_exactly(data, 64) == b"x" * 64
            latencies.append(time.monotonic() - began)
    assert max(latencies) < 1.0
    for sock in slow:
        sock.close()
    assert ControlClient(path, timeout=10).status()["state"] == "running"


def test_peer_hanging_up_is_not_a_handler_error(sockd_factory: Any, short_tmp: Path) -> None:
    """A client that resets mid-reply ends as peer_gone, with no handler.error traceback."""
    for mode in ("threading", "forking"):
        proc = sockd_factory(
            base_config(short_tmp, handler="tests.handlers:Chatter", mode=mode),
            name=f"{mode}.toml",
        )
        (address,) = proc.wait_ready()
        sock = connect(address)
        sock.recv(1000)
        proc.wait_for("test.blocked")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        closed = proc.wait_for("conn.close")
        assert closed["ended"] == "peer_gone"
        assert proc.all("handler.error") == []
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
