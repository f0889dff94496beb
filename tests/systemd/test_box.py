"""The box harness itself, and sockd's packaging and sockd.systemd under a real systemd."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .box import INSTALLED_BIN, PACKAGING, PROJECT, VENV_PYTHON, Box, BoxTimeoutError, _children

pytestmark = pytest.mark.systemd

PAYLOAD = f"{VENV_PYTHON} {PROJECT}/tests/systemd/notify_payload.py"
UNIT_FILES = sorted((PACKAGING / "systemd").iterdir())
MAX_EXPOSURE = 2.0


def notify_unit(*extra: str) -> str:
    return "\n".join(
        [
            "[Unit]",
            "Description=sockd box smoke test",
            "[Service]",
            "Type=notify",
            f"ExecStart={PAYLOAD}",
            *extra,
            "",
        ]
    )


# --- the harness -------------------------------------------------------------------------


def test_notify_unit_starts(box: Box) -> None:
    """A Type=notify unit that sends READY=1 via sockd.systemd.notify starts, runs and logs."""
    box.install_unit("payload.service", notify_unit())
    rc, _out, err = box.systemctl("start", "payload.service")
    assert rc == 0, err + box.journal("payload.service")
    assert box.is_active("payload.service") == "active"
    assert box.unit_property("payload.service", "StatusText") == "waiting for signals"
    text = box.wait_for_journal("payload.service", "payload: ready")
    assert "payload: starting watchdog=None" in text
    box.systemctl("stop", "payload.service", check=True)
    box.wait_for_journal("payload.service", "payload: stopping")


def test_unit_without_readiness_fails(box: Box) -> None:
    """Without NOTIFY_SOCKET notify() returns False and the unit fails: the smoke test can fail."""
    unit = notify_unit().replace(
        f"ExecStart={PAYLOAD}", f"ExecStart=/usr/bin/env -u NOTIFY_SOCKET {PAYLOAD}"
    )
    box.install_unit("payload.service", unit)
    rc, _out, _err = box.systemctl("start", "payload.service")
    assert rc != 0
    assert box.is_active("payload.service") == "failed"
    box.wait_for_journal("payload.service", "READY=1 not sent: NOTIFY_SOCKET unset")


def test_run_returns_status_and_output(box: Box) -> None:
    """run() gives (rc, stdout, stderr) of the command inside the box."""
    assert box.run("sh", "-c", "echo out; echo err >&2; exit 7") == (7, "out\n", "err\n")
    assert box.run("hostname").stdout.strip() == box.name


def test_files_written_into_box(box: Box) -> None:
    """write_file() creates parents and sets mode and owner; read_file() reads it back."""
    box.write_file("/etc/sockd/sockd.toml", "[server]\n", mode=0o640, owner="root:daemon")
    assert box.read_file("/etc/sockd/sockd.toml") == "[server]\n"
    assert box.run("stat", "-c", "%a %U %G", "/etc/sockd/sockd.toml").stdout == "640 root daemon\n"
    assert box.exists("/etc/sockd/sockd.toml")
    assert not box.exists("/etc/sockd/other.toml")


def test_run_timeout_kills_the_command(box: Box) -> None:
    """A command past its timeout raises BoxTimeout quickly and leaves no process behind."""
    started = time.monotonic()
    with pytest.raises(BoxTimeoutError, match=r"did not finish in 0\.5s"):
        box.run("sleep", "300", timeout=0.5)
    assert time.monotonic() - started < 10
    assert box.run("pgrep", "-x", "sleep").rc == 1
    # Only the box's nspawn is still a child of the test process: no stray nsenter.
    assert _children(os.getpid()) == [box.nspawn_pid]


def test_stop_removes_everything(box_factory: Callable[..., Box]) -> None:
    """stop() ends nspawn and the box's init and removes the cgroups made for the box."""
    box = box_factory()
    nspawn, init, cgroups = box.nspawn_pid, box.init_pid, box.cgroup_dirs
    box.stop()
    assert not Path(f"/proc/{nspawn}").exists()
    assert not Path(f"/proc/{init}").exists()
    assert all(not path.exists() for path in cgroups)
    assert "Startup finished" in box.last_journal
    box.stop()  # idempotent


# --- the packaging -----------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNIT_FILES, ids=[u.name for u in UNIT_FILES])
def test_unit_file_verifies_cleanly(packaged_box: Box, unit: Path) -> None:
    """systemd-analyze verify prints nothing for each shipped unit (it exits 0 on warnings)."""
    path = f"/etc/systemd/system/{unit.name}"
    rc, out, err = packaged_box.run("systemd-analyze", "verify", path)
    assert rc == 0
    assert (out + err).strip() == ""


@pytest.mark.parametrize("unit", ["sockd.service", "sockd@web.service"])
def test_security_exposure(packaged_box: Box, unit: str) -> None:
    """systemd-analyze security rates the service's exposure at most 2.0."""
    rc, out, err = packaged_box.run("systemd-analyze", "security", "--no-pager", unit)
    assert rc == 0, err
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", out)
    assert found, out
    exposure = float(found.group(1))
    print(f"{unit}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, out


def test_hardened_unit_runs_python(packaged_box: Box) -> None:
    """Under sockd.service's sandbox the venv's Python notifies, pings, reloads, writes the
    journal, and gets its stored listening socket back after a crash."""
    box = packaged_box
    box.install_unit_file(
        PACKAGING / "systemd" / "sockd.service",
        replace={
            f"{INSTALLED_BIN}sockd --config /etc/sockd/sockd.toml": (
                f"{PAYLOAD} --journal --listen 127.0.0.1:9000"
            ),
            f"{INSTALLED_BIN}sockctl --config /etc/sockd/sockd.toml reload": (
                "/bin/kill -HUP $MAINPID"
            ),
        },
    )
    rc, _out, err = box.systemctl("start", "sockd.service")
    assert rc == 0, err + box.journal("sockd.service")
    text = box.wait_for_journal("sockd.service", "payload: ready")
    assert "payload: starting watchdog=5.0" in text
    assert "payload: bound port 9000 stored=True" in text
    assert "notify error" not in text

    first_pid = box.unit_property("sockd.service", "MainPID")
    uid = box.run("id", "-u", "sockd", check=True).stdout.strip()
    status = box.read_file(f"/proc/{first_pid}/status")
    assert re.search(rf"^Uid:\s+{uid}\s", status, re.MULTILINE), status

    [entry] = box.journal_entries("sockd.service", "SOCKD_EVENT=payload.ready")
    assert entry["MESSAGE"] == "payload journal entry"
    assert entry["SOCKD_DETAIL"] == "first line\nsecond line"
    assert entry["SYSLOG_IDENTIFIER"] == "notify-payload"
    assert entry["_PID"] == first_pid

    assert box.systemctl("reload", "sockd.service").rc == 0
    box.wait_for_journal("sockd.service", "payload: reloaded")
    assert box.unit_property("sockd.service", "NFileDescriptorStore") == "1"

    # A crash: Restart=on-failure starts it again, and the fd store hands the socket back.
    box.systemctl("kill", "--signal=SIGKILL", "sockd.service", check=True)
    text = box.wait_for_journal("sockd.service", "payload: serving inherited listen port 9000")
    assert "payload: inherited listen=9000" in text
    box.wait_for_state("sockd.service", "active")
    assert box.unit_property("sockd.service", "MainPID") != first_pid

    assert box.systemctl("stop", "sockd.service").rc == 0
    assert box.is_active("sockd.service") == "inactive"


@pytest.mark.parametrize(("sockctl_rc", "succeeds"), [(0, True), (3, True), (1, False)])
def test_logrotate_rotates_and_reopens(packaged_box: Box, sockctl_rc: int, succeeds: bool) -> None:
    """logrotate.d/sockd rotates /var/log/sockd/*.log and asks each instance to reopen logs;
    "not running" (3) is fine, any other failure fails the rotation."""
    if not Path("/usr/sbin/logrotate").exists():
        pytest.skip("logrotate is not installed (scripts/test.sh installs it as root on Debian)")
    box = packaged_box
    box.write_file(
        "/etc/stub-sockctl",
        f'#!/bin/sh\necho "$@" >> /run/stub-calls\nexit {sockctl_rc}\n',
        mode=0o755,
    )
    config = (PROJECT / "etc" / "logrotate.d" / "sockd").read_text()
    assert f"{INSTALLED_BIN}sockctl" in config
    box.write_file(
        "/etc/logrotate.d/sockd", config.replace(f"{INSTALLED_BIN}sockctl", "/etc/stub-sockctl")
    )
    box.write_config("[server]\n")
    box.write_config("[server]\n", "/etc/sockd/web.toml")
    box.sh(
        "install -d -o sockd -g sockd -m 0750 /var/log/sockd && "
        "echo line > /var/log/sockd/sockd.log && chown sockd:sockd /var/log/sockd/sockd.log",
        check=True,
    )
    rc, out, err = box.run(
        "logrotate", "--force", "--state", "/run/logrotate.state", "/etc/logrotate.d/sockd"
    )
    assert (rc == 0) is succeeds, out + err
    assert box.read_file("/var/log/sockd/sockd.log.1") == "line\n"
    assert (
        box.run("stat", "-c", "%a %U %G %s", "/var/log/sockd/sockd.log").stdout
        == "640 sockd sockd 0\n"
    )
    calls = box.read_file("/run/stub-calls").splitlines()
    expected = [
        "--config /etc/sockd/sockd.toml reopen-logs",
        "--config /etc/sockd/web.toml reopen-logs",
    ]
    assert calls == (expected if succeeds else expected[:1])
