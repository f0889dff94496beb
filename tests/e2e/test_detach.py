"""``sockd --daemon --pidfile``: a classic detached daemon for hosts without systemd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, render_config


def config_file(tmp: Path, **server: object) -> Path:
    path = tmp / "d.toml"
    path.write_text(
        render_config(
            {
                "server": {"listen": ["127.0.0.1:0"], "shutdown_timeout": 5, **server},
                "logging": {"level": "info", "output": str(tmp / "sockd.log")},
                "control": {"socket": str(tmp / "ctl.sock")},
            }
        )
    )
    return path


def sockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sockd", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def wait_gone(pid: int, timeout: float = 10) -> bool:
    """Wait for a process that is not our child to disappear (pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        import select

        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_detaches_writes_locked_pidfile_and_removes_it(short_tmp: Path) -> None:
    """The command returns 0 once the daemon serves; the pid file names it and goes at exit."""
    pidfile = short_tmp / "sockd.pid"
    result = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(config_file(short_tmp)))
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    assert Path(f"/proc/{pid}").exists()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[1]) != os.getpid()  # re-parented: not our child
    assert int(stat[3]) != os.getsid(0)  # a session of its own: no controlling terminal
    assert "server.listening" in (short_tmp / "sockd.log").read_text()  # it serves already
    # A second start is refused while the first runs.
    again = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(config_file(short_tmp)))
    assert again.returncode == 1
    assert f"already running (pid {pid}" in again.stderr
    assert "Traceback" not in again.stderr
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert not pidfile.exists()
    assert "server.stopped" in (short_tmp / "sockd.log").read_text()


def test_stale_pidfile_is_replaced(short_tmp: Path) -> None:
    """A pid file left by a dead process (no lock held) does not block a start."""
    pidfile = short_tmp / "sockd.pid"
    pidfile.write_text("999999\n")
    result = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(config_file(short_tmp)))
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    assert pid != 999999
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)


def test_startup_errors_reach_the_terminal(short_tmp: Path) -> None:
    """Address in use and a bad config are reported on stderr with their exit status."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    pidfile = short_tmp / "sockd.pid"
    busy = config_file(short_tmp, listen=[f"127.0.0.1:{port}"])
    result = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(busy))
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert not pidfile.exists()
    holder.close()
    bad = config_file(short_tmp, mode="forked")
    result = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(bad))
    assert result.returncode == 78
    assert "server.mode" in result.stderr


def test_stdout_logging_is_refused_when_detaching(short_tmp: Path) -> None:
    """Logs to stdout would vanish after detaching: that config is refused with exit 78."""
    path = short_tmp / "o.toml"
    path.write_text(f'[control]\nsocket = "{short_tmp}/c.sock"\n')
    result = sockd("--daemon", "--config", str(path))
    assert result.returncode == 78
    assert "logging.output" in result.stderr


def test_detached_daemon_reloads_a_relative_config_path(short_tmp: Path) -> None:
    """Started with a relative --config, the detached daemon (cwd /) still reloads it."""
    from sockctl.client import ControlClient

    pidfile = short_tmp / "sockd.pid"
    config_file(short_tmp)
    result = subprocess.run(
        [sys.executable, "-m", "sockd", "--daemon", "--pidfile", "sockd.pid", "--config", "d.toml"],
        capture_output=True,
        text=True,
        cwd=short_tmp,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    client = ControlClient(str(short_tmp / "ctl.sock"))
    assert client.status()["config_path"] == str(short_tmp / "d.toml")
    assert client.reload()["result"] == "applied"
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
