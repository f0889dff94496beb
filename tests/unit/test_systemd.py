"""sockd.systemd against real sockets: exact sd_notify datagrams, inherited fds, journal entries."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from sockd import systemd
from sockd.systemd import InheritedSocket, JournalWriter, Notifier, SystemdError

# A missing datagram fails the test after this long instead of hanging it.
RECV_TIMEOUT = 5.0


class Addr(NamedTuple):
    """A configured listen address, shaped like sockd.config.Address."""

    host: str
    port: int


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variable leaks in from the environment the tests run in."""
    for name in (
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "JOURNAL_STREAM",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def datagram_server(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT)
    return sock


@pytest.fixture
def notify_server(short_tmp: Path, clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound at a path and exported as $NOTIFY_SOCKET."""
    path = str(short_tmp / "notify")
    server = datagram_server(path)
    clean_env.setenv("NOTIFY_SOCKET", path)
    yield server
    server.close()


def assert_nothing_queued(server: socket.socket) -> None:
    server.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            server.recv(4096)
    finally:
        server.settimeout(RECV_TIMEOUT)


# --- sd_notify ---------------------------------------------------------------------------


def test_notify_without_socket_is_a_noop(clean_env: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET every call returns False and records no error."""
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.last_error is None
    assert systemd.notify("READY=1") is False


def test_ready_sends_exact_datagram(notify_server: socket.socket) -> None:
    """ready() sends the single line READY=1, nothing more."""
    with Notifier() as notifier:
        assert notifier.ready() is True
    assert notify_server.recv(4096) == b"READY=1"


def test_abstract_socket_address(clean_env: pytest.MonkeyPatch) -> None:
    """An "@name" NOTIFY_SOCKET reaches the abstract socket "\\0name"."""
    name = f"sockd-test-{os.getpid()}-{time.monotonic_ns()}"
    server = datagram_server("\0" + name)
    clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        with Notifier() as notifier:
            assert notifier.stopping() is True
        assert server.recv(4096) == b"STOPPING=1"
    finally:
        server.close()


def test_state_helpers_send_documented_lines(notify_server: socket.socket) -> None:
    """Each helper sends its sd_notify assignment, STATUS= joined by a newline."""
    with Notifier() as notifier:
        notifier.ready("serving 2 addresses")
        notifier.status("draining\n3 connections")
        notifier.watchdog()
        notifier.extend_timeout(1.5)
        notifier.stopping("stopping")
        notifier.remove_fds("listen-0")
    received = [notify_server.recv(4096) for _ in range(6)]
    assert received == [
        b"READY=1\nSTATUS=serving 2 addresses",
        b"STATUS=draining 3 connections",
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=1500000",
        b"STOPPING=1\nSTATUS=stopping",
        b"FDSTOREREMOVE=1\nFDNAME=listen-0",
    ]


def test_reloading_carries_monotonic_timestamp(notify_server: socket.socket) -> None:
    """reloading() sends RELOADING=1 with CLOCK_MONOTONIC in microseconds taken at the call."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier() as notifier:
        notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = notify_server.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_store_fds_passes_descriptors(notify_server: socket.socket) -> None:
    """store_fds() sends FDSTORE=1 and FDNAME= with the fds attached as SCM_RIGHTS."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, Notifier() as notifier:
        assert notifier.store_fds("listen-0", [listener.fileno()]) is True
        message, fds, _flags, _addr = socket.recv_fds(notify_server, 4096, 4)
        try:
            assert message == b"FDSTORE=1\nFDNAME=listen-0"
            assert len(fds) == 1
            ours, theirs = os.fstat(listener.fileno()), os.fstat(fds[0])
            assert (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)
        finally:
            for fd in fds:
                os.close(fd)


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", "x" * 256])
def test_store_fds_rejects_bad_names(notify_server: socket.socket, name: str) -> None:
    """FDNAME values systemd would refuse raise ValueError before anything is sent."""
    with Notifier() as notifier, pytest.raises(ValueError, match="fd store name"):
        notifier.store_fds(name, [0])
    assert_nothing_queued(notify_server)


def test_line_with_newline_is_rejected(notify_server: socket.socket) -> None:
    """A newline inside one line would forge another assignment, so send() refuses it."""
    with Notifier() as notifier, pytest.raises(ValueError, match="newline"):
        notifier.send("STATUS=a\nREADY=1")


def test_one_socket_is_reused(notify_server: socket.socket) -> None:
    """Repeated sends keep one socket open instead of opening one per message."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with Notifier() as notifier:
        notifier.watchdog()
        after_first = open_fds()
        for _ in range(20):
            # Read as we go: the kernel queues only a few datagrams (net.unix.max_dgram_qlen).
            assert notify_server.recv(4096) == b"WATCHDOG=1"
            assert notifier.watchdog() is True
        assert open_fds() == after_first
    assert notify_server.recv(4096) == b"WATCHDOG=1"


def test_blocked_manager_times_out(notify_server: socket.socket) -> None:
    """When nobody reads the socket, a send gives up after its timeout instead of hanging."""
    errors: list[str] = []
    with Notifier(timeout=0.05, on_error=errors.append) as notifier:
        assert notifier.watchdog() is True
        for _ in range(1000):
            if not notifier.watchdog():
                break
    assert errors
    assert "timed out" in errors[0]


def test_concurrent_senders_do_not_mix_datagrams(notify_server: socket.socket) -> None:
    """Threads sharing a notifier each get their own intact datagram."""
    notifier = Notifier()
    threads = [
        threading.Thread(target=lambda t=t: [notifier.status(f"t{t}-{i}") for i in range(50)])
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    received = {notify_server.recv(4096) for _ in range(8 * 50)}
    for thread in threads:
        thread.join(RECV_TIMEOUT)
    notifier.close()
    assert received == {f"STATUS=t{t}-{i}".encode() for t in range(8) for i in range(50)}


def test_forked_child_does_not_notify(notify_server: socket.socket) -> None:
    """In a forked child notifications return False and send nothing; the parent still can."""
    notifier = Notifier()
    notifier.watchdog()
    assert notify_server.recv(4096) == b"WATCHDOG=1"
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- child
        code = 1
        try:
            sent = notifier.ready() or notifier.stopping() or systemd.notify("READY=1")
            code = 0 if not sent and not notifier.enabled else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert_nothing_queued(notify_server)
    assert notifier.ready() is True
    assert notify_server.recv(4096) == b"READY=1"
    notifier.close()


def test_send_failure_is_reported_once(short_tmp: Path, clean_env: pytest.MonkeyPatch) -> None:
    """A missing socket makes calls return False, with the path and reason in last_error."""
    missing = str(short_tmp / "gone")
    clean_env.setenv("NOTIFY_SOCKET", missing)
    errors: list[str] = []
    notifier = Notifier(on_error=errors.append)
    assert notifier.enabled
    assert notifier.watchdog() is False
    assert notifier.watchdog() is False
    assert notifier.last_error is not None
    assert missing in notifier.last_error
    assert "No such file" in notifier.last_error
    assert errors == [notifier.last_error]
    # Once the manager is back the next call succeeds and clears the error.
    server = datagram_server(missing)
    with server:
        assert notifier.watchdog() is True
        assert server.recv(4096) == b"WATCHDOG=1"
    assert notifier.last_error is None
    notifier.close()


def test_unsupported_address_is_reported(clean_env: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET form sockd cannot speak (vsock) is an error message, not a crash."""
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = Notifier()
    assert notifier.ready() is False
    assert notifier.last_error is not None
    assert "vsock:2:1234" in notifier.last_error


def test_module_notify_follows_environment(short_tmp: Path, clean_env: pytest.MonkeyPatch) -> None:
    """notify() sends to whatever $NOTIFY_SOCKET names at the time of the call."""
    first = datagram_server(str(short_tmp / "one"))
    second = datagram_server(str(short_tmp / "two"))
    with first, second:
        clean_env.setenv("NOTIFY_SOCKET", str(short_tmp / "one"))
        assert systemd.notify("READY=1", "STATUS=one") is True
        clean_env.setenv("NOTIFY_SOCKET", str(short_tmp / "two"))
        assert systemd.notify("READY=1") is True
        assert first.recv(4096) == b"READY=1\nSTATUS=one"
        assert second.recv(4096) == b"READY=1"


# --- watchdog ----------------------------------------------------------------------------


def test_watchdog_interval_is_half_the_timeout(clean_env: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=10 s gives a 5 s ping period when WATCHDOG_PID is ours or unset."""
    assert systemd.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    assert systemd.watchdog_interval() == 5.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 5.0


def test_watchdog_for_another_pid_is_off(clean_env: pytest.MonkeyPatch) -> None:
    """A WATCHDOG_PID naming another process means the watchdog is not ours to ping."""
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None


def test_watchdog_unset_environment(clean_env: pytest.MonkeyPatch) -> None:
    """unset_environment removes both variables after reading them."""
    clean_env.setenv("WATCHDOG_USEC", "3000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval(unset_environment=True) == 1.5
    assert "WATCHDOG_USEC" not in os.environ
    assert "WATCHDOG_PID" not in os.environ


@pytest.mark.parametrize("value", ["soon", "-5", "0"])
def test_malformed_watchdog_usec_raises(clean_env: pytest.MonkeyPatch, value: str) -> None:
    """A malformed WATCHDOG_USEC is reported with the variable's name and value."""
    clean_env.setenv("WATCHDOG_USEC", value)
    with pytest.raises(SystemdError, match=f"WATCHDOG_USEC='{value}'"):
        systemd.watchdog_interval()


#: Values str.isdigit() takes but that are not ASCII decimal numbers, or are too long.
NOT_ASCII_NUMBERS = [
    pytest.param("\u00b2", id="superscript-two"),
    pytest.param("\u0661\u0662", id="arabic-indic"),
    pytest.param("\uff11\uff12", id="fullwidth"),
    pytest.param("1" * 20, id="20-digits"),
    pytest.param("9" * 5000, id="5000-digits"),
    pytest.param(" 12", id="leading-space"),
    pytest.param("+12", id="plus-sign"),
]


@pytest.mark.parametrize("value", NOT_ASCII_NUMBERS)
@pytest.mark.parametrize("variable", ["WATCHDOG_USEC", "WATCHDOG_PID"])
def test_watchdog_variables_take_only_ascii_digits(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A watchdog variable that is not 1-19 ASCII digits is a SystemdError: one line that
    names the variable and shows at most the value's start, never a ValueError."""
    clean_env.setenv("WATCHDOG_USEC", "10000000")
    clean_env.setenv(variable, value)
    with pytest.raises(SystemdError) as info:
        systemd.watchdog_interval()
    message = str(info.value)
    assert message.startswith(f"{variable}=") and "\n" not in message
    assert len(message) < 120


def test_watchdog_usec_of_19_digits_is_accepted(clean_env: pytest.MonkeyPatch) -> None:
    """The longest value taken, 19 ASCII digits (any 64-bit microsecond count), works."""
    clean_env.setenv("WATCHDOG_USEC", "1" + "0" * 18)
    assert systemd.watchdog_interval() == 5e11


# --- listen_fds --------------------------------------------------------------------------

# Runs in a subprocess so dup2() onto fds 3.. cannot clobber the test process's own fds.
LISTEN_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys
    from sockd import systemd

    spec = json.loads(sys.argv[1])
    made = []  # (address or None, fd)
    for kind in spec["sockets"]:
        if kind == "pipe":
            read_end, write_end = os.pipe()
            made.append((None, read_end))
            continue
        if kind == "tcp4":
            s = socket.create_server(("127.0.0.1", 0))
        elif kind == "tcp6":
            s = socket.create_server(("::1", 0), family=socket.AF_INET6)
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(spec["unix_path"])
            s.listen()
        made.append((s.getsockname(), s.detach()))
    # Park every fd above the target range first: a new socket may already be fd 3.
    parked = [(address, fcntl.fcntl(fd, fcntl.F_DUPFD, 100)) for address, fd in made]
    for _, fd in made:
        os.close(fd)
    for offset, (_, fd) in enumerate(parked):
        os.dup2(fd, 3 + offset)  # inheritable, as systemd passes them
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(spec.get("count", len(parked)))
    os.environ["LISTEN_PID"] = str(os.getpid())
    if spec["names"] is not None:
        os.environ["LISTEN_FDNAMES"] = spec["names"]
    try:
        got = systemd.listen_fds()
    except systemd.SystemdError as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(0)
    print(json.dumps({
        "expected": [address for address, _ in parked],
        "got": [
            {
                "fd": s.fd,
                "name": s.name,
                "family": s.family,
                "type": s.type,
                "address": s.address,
                "listening": s.listening,
                "inheritable": os.get_inheritable(s.fd),
            }
            for s in got
        ],
        "env": {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")},
    }))
    """
)


def run_listen_child(
    sockets: list[str], names: str | None, unix_path: str = "", count: int | None = None
) -> Any:
    """Run LISTEN_CHILD with the given sockets at fds 3.. and return its JSON report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    spec: dict[str, Any] = {"sockets": sockets, "names": names, "unix_path": unix_path}
    if count is not None:
        spec["count"] = count
    proc = subprocess.run(
        [sys.executable, "-c", LISTEN_CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_listen_fds_wraps_passed_sockets(short_tmp: Path) -> None:
    """Sockets at fds 3.. come back named, with family, address, CLOEXEC set, env unset."""
    unix_path = str(short_tmp / "ctl")
    out = run_listen_child(["tcp4", "tcp6", "unix"], "web:web6:control", unix_path)
    got = out["got"]
    assert [s["fd"] for s in got] == [3, 4, 5]
    assert [s["name"] for s in got] == ["web", "web6", "control"]
    assert [s["family"] for s in got] == [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]
    assert all(s["type"] == socket.SOCK_STREAM for s in got)
    assert [s["address"] for s in got] == out["expected"]
    assert got[2]["address"] == unix_path
    assert all(s["listening"] for s in got)
    assert not any(s["inheritable"] for s in got)
    assert out["env"] == {"LISTEN_FDS": None, "LISTEN_PID": None, "LISTEN_FDNAMES": None}


def test_listen_fds_without_names_are_unknown() -> None:
    """Without LISTEN_FDNAMES every socket is named "unknown", as sd_listen_fds_with_names."""
    out = run_listen_child(["tcp4"], None)
    assert [s["name"] for s in out["got"]] == ["unknown"]


def test_listen_fds_rejects_non_socket() -> None:
    """A passed fd that is not a socket is an error naming the fd and its name."""
    out = run_listen_child(["tcp4", "pipe"], "web:fifo")
    assert out["error"].startswith('file descriptor 4 ("fifo") passed by systemd is not a socket')


def test_listen_fds_rejects_closed_fd() -> None:
    """LISTEN_FDS counting more fds than are open is an error naming the missing fd."""
    out = run_listen_child(["tcp4"], "web:gone", count=2)
    assert out["error"].startswith(
        'file descriptor 4 ("gone") passed by systemd cannot be used (Bad file descriptor)'
    )


def test_listen_fds_unset(clean_env: pytest.MonkeyPatch) -> None:
    """Without LISTEN_FDS there is nothing inherited."""
    assert systemd.listen_fds() == []


def test_listen_fds_for_another_pid(clean_env: pytest.MonkeyPatch) -> None:
    """Fds meant for another process (LISTEN_PID differs) are ignored and the env cleared."""
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDNAMES", "a:b")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ
    assert "LISTEN_FDNAMES" not in os.environ


def test_listen_fds_keeps_environment_on_request(clean_env: pytest.MonkeyPatch) -> None:
    """unset_environment=False leaves the variables for the caller to inspect."""
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert systemd.listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


def test_listen_fds_name_count_mismatch(clean_env: pytest.MonkeyPatch) -> None:
    """LISTEN_FDNAMES with the wrong number of names is an error, before any fd is touched."""
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDNAMES", "only-one")
    with pytest.raises(SystemdError, match="names 1 file descriptors but LISTEN_FDS=2"):
        systemd.listen_fds()


@pytest.mark.parametrize(("variable", "value"), [("LISTEN_FDS", "two"), ("LISTEN_PID", "me")])
def test_listen_fds_malformed(clean_env: pytest.MonkeyPatch, variable: str, value: str) -> None:
    """Malformed LISTEN_ variables are errors that quote the variable."""
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv(variable, value)
    with pytest.raises(SystemdError, match=variable):
        systemd.listen_fds()


@pytest.mark.parametrize("value", NOT_ASCII_NUMBERS)
@pytest.mark.parametrize("variable", ["LISTEN_FDS", "LISTEN_PID"])
def test_listen_variables_take_only_ascii_digits(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """LISTEN_FDS/LISTEN_PID that are not 1-19 ASCII digits are a one-line SystemdError
    naming the variable, never a ValueError."""
    clean_env.setenv("LISTEN_FDS", "1")
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv(variable, value)
    with pytest.raises(SystemdError) as info:
        systemd.listen_fds()
    message = str(info.value)
    assert message.startswith(f"{variable}=") and "\n" not in message
    assert len(message) < 120


def test_listen_fds_beyond_the_descriptor_limit_is_an_error(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """A LISTEN_FDS larger than the process can have open is an error, not a huge list."""
    clean_env.setenv("LISTEN_FDS", "9" * 19)
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    with pytest.raises(SystemdError, match="LISTEN_FDS="):
        systemd.listen_fds()


# --- matching inherited sockets to configured addresses --------------------------------


class Sockets:
    """Real listening sockets wrapped as InheritedSocket, closed at teardown."""

    def __init__(self) -> None:
        self.made: list[socket.socket] = []

    def add(
        self, host: str, port: int = 0, *, v6only: bool = False, listen: bool = True
    ) -> InheritedSocket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.made.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((host, port))
        if listen:
            sock.listen()
        return InheritedSocket(sock.fileno(), f"s{len(self.made)}", sock)

    def close(self) -> None:
        for sock in self.made:
            sock.close()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    yield made
    made.close()


def port_of(sock: InheritedSocket) -> int:
    return int(sock.address[1])


def test_exact_ipv4_and_ipv6_match(sockets: Sockets) -> None:
    """A socket bound to exactly the configured address serves it, IPv4 and IPv6 alike."""
    v4 = sockets.add("127.0.0.1")
    v6 = sockets.add("::1")
    inherited = [v4, v6]
    assert systemd.find_inherited(inherited, "127.0.0.1", port_of(v4)) is v4
    assert systemd.find_inherited(inherited, "::1", port_of(v6)) is v6
    assert systemd.find_inherited(inherited, "[::1]", port_of(v6)) is v6
    assert systemd.find_inherited(inherited, "127.0.0.1", port_of(v4) + 1) is None


def test_ipv4_wildcard_served_by_dual_stack(sockets: Sockets) -> None:
    """0.0.0.0:P is served by a dual-stack [::]:P, systemd's default for ListenStream=P."""
    dual = sockets.add("::")
    assert dual.dual_stack
    assert systemd.find_inherited([dual], "0.0.0.0", port_of(dual)) is dual
    assert systemd.find_inherited([dual], "::", port_of(dual)) is dual


def test_ipv6_wildcard_not_served_by_ipv4_socket(sockets: Sockets) -> None:
    """[::]:P configured but 0.0.0.0:P passed would lose IPv6 clients: an error, not a match."""
    v4_any = sockets.add("0.0.0.0")
    with pytest.raises(SystemdError) as caught:
        systemd.find_inherited([v4_any], "::", port_of(v4_any))
    message = str(caught.value)
    assert f"[::]:{port_of(v4_any)}" in message
    assert f"0.0.0.0:{port_of(v4_any)}" in message
    assert "IPv4 only" in message
    assert "ListenStream=" in message


def test_specific_address_not_served_by_wildcard(sockets: Sockets) -> None:
    """127.0.0.1:P configured but 0.0.0.0:P passed would expose the port: an error."""
    v4_any = sockets.add("0.0.0.0")
    with pytest.raises(SystemdError, match=r"server\.listen 127\.0\.0\.1:\d+ does not match"):
        systemd.find_inherited([v4_any], "127.0.0.1", port_of(v4_any))


def test_ipv6_only_wildcard_leaves_ipv4_alone(sockets: Sockets) -> None:
    """An IPv6-only [::]:P neither serves nor blocks 0.0.0.0:P, so nothing matches."""
    v6_only = sockets.add("::", v6only=True)
    assert not v6_only.dual_stack
    assert systemd.find_inherited([v6_only], "0.0.0.0", port_of(v6_only)) is None


def test_ipv4_mapped_socket_matches_ipv4(sockets: Sockets) -> None:
    """A socket bound to ::ffff:127.0.0.1 serves the configured 127.0.0.1."""
    mapped = sockets.add("::ffff:127.0.0.1")
    assert systemd.find_inherited([mapped], "127.0.0.1", port_of(mapped)) is mapped


def test_host_name_is_resolved(sockets: Sockets) -> None:
    """A configured host name matches a socket bound to one of its addresses."""
    v4 = sockets.add("127.0.0.1")
    assert systemd.find_inherited([v4], "localhost", port_of(v4)) is v4


def test_port_zero_never_matches(sockets: Sockets) -> None:
    """Port 0 asks for a fresh port, which no inherited socket can be."""
    v4 = sockets.add("127.0.0.1")
    assert systemd.find_inherited([v4], "127.0.0.1", 0) is None


def test_not_listening_socket_is_rejected(sockets: Sockets) -> None:
    """A bound but not listening socket (Accept=yes style) is reported, not served."""
    idle = sockets.add("127.0.0.1", listen=False)
    with pytest.raises(SystemdError, match="not listening"):
        systemd.find_inherited([idle], "127.0.0.1", port_of(idle))


def test_match_pairs_exact_before_wildcard(sockets: Sockets) -> None:
    """0.0.0.0:P and [::]:P configured take separate sockets when both are passed."""
    v6_only = sockets.add("::", v6only=True)
    port = port_of(v6_only)
    v4_any = sockets.add("0.0.0.0", port)
    wanted = [Addr("0.0.0.0", port), Addr("::", port), Addr("127.0.0.1", 0)]
    result = systemd.match_inherited([v6_only, v4_any], wanted)
    assert result == {wanted[0]: v4_any, wanted[1]: v6_only}


def test_match_rejects_one_socket_for_two_addresses(sockets: Sockets) -> None:
    """0.0.0.0:P and [::]:P configured but one dual-stack socket passed is an error."""
    dual = sockets.add("::")
    port = port_of(dual)
    with pytest.raises(SystemdError, match="lists both"):
        systemd.match_inherited([dual], [Addr("::", port), Addr("0.0.0.0", port)])


def test_match_rejects_unused_inherited_socket(sockets: Sockets) -> None:
    """A passed TCP socket no configured address uses is an error naming it."""
    v4 = sockets.add("127.0.0.1")
    with pytest.raises(SystemdError, match=rf'fd {v4.fd} "{v4.name}" \(tcp 127\.0\.0\.1:'):
        systemd.match_inherited([v4], [Addr("127.0.0.1", port_of(v4) + 1)])


def test_match_ignores_non_tcp(sockets: Sockets, short_tmp: Path) -> None:
    """Unix sockets among the inherited ones are left to the caller."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(short_tmp / "u"))
    unix.listen()
    with unix:
        wrapped = InheritedSocket(unix.fileno(), "control", unix)
        assert wrapped.describe() == f"fd {unix.fileno()} \"control\" (unix '{short_tmp}/u')"
        assert systemd.match_inherited([wrapped], [Addr("127.0.0.1", 9)]) == {}


# --- journal -----------------------------------------------------------------------------


@pytest.fixture
def journal(short_tmp: Path) -> Iterator[tuple[socket.socket, JournalWriter]]:
    """A fake journald socket in a temp dir and a writer pointed at it."""
    path = str(short_tmp / "journal")
    server = datagram_server(path)
    writer = JournalWriter(path)
    yield server, writer
    writer.close()
    server.close()


def test_journal_simple_entry(journal: tuple[socket.socket, JournalWriter]) -> None:
    """Single-line values go as KEY=value lines, one datagram per entry."""
    server, writer = journal
    writer.send({"MESSAGE": "conn.close", "PRIORITY": "6", "SOCKD_EVENT": "conn.close"})
    assert server.recv(65536) == b"MESSAGE=conn.close\nPRIORITY=6\nSOCKD_EVENT=conn.close\n"


def test_journal_field_names_are_sanitised(journal: tuple[socket.socket, JournalWriter]) -> None:
    """Names are upper-cased, limited to [A-Z0-9_], never start with _ or a digit."""
    server, writer = journal
    writer.send({"sockd_peer": "a", "_PID": "b", "bad-name.x": "c", "2fa": "d", "café": "e"})
    assert server.recv(65536) == b"SOCKD_PEER=a\nPID=b\nBAD_NAME_X=c\nX2FA=d\nCAF_=e\n"


def test_journal_field_name_limits() -> None:
    """Names are cut to 64 characters; a name with nothing usable is a ValueError."""
    assert systemd.journal_field_name("a" * 80) == "A" * 64
    with pytest.raises(ValueError, match="no usable characters"):
        systemd.journal_field_name("__")


def test_journal_multiline_value_uses_length_prefix(
    journal: tuple[socket.socket, JournalWriter],
) -> None:
    """A value with newlines goes as KEY, newline, 64-bit LE length, bytes, newline."""
    server, writer = journal
    value = "Traceback:\n  line 1\n"
    writer.send({"MESSAGE": "boom", "SOCKD_TRACEBACK": value})
    expected = (
        b"MESSAGE=boom\nSOCKD_TRACEBACK\n"
        + struct.pack("<Q", len(value.encode()))
        + value.encode()
        + b"\n"
    )
    assert server.recv(65536) == expected


def test_journal_identifier_is_added_not_overridden(short_tmp: Path) -> None:
    """identifier fills SYSLOG_IDENTIFIER unless the entry sets its own."""
    path = str(short_tmp / "journal")
    with datagram_server(path) as server, JournalWriter(path, identifier="sockd") as writer:
        writer.send({"MESSAGE": "a"})
        writer.send({"MESSAGE": "b", "syslog_identifier": "other"})
        assert server.recv(65536) == b"MESSAGE=a\nSYSLOG_IDENTIFIER=sockd\n"
        assert server.recv(65536) == b"MESSAGE=b\nSYSLOG_IDENTIFIER=other\n"


def test_journal_large_entry_goes_through_sealed_memfd(
    journal: tuple[socket.socket, JournalWriter],
) -> None:
    """An entry too big for a datagram arrives as an empty datagram carrying a sealed memfd."""
    server, writer = journal
    big = "x" * (1024 * 1024)
    writer.send({"MESSAGE": big})
    payload, fds, _flags, _addr = socket.recv_fds(server, 65536, 4)
    try:
        assert payload == b""
        assert len(fds) == 1
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        assert seals & wanted == wanted
        assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:")
        expected = b"MESSAGE=" + big.encode() + b"\n"
        assert os.pread(fds[0], len(expected) + 1, 0) == expected
    finally:
        for fd in fds:
            os.close(fd)


def test_journal_missing_socket_raises(short_tmp: Path) -> None:
    """Without journald the writer raises JournalError (a SystemdError and an OSError)."""
    path = str(short_tmp / "nojournal")
    with JournalWriter(path) as writer, pytest.raises(systemd.JournalError) as caught:
        writer.send({"MESSAGE": "lost"})
    assert str(caught.value) == (
        f"cannot write to the journal at {path}: No such file or directory"
    )
    assert isinstance(caught.value, SystemdError)
    assert isinstance(caught.value, OSError)


def test_journal_writer_usable_in_forked_child(
    journal: tuple[socket.socket, JournalWriter],
) -> None:
    """A child forked while another thread holds the writer's lock can still log."""
    server, writer = journal
    writer.send({"MESSAGE": "parent"})
    assert server.recv(65536) == b"MESSAGE=parent\n"
    holding = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with writer._lock:
            holding.set()
            release.wait(RECV_TIMEOUT)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert holding.wait(RECV_TIMEOUT)
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- child
        code = 1
        try:
            writer.send({"MESSAGE": "child"})
            code = 0
        finally:
            os._exit(code)
    try:
        assert server.recv(65536) == b"MESSAGE=child\n"
    finally:
        release.set()
        holder.join(RECV_TIMEOUT)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_journal_stream_matches(clean_env: pytest.MonkeyPatch, short_tmp: Path) -> None:
    """JOURNAL_STREAM matches only an fd whose device and inode it names."""
    with open(short_tmp / "stream", "w") as stream, open(short_tmp / "other", "w") as other:
        st = os.fstat(stream.fileno())
        assert not systemd.journal_stream_matches([stream.fileno()])
        clean_env.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert systemd.journal_stream_matches([stream.fileno()])
        assert systemd.journal_stream_matches([other.fileno(), stream.fileno()])
        assert not systemd.journal_stream_matches([other.fileno()])
        assert not systemd.journal_stream_matches([999])
        clean_env.setenv("JOURNAL_STREAM", "garbage")
        assert not systemd.journal_stream_matches([stream.fileno()])
        for value in ("\u00b2:1", f"{st.st_dev}:\u00b2", "9" * 5000 + ":1"):
            clean_env.setenv("JOURNAL_STREAM", value)  # malformed: no match, no ValueError
            assert not systemd.journal_stream_matches([stream.fileno()])
