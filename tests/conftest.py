"""Shared fixtures: short socket directories, config files, and a real ``sockd`` subprocess.

``SockdProcess`` starts the real daemon (``python -m sockd``) and reads its JSON log
lines from stdout in a thread, so tests wait on an observable event (a log line, an
exit) with a deadline instead of sleeping.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sockctl.client import ControlClient

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (AF_UNIX paths are limited to ~108 bytes)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="sk")
    os.chmod(path, 0o755)  # noqa: S103  # other test users must reach sockets inside
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def render_config(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def base_config(tmp: Path, **server: Any) -> dict[str, dict[str, Any]]:
    """A config on an ephemeral loopback port, JSON logs at debug, control socket in ``tmp``."""
    return {
        "server": {"listen": ["127.0.0.1:0"], "shutdown_timeout": 5, **server},
        "logging": {"level": "debug", "format": "json", "output": "stdout"},
        "control": {"socket": str(tmp / "ctl.sock")},
    }


@contextlib.contextmanager
def system_group(name: str) -> Iterator[int]:
    """The gid of group ``name``, created with groupadd if absent and then removed again.

    Skips (saying why) where groupadd/groupdel are missing; a group that existed before
    is left alone.
    """
    if shutil.which("groupadd") is None or shutil.which("groupdel") is None:
        pytest.skip("groupadd/groupdel are not installed (Debian: passwd)")
    created = False
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        gid, created = grp.getgrnam(name).gr_gid, True
    try:
        yield gid
    finally:
        if created:
            subprocess.run(["groupdel", name], check=False, capture_output=True)


class SockdProcess:
    """A real sockd subprocess whose JSON log lines are collected as they arrive."""

    def __init__(
        self,
        config_path: Path,
        extra_env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.update(extra_env or {})
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockd", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
            # preexec_fn is safe here: the test process forks before any thread of
            # its own takes a lock the child would need.
            preexec_fn=(  # noqa: PLW1509
                (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
                if nofile
                else None
            ),
        )
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self.stderr = ""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw_lines.append(line)
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        data = self.proc.stderr.read()
        with self._cond:
            self.stderr = data.decode("utf-8", "replace")
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = DEADLINE,
        start: int = 0,
    ) -> dict[str, Any]:
        """The first event named ``event`` (from index ``start``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[start:]:
                    if e.get("event") == event and predicate(e):
                        return e
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {event!r} event within {timeout}s; rc={self.proc.poll()}; "
                        f"stderr={self.stderr[-2000:]!r}; last lines={self.raw_lines[-15:]!r}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = DEADLINE) -> str:
        """The first raw output line matching ``predicate`` (for non-JSON formats)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.raw_lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no matching line; last lines={self.raw_lines[-15:]!r}")
                self._cond.wait(min(remaining, 0.2))

    def wait_count(
        self,
        event: str,
        count: int,
        predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = DEADLINE,
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` matching events arrived; return all of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == event and predicate(e)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{len(found)} of {count} {event!r} events within {timeout}s; "
                        f"last lines={self.raw_lines[-10:]!r}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def all(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event]

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_ready(self, count: int = 1) -> list[tuple[str, int]]:
        """Wait for ``count`` listening addresses; return them as (host, port)."""
        self.wait_for("server.listening")
        deadline = time.monotonic() + DEADLINE
        while len(self.all("server.listening")) < count:
            if time.monotonic() > deadline:
                raise AssertionError("not all addresses listening")
            self.wait_for("server.listening", start=len(self.all("server.listening")), timeout=1)
        out = []
        for e in self.all("server.listening")[:count]:
            host, _, port = e["address"].rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        self._err_reader.join(timeout)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def sockd_factory(short_tmp: Path) -> Iterator[Callable[..., SockdProcess]]:
    """Start real sockd processes from config dicts; every one is killed at teardown."""
    started: list[SockdProcess] = []

    def start(
        config: dict[str, dict[str, Any]] | str | None = None,
        env: dict[str, str] | None = None,
        name: str = "sockd.toml",
        nofile: int | None = None,
    ) -> SockdProcess:
        if config is None:
            config = base_config(short_tmp)
        text = config if isinstance(config, str) else render_config(config)
        path = short_tmp / name
        path.write_text(text)
        proc = SockdProcess(path, env, nofile)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def connect(address: tuple[str, int], timeout: float = DEADLINE) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (zombies included)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append(int(entry))
    return out


__all__ = [  # noqa: RUF022  # grouped by kind, not sorted
    "DEADLINE",
    "REPO",
    "SockdProcess",
    "base_config",
    "children_of",
    "cpu_seconds",
    "connect",
    "recv_exactly",
    "recv_line",
    "render_config",
    "signal",
]


def metric(ctl: ControlClient, name: str) -> float:
    """One unlabelled sample from the daemon's /metrics."""
    for line in ctl.metrics().splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def require_reachable_by_others(*paths: Path) -> None:
    """Skip unless an unprivileged user can reach ``paths`` (by default: this checkout's
    Python and the checkout itself, to run sockctl).

    Tests that act as ``nobody`` run an interpreter as that user; a checkout under a
    private directory (``mktemp -d`` makes them 0700) is out of that user's reach.
    """
    for path in paths or (Path(sys.executable).absolute(), REPO):
        for directory in path.parents if path.is_file() else (path, *path.parents):
            if not directory.stat().st_mode & stat.S_IXOTH:
                pytest.skip(
                    f"{directory} is not searchable by other users, so nobody cannot run "
                    f"this checkout's {path.name}: clone it somewhere world-searchable"
                )
