"""``sockd --daemon --pidfile``: a classic detached daemon for hosts without systemd."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert oct(pidfile.stat().st_mode & 0o7777) == oct(0o644)  # despite the daemon's umask 027
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
    pidfile.chmod(0o600)
    result = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(config_file(short_tmp)))
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    assert pid != 999999
    assert oct(pidfile.stat().st_mode & 0o7777) == oct(0o644)
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
    result = sockd("--daemon", "--pidfile", str(short_tmp / "p.pid"), "--config", str(path))
    assert result.returncode == 78
    assert "logging.output" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--daemon"], "sockd: --daemon needs --pidfile PATH (e.g. /run/sockd.pid)"),
        (["--pidfile", "x.pid"], "sockd: --pidfile goes with --daemon"),
    ],
)
def test_daemon_and_pidfile_go_together(short_tmp: Path, args: list[str], expected: str) -> None:
    """--daemon without --pidfile (or the reverse) is a one-line usage error, exit 2, before
    the config is read and before anything starts."""
    result = sockd(*args, "--config", str(short_tmp / "missing.toml"))
    assert (result.returncode, result.stderr, result.stdout) == (2, expected + "\n", "")
    assert list(short_tmp.iterdir()) == []


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


# --------------------------------------------------------------------------- hostile pid files

NOBODY = 65534


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the unprivileged user nobody (a real uid, not a mock)."""
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


@pytest.fixture
def hostile(short_tmp: Path) -> Path:
    """``short_tmp`` holding a root-only secret, a sticky world-writable ``pub`` (like /tmp),
    a non-sticky world-writable ``open`` and a directory ``mine`` owned by nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the attack is a root daemon writing where nobody points it")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot act as nobody")
    secret = short_tmp / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    for name, mode in (("pub", 0o1777), ("open", 0o777)):
        (short_tmp / name).mkdir()
        (short_tmp / name).chmod(mode)
    (short_tmp / "mine").mkdir()
    os.chown(short_tmp / "mine", NOBODY, NOBODY)
    return short_tmp


def start_with_pidfile(
    tmp: Path, pidfile: Path, refuse: bool = True
) -> subprocess.CompletedProcess[str]:
    """``sockd --daemon --pidfile``; with ``refuse``, a daemon that started anyway (the old
    bug) is stopped at once, so the failing test leaves nothing running."""
    result = sockd("--daemon", "--pidfile", str(pidfile), "--config", str(config_file(tmp)))
    if refuse and result.returncode == 0:
        from sockctl.client import ControlClient

        with contextlib.suppress(Exception):
            client = ControlClient(str(tmp / "ctl.sock"))
            pid = int(client.status()["pid"])
            client.stop()
            wait_gone(pid)
    return result


def assert_refused(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line.startswith("sockd: ") and expected in line, line
    assert "Traceback" not in result.stderr


def test_pidfile_symlink_planted_by_another_user_is_not_followed(hostile: Path) -> None:
    """A symlink nobody planted at the pid file path is refused; its root-only target is
    unchanged."""
    pidfile = hostile / "pub" / "sockd.pid"
    assert as_nobody("ln", "-s", str(hostile / "secret"), str(pidfile)).returncode == 0
    assert_refused(start_with_pidfile(hostile, pidfile), "is a symbolic link")
    assert (hostile / "secret").read_text() == "root only\n"
    assert pidfile.is_symlink()
    dangling = hostile / "pub" / "dangling.pid"
    assert as_nobody("ln", "-s", str(hostile / "created-by-root"), str(dangling)).returncode == 0
    assert_refused(start_with_pidfile(hostile, dangling), "is a symbolic link")
    assert not (hostile / "created-by-root").exists()


def test_pidfile_in_a_directory_another_user_owns_is_refused(hostile: Path) -> None:
    """A pid file in nobody's directory is refused, whatever is planted there."""
    pidfile = hostile / "mine" / "sockd.pid"
    assert as_nobody("ln", "-s", str(hostile / "secret"), str(pidfile)).returncode == 0
    assert_refused(start_with_pidfile(hostile, pidfile), f"owned by uid {NOBODY}")
    assert (hostile / "secret").read_text() == "root only\n"


def test_pidfile_in_a_non_sticky_world_writable_directory_is_refused(hostile: Path) -> None:
    """Where anyone may rename files (mode 0777, no sticky bit) the pid file is refused."""
    pidfile = hostile / "open" / "sockd.pid"
    assert_refused(start_with_pidfile(hostile, pidfile), "others may write to (mode 0777)")
    assert not pidfile.exists()


def test_pidfile_hard_link_is_refused(hostile: Path) -> None:
    """A hard link to a root-only file at the pid file path is refused and the file unchanged."""
    pidfile = hostile / "pub" / "sockd.pid"
    made = as_nobody("ln", str(hostile / "secret"), str(pidfile))
    if made.returncode != 0:
        # fs.protected_hardlinks=1 stops nobody linking root's file; hosts without it do
        # not, so plant the same link as root: the daemon must refuse it either way.
        print(f"nobody could not hard-link ({made.stderr.strip()}); planting it as root")
        os.link(hostile / "secret", pidfile)
    assert_refused(start_with_pidfile(hostile, pidfile), "has 2 hard links")
    assert (hostile / "secret").read_text() == "root only\n"


def test_pidfile_fifo_is_refused(hostile: Path) -> None:
    """A FIFO nobody planted at the pid file path is refused without hanging the start."""
    pidfile = hostile / "pub" / "sockd.pid"
    assert as_nobody("mkfifo", "-m", "0666", str(pidfile)).returncode == 0
    assert_refused(start_with_pidfile(hostile, pidfile), "is not a regular file (a FIFO)")
    assert stat.S_ISFIFO(pidfile.lstat().st_mode)
    os.mkfifo(hostile / "root.fifo")  # root's own FIFO: a type problem, not an owner one
    assert_refused(start_with_pidfile(hostile, hostile / "root.fifo"), "(a FIFO)")


def test_pidfile_owned_by_another_user_is_refused(hostile: Path) -> None:
    """A regular file nobody created at the path is refused and keeps nobody's content."""
    pidfile = hostile / "pub" / "sockd.pid"
    assert as_nobody("sh", "-c", f"echo 1 > {pidfile}").returncode == 0
    assert_refused(start_with_pidfile(hostile, pidfile), f"is owned by uid {NOBODY}")
    assert pidfile.read_text() == "1\n"


def test_pidfile_in_a_sticky_directory_works_and_is_removed(hostile: Path) -> None:
    """In a sticky world-writable directory (like /tmp) a fresh pid file is created, locked
    and removed at exit."""
    pidfile = hostile / "pub" / "sockd.pid"
    result = start_with_pidfile(hostile, pidfile, refuse=False)
    assert result.returncode == 0, result.stderr
    info = pidfile.lstat()
    assert stat.S_ISREG(info.st_mode) and info.st_uid == 0 and info.st_nlink == 1
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert not pidfile.exists()


def test_pidfile_path_through_another_users_symlink_or_directory_is_refused(
    hostile: Path,
) -> None:
    """A symlink nobody planted above the pid file (``pub/link -> rootdir``), or a root-owned
    directory inside nobody's, is refused: root never creates the file where nobody points."""
    rootdir = hostile / "rootdir"
    rootdir.mkdir(mode=0o755)
    link = hostile / "pub" / "link"
    assert as_nobody("ln", "-s", str(rootdir), str(link)).returncode == 0
    assert_refused(
        start_with_pidfile(hostile, link / "sockd.pid"), f"symlink {link} is owned by uid {NOBODY}"
    )
    assert list(rootdir.iterdir()) == []
    inner = hostile / "mine" / "sub"  # root's directory, but nobody may rename it
    inner.mkdir(mode=0o755)
    assert_refused(
        start_with_pidfile(hostile, inner / "sockd.pid"),
        f"directory {hostile / 'mine'} is owned by uid {NOBODY}",
    )
    assert list(inner.iterdir()) == []
