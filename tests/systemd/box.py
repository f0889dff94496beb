"""A real systemd, booted in a throwaway container, for tests that need a service manager.

``Box`` boots the host's own ``/usr`` with ``systemd-nspawn --volatile=yes`` on a fresh tmpfs
root (about a second), with its own network namespace, and runs commands inside with
``nsenter``. Nothing a test does in the box survives it: ``/etc``, ``/run`` and ``/var`` are
tmpfs, and ``stop()`` (also ``__exit__``) always tears the box down.

Facts this module is built on (Debian 12, systemd 252):

* The box's ``/etc`` starts empty, so on first boot systemd would enable every service
  installed on the host. A preset file saying ``disable *`` is bound in; tests start only
  the units they install.
* The project and its virtual environment are bound read-only at the same paths, so unit
  files can name ``.venv/bin/python`` directly. The venv must be made from
  ``/usr/bin/python3`` (the box shares only ``/usr``); a Python under ``/root`` would also
  be hidden by ``ProtectHome=``.
* On a host whose PID 1 is not systemd, nspawn puts every box in the cgroup it was started
  in. Each box's nspawn is therefore moved into a cgroup of its own (in the ``name=systemd``
  and unified hierarchies) before it execs, and that cgroup is removed afterwards. On a
  systemd host ``systemd-run --scope`` gives it one instead.
* Commands run as ``nsenter ... -- setpriv --pdeathsig KILL -- CMD``. A command that times
  out is killed before its nsenter (and its descendants before it), or it lingers.
* The journal is volatile: read it (``journal()``) before ``stop()``. ``stop()`` keeps the
  last full journal in ``last_journal`` for failure reports.
* Stop is SIGTERM to nspawn (``--kill-signal=SIGRTMIN+3`` makes the box's systemd power
  off cleanly), then SIGKILL to the box's init after a deadline -- always by PID.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

#: The project checkout, bound read-only into every box at the same path.
PROJECT = Path(__file__).resolve().parents[2]
#: Where the unit files, sysusers/tmpfiles snippets and logrotate config live.
PACKAGING = PROJECT / "packaging"
#: The virtual environment the tests run from (sockd is installed editable there).
VENV = Path(sys.prefix)
#: Paths a hardened unit cannot see (PrivateTmp=, ProtectHome=).
_SANDBOX_HIDDEN = (Path("/tmp"), Path("/var/tmp"), Path("/home"), Path("/root"), Path("/run/user"))


def _hidden_by_sandbox(paths: Sequence[Path]) -> list[Path]:
    """Which of ``paths`` lie where a hardened service's sandbox hides them."""
    hidden = [p for p in dict.fromkeys(paths) if any(p.is_relative_to(h) for h in _SANDBOX_HIDDEN)]
    return [p for p in hidden if not any(p != q and p.is_relative_to(q) for q in hidden)]


VENV_BIN = VENV / "bin"
VENV_PYTHON = VENV_BIN / "python"
#: The install prefix the shipped unit files name; ``Box.install_unit_file`` swaps it.
INSTALLED_BIN = "/usr/local/bin/"

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_POLL = 0.05  # seconds between checks while waiting for something, always with a deadline
_counter = itertools.count()

T = TypeVar("T")


class Result(NamedTuple):
    """What a command in the box did; unpacks as ``rc, stdout, stderr``."""

    rc: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class BoxError(Exception):
    """The box could not boot, stop, or run something; the message includes what it saw."""


class BoxTimeoutError(BoxError):
    """A command in the box ran past its timeout and was killed."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


def unavailable_reason() -> str | None:
    """Why no box can be booted here, or ``None`` when it can."""
    if os.geteuid() != 0:
        return "needs root: systemd-nspawn boots a container"
    for tool, package in (
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install {package})"
    return None


def _host_runs_systemd() -> bool:
    with contextlib.suppress(OSError):
        return os.path.isdir("/run/systemd/system") and (
            Path("/proc/1/comm").read_text().strip() == "systemd"
        )
    return False


def _own_cgroup_dirs(name: str) -> list[Path]:
    """A new cgroup named ``name`` next to ours in the name=systemd and unified hierarchies."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy_id, controllers, path = line.split(":", 2)
        own["unified" if hierarchy_id == "0" else controllers] = path
    dirs: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        mount_point = fields.split()[4]
        fstype, _source, options = rest.split()[:3]
        if fstype == "cgroup2":
            key = "unified"
        elif fstype == "cgroup" and "name=systemd" in options.split(","):
            key = "name=systemd"
        else:
            continue
        if key in own:
            dirs.append(Path(mount_point) / own[key].lstrip("/") / name)
    return dirs


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children.extend(int(c) for c in (task / "children").read_text().split())
    return children


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid``, deepest first (the order to kill them in)."""
    found: list[int] = []
    for child in _children(pid):
        found.extend(_descendants(child))
        found.append(child)
    return found


def _kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _cgroup_empty(procs: Path) -> bool:
    with contextlib.suppress(OSError):
        return not procs.read_text().strip()
    return True  # gone


def _is_namespace_init(pid: int) -> bool:
    """Whether ``pid`` is PID 1 of its own PID namespace (``NSpid: <pid> 1``)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                return len(ids) >= 2 and ids[-1] == "1"
    return False


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, describe: Callable[[], str] = str
) -> T:
    """Poll ``check`` until it returns something other than None/False, or raise BoxError.

    ``describe`` is called on timeout to say what was seen instead (a journal tail, ...).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            seen = describe()
            raise BoxError(
                f"timed out after {timeout:g}s waiting for {what}"
                + (f"\n--- seen instead ---\n{seen}" if seen else "")
            )
        time.sleep(_POLL)  # sleep-ok: the poll period of a deadline-bound wait_until()


BindSpec = str | Path | tuple[str | Path, str | Path]


class Box:
    """A booted systemd in a container; use as a context manager, or ``start()``/``stop()``.

    ``binds_ro``/``binds``: host paths to bind read-only/read-write, either a path (bound
    at the same place) or ``(host_path, box_path)``. The project and the venv are always
    bound read-only. Units can be bound at boot (``binds_ro=[(file, "/etc/systemd/system/x")]``)
    or installed later with ``install_unit``/``install_unit_file``.
    ``tmpfs``: box paths to mount an empty writable tmpfs on (mode 0755), e.g.
    ``"/usr/local"`` for a test that installs there: the box's ``/usr`` is the host's,
    read-only. (``/opt``, ``/srv`` and the rest of the root are writable already: the root
    is a tmpfs.)
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        binds_ro: Iterable[BindSpec] = (),
        binds: Iterable[BindSpec] = (),
        tmpfs: Iterable[str] = (),
        boot_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.name = name or f"sockd-test-{os.getpid()}-{next(_counter)}"
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,62}", self.name):
            raise ValueError(f"{self.name!r} is not a usable machine name")
        ro = [PROJECT, *(() if VENV.is_relative_to(PROJECT) else (VENV,)), *binds_ro]
        self._binds = [("--bind-ro", spec) for spec in ro] + [("--bind", spec) for spec in binds]
        self._tmpfs = list(tmpfs)
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None
        self.last_journal = ""
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._init_pid: int | None = None
        self._cgroups: list[Path] = []

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def init_pid(self) -> int:
        """Host PID of the box's systemd (the target of nsenter)."""
        if self._init_pid is None:
            raise BoxError(f"box {self.name} is not running")
        return self._init_pid

    @property
    def nspawn_pid(self) -> int:
        if self._nspawn is None:
            raise BoxError(f"box {self.name} is not running")
        return self._nspawn.pid

    @property
    def cgroup_dirs(self) -> list[Path]:
        """The host cgroups made for this box (empty on a systemd host or once stopped)."""
        return list(self._cgroups)

    @property
    def console_log(self) -> str:
        """What the box printed on its console (boot messages), for failure reports."""
        if self.workdir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.workdir / "console.log").read_text(errors="replace")
            return text.replace("\r\n", "\n")
        return ""

    def start(self) -> Box:
        """Boot and wait until the box's systemd says running (or degraded)."""
        if self._nspawn is not None:
            raise BoxError(f"box {self.name} is already running")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        try:
            self._spawn()
            self._init_pid = wait_until(
                self._find_init,
                self.boot_timeout,
                f"box {self.name} to start its init",
                lambda: self.console_log[-3000:],
            )
            self._wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        assert self.workdir is not None
        preset = self.workdir / "00-test.preset"
        preset.write_text(
            "# Enable nothing the host has installed; tests start their units.\ndisable *\n"
        )
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--directory=/",
            "--volatile=yes",
            "--private-network",
            "--boot",
            f"--machine={self.name}",
            "--console=read-only",
            "--kill-signal=SIGRTMIN+3",
            f"--bind-ro={preset}:/etc/systemd/system-preset/00-test.preset",
        ]
        for option, spec in self._binds:
            source, target = spec if isinstance(spec, tuple) else (spec, spec)
            argv.append(f"{option}={source}:{target}")
        argv += [f"--tmpfs={path}:mode=0755" for path in self._tmpfs]
        argv += ["--", "systemd.firstboot=off"]
        if _host_runs_systemd():
            argv = [
                "systemd-run",
                "--scope",
                "--quiet",
                "--collect",
                f"--unit={self.name}",
                "--",
                *argv,
            ]
        else:
            # Join a fresh cgroup before exec'ing nspawn, so it never starts in a shared one.
            self._cgroups = _own_cgroup_dirs(self.name)
            for directory in self._cgroups:
                directory.mkdir()
            joins = "".join(
                f"echo $$ > {shlex.quote(str(d / 'cgroup.procs'))} && " for d in self._cgroups
            )
            argv = ["/bin/sh", "-c", joins + 'exec "$@"', "sh", *argv]
        with open(self.workdir / "console.log", "wb") as console:
            self._nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _find_init(self) -> int | None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise BoxError(
                f"systemd-nspawn for box {self.name} exited with {self._nspawn.returncode}:\n"
                + self.console_log[-3000:]
            )
        return next((c for c in _children(self._nspawn.pid) if _is_namespace_init(c)), None)

    def _wait_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        states: list[str] = []

        def running() -> bool:
            remaining = max(deadline - time.monotonic(), 1.0)
            # Before systemd is up this answers "offline" (or fails) at once: ask again.
            _rc, out, err = self.run(
                "systemctl", "is-system-running", "--wait", timeout=remaining, check=False
            )
            state = out.strip() or err.strip()
            if not states or states[-1] != state:
                states.append(state)
            return state in ("running", "degraded")

        wait_until(
            running,
            self.boot_timeout,
            f"box {self.name} to finish booting",
            lambda: f"states: {states}\n" + self.console_log[-3000:],
        )

    def stop(self) -> None:
        """Power the box off and remove everything it left; safe to call more than once."""
        if (
            self._init_pid is not None
            and self._nspawn is not None
            and (self._nspawn.poll() is None)
        ):
            try:
                self.last_journal = self.run(
                    "journalctl", "--no-pager", "-o", "short-monotonic", timeout=10, check=False
                ).stdout
            except BoxError as exc:
                self.last_journal = f"(could not read the journal: {exc})"
        if self._nspawn is not None:
            self._terminate(self._nspawn)
        self._remove_cgroups()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self._nspawn = None
        self._init_pid = None

    def _terminate(self, nspawn: subprocess.Popen[bytes]) -> None:
        if nspawn.poll() is None:
            _kill(nspawn.pid, signal.SIGTERM)
            try:
                nspawn.wait(self.stop_timeout)
                return
            except subprocess.TimeoutExpired:
                pass
            # No clean poweroff in time: kill the box's init, which ends the container.
            if self._init_pid is not None and _is_namespace_init(self._init_pid):
                _kill(self._init_pid)
            try:
                nspawn.wait(5)
            except subprocess.TimeoutExpired:
                _kill(nspawn.pid)
                nspawn.wait()

    def _remove_cgroups(self) -> None:
        for top in self._cgroups:
            if not top.exists():
                continue
            # Deepest first: a cgroup can only be removed once it has no children.
            nested = sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True)
            for directory in [*nested, top]:
                procs = directory / "cgroup.procs"
                with contextlib.suppress(OSError):
                    for pid in procs.read_text().split():
                        _kill(int(pid))
                with contextlib.suppress(BoxError):
                    wait_until(partial(_cgroup_empty, procs), 5, f"cgroup {directory} to empty")
                with contextlib.suppress(OSError):
                    directory.rmdir()
        self._cgroups = []

    def __enter__(self) -> Box:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- running things ----------------------------------------------------------------

    def run(
        self,
        *argv: str | Path,
        timeout: float = 30.0,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = False,
    ) -> Result:
        """Run ``argv`` in the box as root; returns ``(rc, stdout, stderr)``.

        Raises ``BoxTimeoutError`` (with the output so far) after ``timeout`` seconds, having
        killed the command; with ``check=True`` raises ``BoxError`` on a non-zero exit.
        The environment is a clean one (PATH, C.UTF-8, no pager or colours) plus ``env``.
        """
        command = [
            "nsenter",
            "-t",
            str(self.init_pid),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-r",
            "-w",
            "--",
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            *map(str, argv),
        ]
        environment = {
            "PATH": _PATH,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "SYSTEMD_COLORS": "0",
            "SYSTEMD_PAGER": "",
            "PAGER": "cat",
            **(env or {}),
        }
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
        )
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            # The command first (deepest descendants first): nsenter then reaps it and
            # exits by itself. Killing nsenter first would leave the command to linger.
            for pid in _descendants(proc.pid):
                _kill(pid)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                _kill(proc.pid)
                out, err = proc.communicate()
            partial = Result(
                proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
            )
            raise BoxTimeoutError(
                f"{shlex.join(map(str, argv))} did not finish in {timeout:g}s in box "
                f"{self.name}\n--- stdout ---\n{partial.stdout}\n--- stderr ---\n{partial.stderr}",
                partial,
            ) from None
        result = Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.rc != 0:
            raise BoxError(
                f"{shlex.join(map(str, argv))} exited with {result.rc} in box {self.name}\n"
                f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
            )
        return result

    def sh(self, script: str, *, timeout: float = 30.0, check: bool = False) -> Result:
        """Run a shell snippet in the box."""
        return self.run("/bin/sh", "-c", script, timeout=timeout, check=check)

    def systemctl(self, *args: str, timeout: float = 60.0, check: bool = False) -> Result:
        return self.run("systemctl", "--no-pager", *args, timeout=timeout, check=check)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload", check=True)

    def is_active(self, unit: str) -> str:
        """``systemctl is-active`` output: active, activating, failed, inactive, ..."""
        return self.systemctl("is-active", unit).stdout.strip()

    # --- files -------------------------------------------------------------------------

    def write_file(
        self, path: str, content: str | bytes, *, mode: int = 0o644, owner: str | None = None
    ) -> None:
        """Create or replace ``path`` in the box (parents created), with mode and owner."""
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"'
        if owner is not None:
            script += ' && chown "$3" -- "$1"'
        self.run(
            "/bin/sh", "-c", script, "sh", path, f"{mode:o}", owner or "", input=content, check=True
        )

    def read_file(self, path: str) -> str:
        return self.run("cat", "--", path, check=True).stdout

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path).rc == 0

    def install_unit(self, name: str, text: str, *, reload: bool = True) -> str:
        """Write a unit to /etc/systemd/system/``name`` and (by default) daemon-reload.

        A service also gets a drop-in that bind-mounts the checkout and its venv into the
        service's own mount namespace: under /tmp, /home or /root (where CI or a developer
        may have cloned it) the unit's sandbox (PrivateTmp=, ProtectHome=) would hide
        them. Production installs live in /usr/local and need no such thing.
        """
        path = f"/etc/systemd/system/{name}"
        self.write_file(path, text)
        if name.endswith(".service") and "\n[Service]" in "\n" + text:
            exposed = " ".join(str(p) for p in _hidden_by_sandbox((PROJECT, VENV)))
            if exposed:
                self.write_file(
                    f"/etc/systemd/system/{name}.d/00-test-checkout.conf",
                    f"[Service]\nBindReadOnlyPaths={exposed}\n",
                )
        if reload:
            self.daemon_reload()
        return path

    def install_unit_file(
        self,
        source: Path,
        name: str | None = None,
        *,
        replace: Mapping[str, str] | None = None,
        reload: bool = True,
    ) -> str:
        """Install a unit file from the host, pointing its commands at the test venv.

        ``replace`` substitutes literal text of the shipped file first (a missing key is an
        error, so a test notices when the file changes); then ``/usr/local/bin/`` (where
        the shipped units expect sockd and sockctl) becomes the venv's bin directory.
        """
        text = source.read_text()
        for old, new in (replace or {}).items():
            if old not in text:
                raise BoxError(f"{old!r} does not occur in {source}")
            text = text.replace(old, new)
        text = text.replace(INSTALLED_BIN, f"{VENV_BIN}/")
        return self.install_unit(name or source.name, text, reload=reload)

    def write_config(self, text: str, path: str = "/etc/sockd/sockd.toml") -> None:
        """Write a sockd config in the box, readable by the sockd user if it exists."""
        self.write_file(path, text, mode=0o644)

    def install_packaging(self) -> None:
        """Install sockd's packaging the way docs/systemd.md says: user, dirs, units.

        Creates the sockd user (sysusers.d), /etc/sockd (tmpfiles.d), and installs
        sockd.service, sockd.socket and sockd@.service with commands from the venv.
        """
        sysusers = (PACKAGING / "sysusers.d" / "sockd.conf").read_text()
        tmpfiles = (PACKAGING / "tmpfiles.d" / "sockd.conf").read_text()
        self.write_file("/etc/sysusers.d/sockd.conf", sysusers)
        self.write_file("/etc/tmpfiles.d/sockd.conf", tmpfiles)
        self.run("systemd-sysusers", "/etc/sysusers.d/sockd.conf", check=True)
        self.run("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/sockd.conf", check=True)
        for unit in sorted((PACKAGING / "systemd").iterdir()):
            self.install_unit_file(unit, reload=False)
        self.daemon_reload()

    # --- the journal -------------------------------------------------------------------

    def journal(self, unit: str | None = None, *matches: str, output: str = "cat") -> str:
        """``journalctl`` for this boot (optionally one unit and FIELD=value matches)."""
        args = ["journalctl", "--no-pager", "-o", output]
        if unit is not None:
            args += ["-u", unit]
        return self.run(*args, *matches, check=True).stdout

    def journal_entries(self, unit: str | None = None, *matches: str) -> list[dict[str, Any]]:
        """Journal entries as dicts of their fields (``journalctl -o json``)."""
        text = self.journal(unit, *matches, output="json")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_for_journal(
        self, unit: str | None, needle: str, *matches: str, timeout: float = 20.0
    ) -> str:
        """Wait until ``needle`` appears in the unit's journal; returns the journal text."""

        def seen() -> str | None:
            text = self.journal(unit, *matches)
            return text if needle in text else None

        return wait_until(
            seen,
            timeout,
            f"{needle!r} in the journal of {unit}",
            lambda: self.journal(unit)[-3000:],
        )

    def wait_for_state(self, unit: str, state: str, timeout: float = 20.0) -> None:
        """Wait until ``systemctl is-active unit`` says ``state``."""
        wait_until(
            lambda: self.is_active(unit) == state,
            timeout,
            f"{unit} to be {state}",
            lambda: self.systemctl("status", unit).output[-3000:],
        )

    def unit_property(self, unit: str, name: str) -> str:
        return self.systemctl("show", "--value", "-p", name, unit, check=True).stdout.strip()
