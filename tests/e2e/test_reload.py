"""Hot reload against the real daemon: nothing refused or reset, everything applied or nothing."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sockctl.client import ControlClient, DaemonError
from tests.conftest import SockdProcess, base_config, connect, recv_exactly, render_config


class Load:
    """Clients that keep connecting and exchanging numbered messages until told to stop.

    Half the workers open a fresh connection per exchange (so every accept during the
    reloads is exercised); the other half keep one connection and exchange on it
    (in-flight connections must survive every reload). Every failure is recorded.
    """

    def __init__(self, address: tuple[str, int], workers: int = 6) -> None:
        self.address = address
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i, i % 2 == 0), daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def wait_for_progress(self, more: int, timeout: float = 10) -> None:
        target = self.ok + more
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled: {self.failures[:5]}"
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(20)

    @staticmethod
    def _exchange(sock: socket.socket, n: int) -> None:
        payload = f"msg-{n:09d}".encode()
        sock.sendall(payload)
        reply = b""
        while not reply.endswith(payload):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed mid-exchange after {reply!r}")
            reply += chunk
        if reply not in (payload, b"a:" + payload, b"B:" + payload):
            raise AssertionError(f"wrong reply {reply!r} to {payload!r}")

    def _run(self, worker: int, persistent: bool) -> None:
        n = worker * 10_000_000
        sock: socket.socket | None = None
        while not self._stop.is_set():
            n += 1
            try:
                if sock is None:
                    sock = connect(self.address, timeout=10)
                self._exchange(sock, n)
                if not persistent:
                    sock.close()
                    sock = None
                with self._lock:
                    self.ok += 1
            except Exception as exc:  # every failure is the test's business
                with self._lock:
                    self.failures.append(f"worker {worker} #{n}: {type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


def write_config(proc: SockdProcess, sections: dict[str, dict[str, Any]]) -> None:
    proc.config_path.write_text(render_config(sections))


def client_for(short_tmp: Path) -> ControlClient:
    return ControlClient(str(short_tmp / "ctl.sock"), timeout=30)


def test_reload_under_load_never_drops_a_connection(sockd_factory: Any, short_tmp: Path) -> None:
    """Handler change, address added/removed, mode switched both ways: zero failed exchanges."""
    config = base_config(short_tmp)
    config["logging"]["level"] = "info"
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    ctl = client_for(short_tmp)
    load = Load(address)
    load.start()
    load.wait_for_progress(50)

    steps: list[tuple[str, dict[str, Any]]] = [
        ("handler", {"handler": "tests.handlers:Tagged"}),
        ("listen+", {"handler": "tests.handlers:Tagged", "listen": ["127.0.0.1:0", "127.0.0.2:0"]}),
        (
            "mode",
            {
                "handler": "tests.handlers:TaggedB",
                "mode": "forking",
                "listen": ["127.0.0.1:0", "127.0.0.2:0"],
            },
        ),
        ("listen-", {"handler": "tests.handlers:TaggedB", "mode": "forking"}),
        ("mode back", {"handler": "sockd.handlers:EchoHandler", "mode": "threading"}),
    ]
    generation = ctl.status()["generation"]
    for _round in range(2):
        for name, server in steps:
            sections = base_config(short_tmp, **server)
            sections["logging"]["level"] = "info"
            write_config(proc, sections)
            result = ctl.reload()
            assert result["result"] == "applied", name
            generation += 1
            assert result["generation"] == generation
            load.wait_for_progress(30)
        # the same through SIGHUP
        mark = proc.mark()
        proc.signal(signal.SIGHUP)
        proc.wait_for("reload.applied", start=mark)
        generation += 1
        load.wait_for_progress(30)
    load.stop()
    assert load.failures == []
    assert load.ok > 500
    assert ctl.status()["generation"] == generation
    applied = proc.all("reload.applied")
    assert any("server.mode" in e["changes"] for e in applied)
    assert any("server.listen" in e["changes"] for e in applied)
    assert any("server.handler" in e["changes"] for e in applied)


def test_added_address_serves_and_removed_one_stops(sockd_factory: Any, short_tmp: Path) -> None:
    """A reload binds new addresses before anything else and closes removed ones."""
    proc = sockd_factory(base_config(short_tmp))
    (address,) = proc.wait_ready()
    ctl = client_for(short_tmp)
    holder = socket.socket()
    holder.bind(("127.0.0.3", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    # A bind failure rejects the whole reload: nothing else changes.
    write_config(
        proc,
        base_config(short_tmp, listen=["127.0.0.1:0", f"127.0.0.3:{taken}"], mode="forking"),
    )
    with pytest.raises(DaemonError) as info:
        ctl.reload()
    assert any("127.0.0.3" in e for e in info.value.errors)
    status = ctl.status()
    assert status["mode"] == "threading"
    assert status["listen"] == [f"{address[0]}:{address[1]}"]
    holder.close()
    write_config(proc, base_config(short_tmp, listen=["127.0.0.1:0", "127.0.0.4:0"]))
    assert ctl.reload()["result"] == "applied"
    added = proc.wait_for("server.listening", lambda e: e["address"].startswith("127.0.0.4:"))
    port = int(added["address"].rsplit(":", 1)[1])
    with connect(("127.0.0.4", port)) as sock:
        sock.sendall(b"new")
        assert recv_exactly(sock, 3) == b"new"
    in_flight = connect(("127.0.0.4", port))
    write_config(proc, base_config(short_tmp))
    assert ctl.reload()["result"] == "applied"
    with pytest.raises(OSError):
        connect(("127.0.0.4", port), timeout=2).close()
    in_flight.sendall(b"still")  # accepted before the removal: keeps being served
    assert recv_exactly(in_flight, 5) == b"still"
    in_flight.close()


def test_rejected_reload_changes_nothing(sockd_factory: Any, short_tmp: Path) -> None:
    """An invalid file is reported with every error; the daemon runs exactly as before."""
    proc = sockd_factory(base_config(short_tmp))
    (address,) = proc.wait_ready()
    ctl = client_for(short_tmp)
    before = ctl.config()
    proc.config_path.write_text('[server]\nmode = "forked"\nlisten = ["nonsense"]\n')
    with pytest.raises(DaemonError) as info:
        ctl.reload()
    assert info.value.exit_code == 78
    errors = info.value.errors
    assert any(e.startswith("server.mode:") for e in errors)
    assert any(e.startswith("server.listen:") for e in errors)
    rejected = proc.wait_for("reload.rejected")
    assert len(rejected["errors"]) == 2
    after = ctl.config()
    assert after == before
    status = ctl.status()
    assert status["last_reload"] is not None
    assert status["last_reload"]["result"] == "rejected"
    with connect(address) as sock:
        sock.sendall(b"ok")
        assert recv_exactly(sock, 2) == b"ok"


def test_log_level_reload_applies_live(sockd_factory: Any, short_tmp: Path) -> None:
    """A reload that lowers the level to warning stops conn.close lines at once."""
    config = base_config(short_tmp)
    config["logging"]["level"] = "info"
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    ctl = client_for(short_tmp)
    config["logging"]["level"] = "warning"
    write_config(proc, config)
    result = ctl.reload()
    assert result["changes"] == [{"key": "logging.level", "old": "info", "new": "warning"}]
    mark = proc.mark()
    with connect(address) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    deadline = time.monotonic() + 10
    while ctl.status()["connections"]["active"]:  # the server has finished with it
        assert time.monotonic() < deadline
    ctl.set_log_level("info")  # its own event marks a point after the connection closed
    proc.wait_for("log.level_changed", start=mark)
    assert all(e["event"] != "conn.close" for e in proc.events[mark:])
