"""Issue 9 against the real ``sockd``: what ``--check-config`` and a reload refuse, and a
graceful stop that an idle JSON client can no longer hold to its deadline."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sockctl.client import ControlClient, DaemonError
from tests.conftest import (
    DEADLINE,
    REPO,
    base_config,
    children_of,
    connect,
    recv_line,
    render_config,
    require_reachable_by_others,
)


def check_config(
    path: Path, user: str | None = None, group: str = "nogroup"
) -> subprocess.CompletedProcess[str]:
    """``sockd --check-config`` on ``path``, as root or (with ``user``) as that user."""
    prefix = []
    if user is not None:
        prefix = ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "sockd", "--check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def write(short_tmp: Path, sections: dict[str, dict[str, Any]]) -> Path:
    path = short_tmp / "check.toml"
    path.write_text(render_config(sections))
    return path


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:\uff19\uff10\uff10\uff10", 'port "\uff19\uff10\uff10\uff10" is not a number'),
        ("127.0.0.1:\u0669\u0660\u0660\u0660", 'port "\u0669\u0660\u0660\u0660" is not a number'),
        ("127.0. 0.1:9000", 'host "127.0. 0.1" is neither an IP address nor a valid host name'),
        ("my host:9000", 'host "my host" is neither an IP address nor a valid host name'),
    ],
)
def test_check_config_refuses_non_ascii_ports_and_hosts_with_spaces(
    short_tmp: Path, address: str, expected: str
) -> None:
    """--check-config exits 78 naming server.listen for a port in other digits or a spaced host."""
    config = base_config(short_tmp)
    config["server"]["listen"] = [address]
    path = write(short_tmp, config)
    result = check_config(path)
    assert result.returncode == 78, result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"sockd: {path}: server.listen: ")
    assert expected in line


def test_check_config_refuses_a_log_output_it_could_not_open(short_tmp: Path) -> None:
    """A directory, a file in a missing directory, and a mode problem are reported together."""
    config = base_config(short_tmp)
    config["logging"]["output"] = "/var/log"
    config["control"].update({"mode": "0640", "group": "root"})
    result = check_config(write(short_tmp, config))
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(
        'logging.output: "/var/log" is a directory; expected "stdout", '
        '"stderr", "journald" or a file sockd can append to'
    )
    assert lines[1].endswith(
        "control.mode: 0640 gives control.group no write permission, which connecting "
        'needs; expected e.g. "0660"'
    )
    config = base_config(short_tmp)
    config["logging"]["output"] = str(short_tmp / "missing" / "sockd.log")
    result = check_config(write(short_tmp, config))
    assert result.returncode == 78
    assert "logging.output" in result.stderr and "does not exist" in result.stderr
    assert not (short_tmp / "missing").exists()


def test_check_config_as_another_user_refuses_a_log_it_cannot_append_to(
    short_tmp: Path,
) -> None:
    """Run as nobody, --check-config refuses a root-only log file and a root-only directory."""
    require_reachable_by_others()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot run as nobody")
    private = short_tmp / "private"
    private.mkdir(mode=0o755)
    log = private / "sockd.log"
    log.write_text("root's\n")
    log.chmod(0o644)
    config = base_config(short_tmp)
    config["logging"]["output"] = str(log)
    path = write(short_tmp, config)
    path.chmod(0o644)
    result = check_config(path, user="nobody")
    assert result.returncode == 78, result.stderr
    assert f'logging.output: "{log}" is not writable by uid 65534' in result.stderr
    config["logging"]["output"] = str(private / "new.log")
    path = write(short_tmp, config)
    path.chmod(0o644)
    result = check_config(path, user="nobody")
    assert result.returncode == 78, result.stderr
    assert "may not create files in" in result.stderr
    assert check_config(path).returncode == 0  # root may
    assert log.read_text() == "root's\n"
    assert not (private / "new.log").exists()


def test_reload_to_a_directory_log_output_is_rejected(sockd_factory: Any, short_tmp: Path) -> None:
    """A reload whose logging.output is a directory is rejected as invalid config (78)."""
    proc = sockd_factory(base_config(short_tmp))
    proc.wait_ready()
    ctl = ControlClient(str(short_tmp / "ctl.sock"))
    config = base_config(short_tmp)
    config["logging"]["output"] = str(short_tmp)
    proc.config_path.write_text(render_config(config))
    with pytest.raises(DaemonError) as info:
        ctl.reload()
    assert info.value.exit_code == 78
    assert [e.split(":", 1)[0] for e in info.value.errors] == ["logging.output"]
    assert ctl.status()["last_reload"]["result"] == "rejected"


# --------------------------------------------------------------------------- drain


def wait_quiet(*pids: int) -> None:
    """Wait until every thread of ``pids`` sleeps (blocked in the kernel), twice in a row:
    the handlers have read what was sent and wait for their clients. Polled: no event."""
    deadline = time.monotonic() + DEADLINE
    quiet_rounds = 0
    while quiet_rounds < 2:
        states = []
        for pid in pids:
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{pid}/task/{task}/stat").read_text()
                    states.append(text.rsplit(")", 1)[1].split()[0])
        quiet_rounds = quiet_rounds + 1 if all(s in "SI" for s in states) else 0
        assert time.monotonic() < deadline, f"sockd never went quiet: {states}"
        time.sleep(0.01)  # sleep-ok: polling kernel state that has no event


@pytest.mark.parametrize("mode", ["threading", "forking"])
@pytest.mark.parametrize(
    "handler", ["tests.handlers:Calculator", "examples.fileserver.server:FileServerHandler"]
)
def test_idle_json_client_does_not_hold_a_graceful_stop(
    sockd_factory: Any, short_tmp: Path, mode: str, handler: str
) -> None:
    """SIGTERM with shutdown_timeout=10: an idle JSON client is closed at once, one mid-line
    is answered first, and sockd exits in well under 2 s with nothing cut."""
    files = short_tmp / "files"
    files.mkdir()
    config = base_config(short_tmp, mode=mode, handler=handler, shutdown_timeout=10)
    config["server.handler_options"] = {"root": str(files)}
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    idle = connect(address)
    idle.sendall(b'{"action": "list", "id": 1}\n')
    assert json.loads(recv_line(idle))["id"] == 1
    halfway = connect(address)
    halfway.sendall(b'{"action": "li')
    proc.wait_count("conn.open", 2)  # both handlers run (both children exist)
    wait_quiet(proc.pid, *children_of(proc.pid))
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    idle.settimeout(3)  # before the fix it waited for the 10 s deadline's cut
    assert idle.recv(100) == b"", "the idle client was not closed"
    proc.wait_for("server.stopping")
    halfway.sendall(b'st", "id": 2}\n')
    assert json.loads(recv_line(halfway))["id"] == 2  # begun before the drain: answered
    assert halfway.recv(100) == b""  # ...and then closed
    assert proc.wait_exit(timeout=5) == 0
    elapsed = time.monotonic() - began
    stopped = proc.wait_for("server.stopped")
    assert (stopped["finished"], stopped["cut"]) == (2, 0), stopped
    assert elapsed < 2.0, f"the stop took {elapsed:.1f} s"
    idle.close()
    halfway.close()
