"""``sockd --daemon --pidfile PATH``: run as a classic detached daemon on hosts without systemd.

python-daemon's ``DaemonContext`` does the detaching (double fork, new session, working
directory, umask, closing inherited descriptors). Its parent exits at once, which would
lose every start-up error, so the terminal process forks first and waits on a pipe: the
detached daemon writes ``ok`` once it serves, or the exit status and message of the
error that stopped it. Address in use, a locked pid file or a bad control socket are
therefore printed on the terminal with the right exit status, like a foreground start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
from typing import IO

import daemon as python_daemon  # type: ignore[import-untyped]  # ships no type hints

from sockd.config import Config
from sockd.errors import ConfigError, SockdError
from sockd.protocol import ExitCode, path_entries, untrusted_entry

#: The pid file's mode: readable by everyone, as monitors and init scripts expect.
PIDFILE_MODE = 0o644


class PidFileError(SockdError):
    """The pid file is held by a running sockd, or cannot be written."""


class PidFile:
    """A pid file locked with ``flock`` for as long as the daemon runs.

    A stale file (no process holds its lock) is replaced; a locked one means a live sockd,
    so we refuse to start. The lock, not the pid written in the file, is the truth: a pid
    can be reused by an unrelated process, a lock dies with its holder.

    sockd usually runs as root, and the path may be one another user can plant things
    at, so opening it must never write somewhere else: the file is opened without
    following a symbolic link and without truncating, then checked on the open
    descriptor (a regular file, owned by sockd's user, one link; its directory owned by
    sockd's user or root and not writable by others unless sticky, like ``/tmp``), and
    only then locked and truncated. Anything else is refused with one line, exit 1.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fh: IO[str] | None = None
        self._identity: tuple[int, int] | None = None

    def acquire(self) -> None:
        self._check_directory()
        # O_NOFOLLOW: a symlink at the path (even a dangling one) is ELOOP, never followed.
        # No O_TRUNC: nothing is written before the checks pass and the lock is ours.
        # O_NONBLOCK: opening a FIFO planted there cannot hang the start.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
        try:
            fd = os.open(self.path, flags | os.O_CLOEXEC, PIDFILE_MODE)
        except OSError as exc:
            # ELOOP is what O_NOFOLLOW gives for a link; some kernels answer EACCES for
            # O_CREAT on another user's link in a sticky directory: say what it is.
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.lstat(self.path).st_mode):
                    exc.errno = errno.ELOOP
            if exc.errno == errno.ELOOP:
                raise PidFileError(
                    f"pid file {self.path} is a symbolic link; refusing to follow it"
                ) from None
            raise PidFileError(f"cannot open pid file {self.path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            self._check_file(info)
            os.set_blocking(fd, True)
            # 0644 whatever the umask (the daemon's is 027): monitors and init scripts
            # running as other users read the pid. Only after the checks: never on a file
            # that is not ours.
            os.fchmod(fd, PIDFILE_MODE)
        except BaseException:
            os.close(fd)
            raise
        fh = os.fdopen(fd, "r+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = fh.read(32).strip() or "unknown"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise PidFileError(
                    f"sockd is already running (pid {holder}, pid file {self.path})"
                ) from None
            raise PidFileError(f"cannot lock pid file {self.path}: {exc.strerror}") from None
        self._fh = fh
        self._identity = (info.st_dev, info.st_ino)

    def _check_directory(self) -> None:
        """Refuse a path another user could redirect, so the file lands where they point.

        The same walk as the control socket's check (``path_entries``, from ``/`` as the
        kernel resolves it, symlink targets included): every directory and symlink on
        the way must belong to sockd's user or root, and no directory may be writable by
        others unless sticky (``/tmp``: others cannot rename what is not theirs in it).
        Unlike the socket's, the file's own directory may be sticky: the file is then
        checked on its descriptor (owner, type, links), so a planted one is refused.
        """
        directory = os.path.dirname(self.path)
        try:
            entries, complete = path_entries(self.path)
        except OSError as exc:
            raise PidFileError(
                f"cannot use pid file {self.path}: {exc.filename}: {exc.strerror}"
            ) from None
        if not complete:
            raise PidFileError(
                f"cannot use pid file {self.path}: {directory}: {os.strerror(errno.ENOENT)}"
            )
        euid = os.geteuid()
        found = untrusted_entry(entries, (euid, 0), lambda _index: True)
        if found is not None:
            entry, why = found
            info = entry.info
            kind = "symlink" if entry.is_link else "directory"
            if why == "owner":
                raise PidFileError(
                    f"pid file {self.path}: {kind} {entry.path} is owned by uid "
                    f"{info.st_uid}; expected every directory and symlink on the path to "
                    f"belong to sockd's user (uid {euid}) or root"
                )
            raise PidFileError(
                f"pid file {self.path}: directory {entry.path}, which others may write "
                f"to (mode {stat.S_IMODE(info.st_mode):04o}), is not sticky; expected "
                "directories only sockd's user can change, such as /run/sockd"
            )

    def _check_file(self, info: os.stat_result) -> None:
        euid = os.geteuid()
        if not stat.S_ISREG(info.st_mode):
            raise PidFileError(
                f"pid file {self.path} is not a regular file ({_kind(info.st_mode)}); "
                "refusing to write to it"
            )
        if info.st_uid != euid:
            raise PidFileError(
                f"pid file {self.path} is owned by uid {info.st_uid}, not by sockd's user "
                f"(uid {euid}); refusing to write to it"
            )
        if info.st_nlink != 1:
            raise PidFileError(
                f"pid file {self.path} has {info.st_nlink} hard links; refusing to write "
                "to a file that is also another name"
            )

    def write(self, pid: int) -> None:
        assert self._fh is not None  # noqa: S101  # acquire() comes first
        os.ftruncate(self._fh.fileno(), 0)
        self._fh.seek(0)
        self._fh.write(f"{pid}\n")
        self._fh.flush()

    def fileno(self) -> int:
        assert self._fh is not None  # noqa: S101
        return self._fh.fileno()

    def release(self) -> None:
        if self._fh is None:
            return
        # Unlink the path only while it still names the file we locked: never a file
        # someone put there since, and never through a link.
        with contextlib.suppress(OSError):
            info = os.stat(self.path, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)
        self._fh.close()
        self._fh = None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _report(fd: int, status: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{status} {message}".encode())
        os.close(fd)


def _ready(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"ok")
        os.close(fd)


def run_detached(config: Config, pidfile: str | None) -> int:
    """Detach and serve; in the terminal process, return the daemon's start-up verdict."""
    if config.logging.output in ("stdout", "stderr"):
        raise ConfigError(
            [
                f'logging.output: "{config.logging.output}" is closed when sockd detaches; '
                'use a file path or "journald" with --daemon'
            ],
            config.path,
        )
    read_end, write_end = os.pipe()
    first = os.fork()
    if first:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        os.close(read_end)
        os.waitpid(first, 0)
        verdict = b"".join(chunks).decode("utf-8", "replace")
        if verdict == "ok":
            return ExitCode.OK
        status, _, message = verdict.partition(" ")
        print(f"sockd: {message or 'the daemon exited during start-up'}", file=sys.stderr)
        return int(status) if status.isdigit() else ExitCode.FAILURE
    os.close(read_end)
    try:
        _serve_detached(config, pidfile, write_end)
    finally:
        os._exit(0)


def _serve_detached(config: Config, pidfile: str | None, report_fd: int) -> None:
    from sockd.daemon import Daemon

    lock = PidFile(pidfile) if pidfile else None
    context = python_daemon.DaemonContext(
        working_directory="/",
        umask=0o027,
        detach_process=True,
        files_preserve=[report_fd],
        signal_map={},  # the daemon installs its own handlers
        prevent_core=False,
    )
    status: int = ExitCode.OK
    try:
        context.open()
        if lock is not None:
            lock.acquire()
            lock.write(os.getpid())
        daemon = Daemon(config)
        status = daemon.run(on_ready=lambda: _ready(report_fd))
    except ConfigError as exc:
        _report(report_fd, ExitCode.CONFIG, "; ".join(exc.problems))
        status = ExitCode.CONFIG
    except SockdError as exc:
        _report(report_fd, ExitCode.FAILURE, str(exc))
        status = ExitCode.FAILURE
    except OSError as exc:
        _report(report_fd, ExitCode.FAILURE, exc.strerror or str(exc))
        status = ExitCode.FAILURE
    finally:
        if lock is not None:
            lock.release()
        os._exit(status)
