"""What an operator meets in sockctl's first week (issue 12), against the real daemon.

The real ``sockd`` subprocess (tests/conftest.py) driven by the real ``sockctl``
executable (or ``python -m sockctl``): a follow that outlives quiet periods, ``--json``
after the command, a broken ``--config`` file, the ``warn`` alias, one version line
shape, and ``stop`` under systemd.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEADLINE, REPO, base_config, connect, recv_exactly
from tests.e2e.test_control_e2e import SOCKCTL, ctl, sockctl

pytestmark = pytest.mark.skipif(
    SOCKCTL is None, reason="the sockctl command is not installed (pip install -e .)"
)


def _env() -> dict[str, str]:
    """The environment ``sockctl`` runs with: no $SOCKD_CONTROL_SOCKET, the tests importable."""
    env = {k: v for k, v in os.environ.items() if k != "SOCKD_CONTROL_SOCKET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Follower:
    """A ``sockctl ... logs -f`` subprocess whose stdout lines arrive on a queue."""

    def __init__(self, *args: str) -> None:
        assert SOCKCTL is not None
        self.proc = subprocess.Popen(
            [SOCKCTL, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def next_event(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next NDJSON event printed, within ``timeout`` seconds."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"sockctl logs -f printed nothing within {timeout}s") from None
        assert line is not None, f"sockctl logs -f ended early: {self.stderr()!r}"
        event: dict[str, Any] = json.loads(line)
        return event

    def next_line_with(self, text: str, timeout: float = DEADLINE) -> str:
        """The next printed line containing ``text`` (a traceback's lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout}s") from None
            assert line is not None, f"sockctl logs -f ended early: {self.stderr()!r}"
            if text in line:
                return line

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)


def _boom(address: tuple[str, int]) -> None:
    """Make ``tests.handlers:Boom`` raise: one ``handler.error`` event at level error."""
    with connect(address) as sock:
        sock.sendall(b"boom")
        assert recv_exactly(sock, 1) == b""  # the handler raised and the connection closed


# --------------------------------------------------------------------------- logs -f


def test_logs_follow_outlives_quiet_periods_then_ends_with_the_daemon(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """``logs -f --level error --timeout 1`` stays up through quiet seconds, prints the
    next error as it happens, and exits 0 when sockd stops."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:Boom"))
    (address,) = proc.wait_ready()
    _boom(address)  # history, so the follower shows it is connected
    proc.wait_for("handler.error")
    sock = str(short_tmp / "ctl.sock")
    follower = Follower("--socket", sock, "--timeout", "1", "logs", "-f", "--level", "error")
    try:
        follower_json = Follower(
            "--socket", sock, "--timeout", "1", "logs", "-f", "--level", "error", "--json"
        )
        try:
            assert follower_json.next_event()["event"] == "handler.error"
            assert " ERROR " in follower.next_line_with(" handler.error ")
            # Three of its own timeouts without a matching event: still following.
            with pytest.raises(subprocess.TimeoutExpired):
                follower_json.proc.wait(3.0)  # sleep-ok: the quiet period under test
            assert follower.proc.poll() is None, follower.stderr()
            _boom(address)
            live = follower_json.next_event()
            assert live["event"] == "handler.error" and live["level"] == "error"
            assert " ERROR " in follower.next_line_with(" handler.error ")
            assert ctl(short_tmp, "stop").returncode == 0
            assert follower_json.proc.wait(DEADLINE) == 0
            assert follower.proc.wait(DEADLINE) == 0
            assert follower_json.stderr() == "sockctl: sockd closed the log stream (stopped?)\n"
            assert follower.stderr() == "sockctl: sockd closed the log stream (stopped?)\n"
        finally:
            follower_json.close()
    finally:
        follower.close()
    assert proc.wait_exit() == 0


def test_logs_follow_notices_a_killed_daemon_whose_children_live_on(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """A SIGKILLed forking sockd ends ``logs -f`` (exit 1, one line) even while a child it
    forked still serves a connection: children do not keep the log stream open."""
    config = base_config(short_tmp, mode="forking", handler="tests.handlers:Silent")
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    follower = Follower("--socket", str(short_tmp / "ctl.sock"), "logs", "-f", "--json", "-n", "1")
    try:
        follower.next_event()  # connected and streaming
        with connect(address):
            proc.wait_for("test.blocked")  # a child forked after the follow holds this one
            proc.signal(signal.SIGKILL)
            proc.wait_exit()
            assert follower.proc.wait(DEADLINE) == 1
        err = follower.stderr()
        assert err.startswith("sockctl: the log stream from "), err
        assert len(err.splitlines()) == 1
    finally:
        follower.close()


# --------------------------------------------------------------------------- --json


def test_json_flag_after_the_command(sockd_factory: Any, short_tmp: Path) -> None:
    """``sockctl status --json`` (the flag after the command) prints the raw JSON answer."""
    proc = sockd_factory()
    proc.wait_ready()
    after = ctl(short_tmp, "status", "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["pid"] == proc.pid
    config = ctl(short_tmp, "config", "--json")
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["generation"] == 1
    # An error answer too: the daemon's error object on stdout, the line on stderr.
    kick = ctl(short_tmp, "kick", "999999", "--json")
    assert kick.returncode == 1
    assert json.loads(kick.stdout)["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- --config


def test_broken_config_file_needs_no_reading_with_socket_and_names_its_line(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """With ``--socket``, a ``--config`` file with a TOML syntax error does not stop a
    read-only command; without it, exit 78 in one line naming the file's broken line."""
    proc = sockd_factory()
    proc.wait_ready()
    broken = short_tmp / "broken.toml"
    broken.write_text('[server]\nmode = "threading"\n[control]\nsocket = /tmp/unquoted\n')
    sock = str(short_tmp / "ctl.sock")
    with_socket = sockctl("--socket", sock, "--config", str(broken), "status", "--json")
    assert with_socket.returncode == 0, with_socket.stderr
    assert json.loads(with_socket.stdout)["pid"] == proc.pid
    without = sockctl("--config", str(broken), "status", env={"SOCKD_CONTROL_SOCKET": sock})
    assert without.returncode == 78
    assert without.stdout == ""
    (line,) = without.stderr.splitlines()
    assert line.startswith(f"sockctl: {broken}: ")
    assert "line 4, column 10" in line
    assert "--socket" in line  # says how to do without the file


# --------------------------------------------------------------------------- warn


def test_warn_is_an_alias_of_warning(sockd_factory: Any, short_tmp: Path) -> None:
    """``log-level warn`` sets ``warning``; ``logs --level WARN`` filters as ``warning``."""
    proc = sockd_factory()
    proc.wait_ready()
    result = ctl(short_tmp, "log-level", "warn", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"level": "warning", "previous": "debug"}
    assert json.loads(ctl(short_tmp, "status", "--json").stdout)["log_level"] == "warning"
    logs = ctl(short_tmp, "logs", "--level", "WARN", "--json")
    assert logs.returncode == 0, logs.stderr
    events = [json.loads(line) for line in logs.stdout.splitlines()]
    assert [e["event"] for e in events] == ["log.level_changed"]  # the only warning


# --------------------------------------------------------------------------- version


def test_python_m_sockctl_and_one_version_line_shape(sockd_factory: Any, short_tmp: Path) -> None:
    """``python -m sockctl`` is sockctl; both commands say ``NAME VERSION (control API vN)``."""
    proc = sockd_factory()
    proc.wait_ready()
    env = _env()
    as_module = subprocess.run(
        [sys.executable, "-m", "sockctl", "--socket", str(short_tmp / "ctl.sock"), "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE,
        check=False,
    )
    assert as_module.returncode == 0, as_module.stderr
    assert f"pid {proc.pid}" in as_module.stdout or str(proc.pid) in as_module.stdout
    usage = subprocess.run(
        [sys.executable, "-m", "sockctl", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE,
        check=False,
    )
    assert usage.stdout.startswith("Usage: sockctl "), usage.stdout
    lines = {}
    for name, argv in {
        "sockctl": [SOCKCTL],
        "python -m sockctl": [sys.executable, "-m", "sockctl"],
        "sockd": [sys.executable, "-m", "sockd"],
    }.items():
        done = subprocess.run(
            [str(a) for a in argv] + ["--version"],
            capture_output=True,
            text=True,
            env=env,
            timeout=DEADLINE,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines[name] = done.stdout
    shape = re.compile(r"^(sockd|sockctl) (\S+) \(control API v(\d+)\)\n$")
    matched = {name: shape.match(line) for name, line in lines.items()}
    assert all(matched.values()), lines
    assert lines["python -m sockctl"] == lines["sockctl"]
    assert lines["sockd"].replace("sockd", "sockctl", 1) == lines["sockctl"]


# --------------------------------------------------------------------------- stop


@pytest.mark.parametrize(
    ("environment", "supervisor"),
    [
        ({"INVOCATION_ID": "", "NOTIFY_SOCKET": ""}, None),
        ({"INVOCATION_ID": "0123456789abcdef0123456789abcdef"}, "systemd"),
    ],
    ids=["by-hand", "under-systemd"],
)
def test_stop_warns_when_systemd_supervises_the_daemon(
    sockd_factory: Any, short_tmp: Path, environment: dict[str, str], supervisor: str | None
) -> None:
    """``status`` reports the supervisor; ``stop`` of a daemon systemd started warns in one
    stderr line and still stops it (exit 0), while one started by hand stops silently."""
    proc = sockd_factory(env=environment)
    proc.wait_ready()
    status = json.loads(ctl(short_tmp, "status", "--json").stdout)
    assert status["supervisor"] == supervisor
    view = ctl(short_tmp, "status")
    assert view.returncode == 0
    assert ("systemd" in view.stdout) == (supervisor == "systemd")
    stopped = ctl(short_tmp, "stop", "--wait")
    assert stopped.returncode == 0, stopped.stderr
    assert "sockd stopped" in stopped.stdout
    if supervisor == "systemd":
        (warning,) = stopped.stderr.splitlines()
        assert warning.startswith("sockctl: warning: sockd runs under systemd: ")
        assert "systemctl stop" in warning
    else:
        assert stopped.stderr == ""
    assert proc.wait_exit() == 0
