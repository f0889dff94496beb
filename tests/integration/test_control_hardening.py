"""Issue 9's control-channel hardening, against an in-process ``ControlServer``.

Hostile peers are real processes under real uids (``nobody``, with or without a group
this module creates and removes), on a real Unix socket; the backend is the fake of
``test_control.py``. The real daemon is exercised in ``tests/e2e/test_control_hardening.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import select
import shutil
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

from sockd import control, logs
from sockd.control import ControlServer
from sockd.errors import ControlError
from sockd.logs import LogRing
from tests.conftest import REPO, require_reachable_by_others, system_group
from tests.integration.test_control import (
    CLIENT_PYTHON,
    CONFIG,
    DEADLINE,
    FakeBackend,
    Harness,
    RecordingLog,
    assert_error,
    build,
    call,
    connect,
    control_threads,
    exchange,
    make_settings,
    parse_reply,
    read_all,
    wait_until,
)

READ_GROUP = "sockd-hard-read"

# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short, world-traversable directory for sockets, owned by root (us), mode 0755."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="sh")
    os.chmod(path, 0o755)  # noqa: S103 -- the unprivileged clients must reach the socket
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_server(sockdir: str) -> Iterator[Callable[..., Harness]]:
    """Start ControlServers (``backend=`` to pass one); close them all, check no thread leaks."""
    started: list[ControlServer] = []

    def make(backend: FakeBackend | None = None, **overrides: Any) -> Harness:
        path = overrides.pop("socket", os.path.join(sockdir, "c.sock"))
        backend = backend or FakeBackend()
        log = RecordingLog()
        server = ControlServer(make_settings(path, **overrides), backend, log)
        server.start()
        started.append(server)
        return Harness(server, backend, log)

    yield make
    for server in started:
        server.close()
    wait_until(lambda: not control_threads(), "control threads to end")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a group and runs clients as another uid")


@pytest.fixture(scope="module")
def nobody() -> pwd.struct_passwd:
    """The unprivileged ``nobody`` account, for hostile local clients."""
    require_root()
    require_reachable_by_others(CLIENT_PYTHON)
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")


@pytest.fixture(scope="module")
def read_gid() -> Iterator[int]:
    """A read_group created for this module with groupadd, removed afterwards."""
    require_root()
    with system_group(READ_GROUP) as gid:
        yield gid


# A stdlib-only client run as another uid: opens COUNT connections, sends PAYLOAD on
# each, waits until EXPECT of them were answered (or the deadline), prints what came
# back as JSON, then holds every connection open until its stdin closes.
HOLDER = r"""
import json, select, socket, sys, time
path, count, payload, expect = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
socks = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if payload:
        try:
            sock.sendall(payload.encode("latin-1"))
        except OSError:
            pass
    socks.append(sock)
answers, pending = {}, {s.fileno(): s for s in socks}
buffers = {fd: b"" for fd in pending}
deadline = time.monotonic() + 10
while len(answers) < expect and pending and time.monotonic() < deadline:
    ready, _, _ = select.select(list(pending), [], [], 0.2)
    for fd in ready:
        try:
            chunk = pending[fd].recv(65536)
        except OSError:
            chunk = b""
        buffers[fd] += chunk
        if not chunk:
            del pending[fd]
            head = buffers[fd].split(b"\r\n\r\n", 1)
            status = int(head[0].split(b" ")[1]) if head[0].startswith(b"HTTP/1.1 ") else 0
            body = head[1] if len(head) > 1 else b""
            answers[fd] = (status, body.decode("utf-8", "replace"))
statuses = {}
for status, _ in answers.values():
    statuses[str(status)] = statuses.get(str(status), 0) + 1
messages = sorted({body for _, body in answers.values()})
print(json.dumps({"statuses": statuses, "held": len(pending), "messages": messages}), flush=True)
sys.stdin.readline()
"""


@dataclasses.dataclass
class Holder:
    """A HOLDER process and what it reported."""

    proc: subprocess.Popen[str]
    report: dict[str, Any]

    def release(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait(DEADLINE)


def hold(
    user: pwd.struct_passwd,
    groups: list[int],
    path: str,
    count: int,
    expect: int,
    payload: str = "G",
) -> Holder:
    """Run HOLDER as ``user`` with exactly ``groups``; return once it reported."""
    proc = subprocess.Popen(
        [str(CLIENT_PYTHON), "-I", "-c", HOLDER, path, str(count), payload, str(expect)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=groups,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(DEADLINE)
        raise AssertionError(f"holder failed: {proc.stderr.read() if proc.stderr else ''}")
    return Holder(proc, json.loads(line))


# --------------------------------------------------------------------------- item 1: lockout


def test_strangers_are_refused_at_accept_without_a_thread(
    make_server: Callable[..., Harness], nobody: pwd.struct_passwd
) -> None:
    """150 idle connections from a stranger each get 403 at once, hold no slot, and are
    logged as a few rate-limited control.denied lines whose counts add up."""
    harness = make_server(mode=0o666, request_timeout=30.0)
    holder = hold(nobody, [], harness.path, 150, expect=150, payload="")
    try:
        assert holder.report["statuses"] == {"403": 150}, holder.report
        assert holder.report["messages"][0].find(f"uid {nobody.pw_uid} may not use") > 0
        assert harness.server.active_connections == 0
        assert call(harness.path, "GET", "/v1/status").status == 200
    finally:
        holder.release()
    harness.server.close()  # flushes the pending summary
    denied = harness.log.named("control.denied")
    assert sum(event["count"] for event in denied) == 150
    assert len(denied) <= 4, denied  # the first at once, then one summary a second
    first, *summaries = denied
    assert (first["count"], first["uid"], first["path"]) == (1, nobody.pw_uid, None)
    for summary in summaries:
        assert summary["summary"] is True
        assert summary["uids"] == {str(nobody.pw_uid): summary["count"]}
    assert harness.server.refusals["denied"] == 150
    assert harness.backend.calls == [("status", None)]


def test_admins_keep_their_slots_while_a_reader_and_a_stranger_hold_all_they_can(
    make_server: Callable[..., Harness], nobody: pwd.struct_passwd, read_gid: int
) -> None:
    """A reader holding 150 idle connections gets only its budget (32), the rest 503; a
    stranger gets 403s; root still gets status, pause and a full admin budget."""
    harness = make_server(mode=0o666, read_group=READ_GROUP, request_timeout=30.0)
    read_budget = control.CONNECTION_BUDGET["read"]
    reader = hold(nobody, [read_gid], harness.path, 150, expect=150 - read_budget)
    stranger = hold(nobody, [], harness.path, 100, expect=100)
    try:
        assert reader.report["statuses"] == {"503": 150 - read_budget}, reader.report
        assert reader.report["held"] == read_budget
        assert "for the 'read' role (limit 32)" in reader.report["messages"][0]
        assert stranger.report["statuses"] == {"403": 100}
        assert call(harness.path, "GET", "/v1/status").status == 200
        assert call(harness.path, "POST", "/v1/pause").status == 200
        # Root can still open its whole budget at once while the reader holds its own.
        admin_budget = control.CONNECTION_BUDGET["all"]
        socks = [connect(harness.path) for _ in range(admin_budget)]
        try:
            wait_until(
                lambda: harness.server.active_connections == admin_budget + read_budget,
                "every admin connection to be admitted",
            )
            for sock in socks:
                sock.sendall(build("GET", "/v1/status"))
            assert {parse_reply(read_all(sock)).status for sock in socks} == {200}
        finally:
            for sock in socks:
                sock.close()
    finally:
        reader.release()
        stranger.release()
    harness.server.close()
    busy = harness.log.named("control.busy")
    assert sum(event["count"] for event in busy) == 150 - read_budget
    assert busy[0]["reason"] == "connections" and busy[0]["role"] == "read"
    assert len(busy) <= 4


def test_a_trickled_body_is_cut_by_the_deadline_from_accept(
    make_server: Callable[..., Harness],
) -> None:
    """A body sent a byte every 50 ms after a prompt head still gets 408 at request_timeout."""
    harness = make_server(request_timeout=1.0)
    started = time.monotonic()
    with connect(harness.path) as sock:
        sock.sendall(b"PUT /v1/log-level HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        sent = 0
        while not select.select([sock], [], [], 0.05)[0]:
            assert time.monotonic() - started < DEADLINE, "the trickler was never cut off"
            sock.send(b" ")
            sent += 1
        reply = parse_reply(read_all(sock))
    assert_error(reply, 408, "timeout")
    assert sent > 5
    assert time.monotonic() - started < 3.0


def backlog_filled(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A socket listening at ``path`` that never accepts, its backlog filled to the brim."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    held = []
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break
        held.append(client)
    return server, held


def test_sockctl_waits_for_a_full_backlog_then_says_no_answer_not_not_running(
    sockdir: str,
) -> None:
    """A listener whose backlog stays full (it never accepts) makes ``sockctl --timeout 1
    status`` wait the whole second, then exit 1 "did not answer", never 3 "not running"."""
    from tests.e2e.test_control_e2e import SOCKCTL, sockctl

    if SOCKCTL is None:
        pytest.skip("the sockctl command is not installed (pip install -e .)")
    path = os.path.join(sockdir, "full.sock")
    server, held = backlog_filled(path)
    try:
        started = time.monotonic()
        result = sockctl("--socket", path, "--timeout", "1", "status")
        waited = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
        server.close()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "did not answer" in result.stderr and "within 1s" in result.stderr, result.stderr
    assert "not running" not in result.stderr
    assert waited >= 1.0, f"sockctl gave up after {waited:.3f}s instead of waiting"


# --------------------------------------------------------------------------- item 2: followers


def test_followers_beyond_the_admin_budget_get_503_and_admins_keep_request_slots(
    make_server: Callable[..., Harness],
) -> None:
    """64 admin follow streams are served, the 65th gets 503 naming the limit (logged as
    control.busy), and status still answers."""
    harness = make_server()
    budget = control.FOLLOWER_BUDGET["all"]
    streams = []
    try:
        for _ in range(budget):
            sock = connect(harness.path)
            sock.sendall(build("GET", "/v1/logs?n=0&follow=1"))
            streams.append(sock)
        wait_until(lambda: harness.server.followers == budget, "every follower to start")
        reply = call(harness.path, "GET", "/v1/logs?n=0&follow=1")
        assert_error(reply, 503, "unavailable")
        assert "the 'all' role may have 64 at once" in reply.json["error"]["message"]
        assert call(harness.path, "GET", "/v1/status").status == 200
    finally:
        for sock in streams:
            sock.close()
    event = harness.log.wait_for("control.busy")
    assert (event["reason"], event["path"]) == ("followers", "/v1/logs")
    wait_until(lambda: harness.server.followers == 0, "the followers to end")


def test_a_follower_that_never_reads_keeps_a_bounded_queue_and_is_told_what_it_missed() -> None:
    """50,000 events to a follower that does not read: its queue stays within 10,000
    events and 4 MiB; its next read starts with logs.dropped, and missed + delivered
    equals what was logged."""
    ring = LogRing(1000)
    sub = ring.subscribe("info")
    try:
        total = 50_000
        line = json.dumps({"event": "conn.close", "level": "info", "pad": "x" * 200})
        for _ in range(total):
            ring.add(line, logs.INFO)
            if sub.queued[0] >= logs.FOLLOW_QUEUE_EVENTS:
                assert sub.queued[1] <= logs.FOLLOW_QUEUE_BYTES
        wait_until(
            lambda: sub.queued[0] + sub.dropped == total, "the fan-out to hand over every event"
        )
        events, size = sub.queued
        assert events <= logs.FOLLOW_QUEUE_EVENTS and size <= logs.FOLLOW_QUEUE_BYTES
        first = sub.read(0)
        notice = json.loads(first[0])
        assert notice["event"] == "logs.dropped" and notice["level"] == "warning"
        assert notice["missed"] == sub.dropped > 0
        delivered = sum(part.count(b"\n") for part in first[1:])
        while sub.queued[0]:
            delivered += sum(part.count(b"\n") for part in sub.read(0))
        assert delivered + notice["missed"] == total
    finally:
        sub.close()


def test_logging_does_no_work_per_follower() -> None:
    """With 60 followers, 2,000 events logged in a burst are handed to each follower in a
    few batches (one per fan-out run), not one call per event per follower."""
    ring = LogRing(1000)
    subs = [ring.subscribe("debug") for _ in range(60)]
    pushes = 0
    lock = threading.Lock()
    real_push = logs.Subscription.push

    def counting_push(self: logs.Subscription, *args: Any, **kwargs: Any) -> None:
        nonlocal pushes
        with lock:
            pushes += 1
        real_push(self, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(logs.Subscription, "push", counting_push)
            for i in range(2000):
                ring.add({"event": "conn.close", "level": "info", "i": i}, logs.INFO)
            wait_until(
                lambda: all(sub.queued[0] == 2000 for sub in subs), "every follower's batches"
            )
        assert pushes <= 60 * 5, pushes  # a handful of runs, not 60 x 2000
    finally:
        for sub in subs:
            sub.close()


def unused_uid() -> int:
    """A uid no account has and no process runs as: RLIMIT_NPROC counts tasks per uid."""
    taken = {p.pw_uid for p in pwd.getpwall()}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                taken.add(os.stat(f"/proc/{entry}").st_uid)
    for uid in range(62_000 + os.getpid() % 1000, 65_000):
        if uid not in taken:
            return uid
    pytest.skip("no unused uid found for a thread-limit test")


# Run as a uid of its own: lowers its own RLIMIT_NPROC to the one task it is, so the
# fan-out thread cannot start (a real EAGAIN from clone), then raises it back.
FOLLOW_AT_THE_THREAD_LIMIT = r"""
import json, resource, time
from sockd import logs
ring = logs.LogRing(100)
soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))
try:
    ring.subscribe("debug")
    first = "subscribed"
except RuntimeError as exc:
    first = "RuntimeError: " + str(exc)
left = ring.followers
resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
sub = ring.subscribe("debug")
ring.add({"event": "after.the.limit", "level": "info"}, logs.INFO)
parts, deadline = [], time.monotonic() + 5
while not parts and time.monotonic() < deadline:
    parts = sub.read(0.5)
print(json.dumps({"first": first, "left": left, "received": b"".join(parts).decode()}))
"""


def test_a_follower_whose_thread_cannot_start_leaves_nothing_and_the_next_one_is_fed() -> None:
    """At the thread limit (RLIMIT_NPROC, a real clone failure) subscribing raises and
    registers nothing; once threads can start again, a new follower receives events."""
    require_root()
    require_reachable_by_others()  # this checkout and its virtualenv's python
    uid = unused_uid()
    result = subprocess.run(
        [sys.executable, "-c", FOLLOW_AT_THE_THREAD_LIMIT],
        user=uid,
        group=uid,
        extra_groups=[],
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["first"].startswith("RuntimeError: "), report
    assert report["left"] == 0, "the failed follower is still registered"
    assert '"event": "after.the.limit"' in report["received"], report


class ThreadLimitBackend(FakeBackend):
    """A backend whose first log subscription fails as threading does at the limit."""

    def __init__(self) -> None:
        super().__init__()
        self.fail["log_subscribe"] = RuntimeError("can't start new thread")


def test_a_follow_whose_thread_cannot_start_is_503_and_a_later_follow_works(
    make_server: Callable[..., Harness],
) -> None:
    """GET /v1/logs?follow=1 when the feed's thread cannot start is a 503 "cannot start a
    thread" (logged as control.busy, reason threads), not a 500; the next follow streams."""
    harness = make_server(ThreadLimitBackend())
    reply = call(harness.path, "GET", "/v1/logs?n=0&follow=1")
    assert_error(reply, 503, "unavailable")
    assert "cannot start a thread now" in reply.json["error"]["message"]
    event = harness.log.wait_for("control.busy")
    assert (event["reason"], event["role"], event["path"]) == ("threads", "all", "/v1/logs")
    assert harness.log.named("control.error") == []
    wait_until(lambda: harness.server.followers == 0, "the failed follower's slot")
    del harness.backend.fail["log_subscribe"]
    with connect(harness.path) as sock:
        sock.sendall(build("GET", "/v1/logs?n=0&follow=1"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "the follow ended before its head"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: len(harness.backend.subscriptions) == 1, "the subscription")
        harness.backend.subscriptions[0].events.put({"event": "later", "level": "info"})
        data = head
        while b'"later"' not in data:
            chunk = sock.recv(4096)
            assert chunk, "the follow ended before the event"
            data += chunk


# --------------------------------------------------------------------------- item 3: numbers


@pytest.mark.parametrize(
    "body",
    [
        b'{"timeout": 1e303}',
        b'{"timeout": 86400.5}',
        b'{"timeout": -0.5}',
        b'{"timeout": 1' + b"0" * 400 + b"}",
    ],
    ids=["1e303", "past-a-day", "negative", "huge-int"],
)
def test_stop_timeout_out_of_range_is_400(ctl_default: Harness, body: bytes) -> None:
    """A stop timeout outside 0..86400 s is a 400 naming the range; the backend never sees it."""
    reply = call(ctl_default.path, "POST", "/v1/stop", body)
    assert_error(reply, 400, "bad_request")
    assert "from 0 to 86400" in reply.json["error"]["message"]
    assert len(reply.json["error"]["message"]) < 150
    assert ctl_default.backend.called("stop") == []


def test_stop_timeout_of_a_day_is_accepted(ctl_default: Harness) -> None:
    """86400 seconds, the top of the range, is passed on."""
    assert call(ctl_default.path, "POST", "/v1/stop", {"timeout": 86400}).status == 202
    assert ctl_default.backend.called("stop") == [86400.0]


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("DELETE", "/v1/connections/9223372036854775808"),
        ("DELETE", "/v1/connections/99999999999999999999"),
        ("GET", "/v1/logs?n=100001"),
    ],
)
def test_other_numbers_out_of_range_are_400(ctl_default: Harness, method: str, target: str) -> None:
    """A connection id past 2**63-1 and logs n past 100000 are 400s that name the range."""
    reply = call(ctl_default.path, method, target)
    assert_error(reply, 400, "bad_request")
    assert "from 0 to" in reply.json["error"]["message"]


@pytest.fixture
def ctl_default(make_server: Callable[..., Harness]) -> Harness:
    """A started control server with default settings."""
    return make_server()


# --------------------------------------------------------------------------- 411


def test_a_body_without_content_length_is_411_not_a_real_reload(ctl_default: Harness) -> None:
    """POST /v1/reload with {"dry_run": true} but no Content-Length is refused with 411:
    neither a reload nor a dry run happens."""
    raw = b'POST /v1/reload HTTP/1.1\r\nHost: x\r\n\r\n{"dry_run": true}'
    with connect(ctl_default.path) as sock:
        sock.sendall(raw)  # no half-close: the body must be noticed, not waited for
        reply = parse_reply(read_all(sock))
    assert_error(reply, 411, "length_required")
    assert "Content-Length" in reply.json["error"]["message"]
    assert ctl_default.backend.called("reload") == []
    assert ctl_default.backend.called("reload_check") == []


def test_a_body_arriving_just_after_the_head_is_411(ctl_default: Harness) -> None:
    """Body bytes written a moment after a length-less head are still refused (411)."""
    with connect(ctl_default.path) as sock:
        sock.sendall(b"PUT /v1/log-level HTTP/1.1\r\n\r\n")
        sock.sendall(b'{"level": "debug"}')
        reply = parse_reply(read_all(sock))
    assert_error(reply, 411, "length_required")
    assert ctl_default.backend.called("set_log_level") == []


def test_a_post_without_length_or_body_is_411_at_once(ctl_default: Harness) -> None:
    """POST /v1/pause with neither Content-Length nor body (curl -X POST) is a 411 at once,
    saying how to send one; the pause does not happen."""
    started = time.monotonic()
    with connect(ctl_default.path) as sock:
        sock.sendall(b"POST /v1/pause HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = parse_reply(read_all(sock))
    assert_error(reply, 411, "length_required")
    message = reply.json["error"]["message"]
    assert "send Content-Length: 0 for no body; with curl: -d '' or --json" in message
    assert time.monotonic() - started < 2.0
    assert ctl_default.backend.called("pause") == []


def test_a_dry_run_body_sent_late_without_length_is_411_and_nothing_runs(
    ctl_default: Harness,
) -> None:
    """The reviewer's late body: a length-less POST /v1/reload head, its answer read (a
    411), then {"dry_run": true}: neither a reload nor a dry run ever happens."""
    with connect(ctl_default.path) as sock:
        sock.sendall(
            b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "no answer to the head"
            head += chunk
        assert head.startswith(b"HTTP/1.1 411 "), head
        with contextlib.suppress(OSError):
            sock.sendall(b'{"dry_run": true}')
        read_all(sock)
    assert ctl_default.backend.called("reload") == []
    assert ctl_default.backend.called("reload_check") == []


def test_curl_reloads_with_an_empty_body_and_is_told_how_without_one(
    ctl_default: Harness,
) -> None:
    """README's ``curl --unix-socket ... -d '' .../v1/reload`` reloads; ``curl -X POST``
    (no length) gets the 411 that says to use -d ''."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")

    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--unix-socket", ctl_default.path, *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    bare = curl("-X", "POST", "http://localhost/v1/reload")
    assert bare.returncode == 0, bare.stderr
    assert "with curl: -d ''" in json.loads(bare.stdout)["error"]["message"]
    assert ctl_default.backend.called("reload") == []
    result = curl("-d", "", "http://localhost/v1/reload")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == "applied"
    assert ctl_default.backend.called("reload") == [None]


# --------------------------------------------------------------------------- redaction


class SecretBackend(FakeBackend):
    """A backend whose config has handler options with secrets in them."""

    def effective_config(self) -> dict[str, Any]:
        self._enter("effective_config")
        server = {"handler_options": {"password": "s3cret", "dsn": "postgres://u:p@db/x"}}
        return {**CONFIG, "config": {"server": server}}


def test_handler_options_are_redacted_for_readers_only(
    make_server: Callable[..., Harness], nobody: pwd.struct_passwd, read_gid: int
) -> None:
    """A read_group member sees handler_options keys with "<redacted>" values; root sees them."""
    harness = make_server(SecretBackend(), mode=0o666, read_group=READ_GROUP)
    raw = build("GET", "/v1/config").decode("latin-1")
    with subprocess.Popen(
        [str(CLIENT_PYTHON), "-I", "-c", HOLDER, harness.path, "1", raw, "1"],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[read_gid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    ) as proc:
        out, _ = proc.communicate("\n", timeout=DEADLINE)
    report = json.loads(out.splitlines()[0])
    assert report["statuses"] == {"200": 1}
    options = json.loads(report["messages"][0])["config"]["server"]["handler_options"]
    assert options == {"password": "<redacted>", "dsn": "<redacted>"}
    mine = call(harness.path, "GET", "/v1/config").json["config"]["server"]["handler_options"]
    assert mine == {"password": "s3cret", "dsn": "postgres://u:p@db/x"}


# --------------------------------------------------------------------------- item 5: the directory


def test_a_socket_directory_owned_by_another_user_is_refused(
    make_server: Callable[..., Harness], sockdir: str, nobody: pwd.struct_passwd
) -> None:
    """A directory another user owns (they could plant a socket there) is refused with
    its path, owner and mode named, like sshd's StrictModes."""
    theirs = os.path.join(sockdir, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ControlError) as info:
        make_server(socket=os.path.join(theirs, "c.sock"))
    message = str(info.value)
    assert f"directory {theirs} is owned by uid {nobody.pw_uid} (nobody)" in message
    assert "refusing to create control socket" in message
    assert os.listdir(theirs) == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_socket_directory_writable_by_others_is_refused(
    make_server: Callable[..., Harness], sockdir: str, mode: int
) -> None:
    """The socket's own directory may not be group/world-writable, sticky or not."""
    shared = os.path.join(sockdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, mode)
    with pytest.raises(ControlError, match=rf"directory {shared} is writable by others \(mode"):
        make_server(socket=os.path.join(shared, "c.sock"))
    assert os.listdir(shared) == []


def test_a_symlink_owned_by_another_user_on_the_path_is_refused(
    make_server: Callable[..., Harness], sockdir: str, nobody: pwd.struct_passwd
) -> None:
    """A symlink on the way owned by someone else (who may replace it) is refused."""
    real = os.path.join(sockdir, "real")
    os.mkdir(real, 0o755)
    link = os.path.join(sockdir, "link")
    os.symlink(real, link)
    os.lchown(link, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ControlError, match=rf"symlink {link} is owned by uid {nobody.pw_uid}"):
        make_server(socket=os.path.join(link, "c.sock"))


def test_a_sticky_ancestor_with_our_own_directory_is_fine(
    make_server: Callable[..., Harness],
) -> None:
    """/tmp (sticky, world-writable) above a directory we own is allowed: others cannot
    rename what we own in it."""
    assert stat.S_IMODE(os.stat("/tmp").st_mode) & 0o1002 == 0o1002, "/tmp is not sticky"
    harness = make_server()
    assert call(harness.path, "GET", "/v1/status").status == 200


@pytest.mark.parametrize("planted", ["symlink", "directory"])
def test_a_socket_directory_planted_while_sockd_creates_it_is_refused_untouched(
    make_server: Callable[..., Harness],
    sockdir: str,
    nobody: pwd.struct_passwd,
    monkeypatch: pytest.MonkeyPatch,
    planted: str,
) -> None:
    """When another user puts a symlink (to a root-only directory) or a directory of their
    own at the missing socket directory's path between sockd's check and its mkdir, the
    start is refused and neither the link's target nor their directory changes mode."""
    victim = os.path.join(sockdir, "victim")
    os.mkdir(victim, 0o700)
    missing = os.path.join(sockdir, "made")
    real_mkdir = os.mkdir

    def racing_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.path.basename(os.fsdecode(path)) == "made" and not os.path.lexists(missing):
            if planted == "symlink":
                os.symlink(victim, missing)
                os.lchown(missing, nobody.pw_uid, nobody.pw_gid)
            else:
                real_mkdir(missing, 0o700)
                os.chown(missing, nobody.pw_uid, nobody.pw_gid)
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    with pytest.raises(ControlError, match="refusing to create control socket"):
        make_server(socket=os.path.join(missing, "c.sock"))
    monkeypatch.undo()
    assert os.path.lexists(missing), "the race was not staged"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(missing).st_mode) == 0o700
    assert not os.path.lexists(os.path.join(missing, "c.sock"))


def test_a_missing_socket_directory_is_created_0755_whatever_the_umask(
    make_server: Callable[..., Harness], sockdir: str
) -> None:
    """Missing directories on the socket's path are created, each mode 0755 and ours."""
    nested = os.path.join(sockdir, "a", "b")
    old = os.umask(0o077)
    try:
        harness = make_server(socket=os.path.join(nested, "c.sock"))
    finally:
        os.umask(old)
    for directory in (os.path.join(sockdir, "a"), nested):
        info = os.lstat(directory)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o755
        assert info.st_uid == os.geteuid()
    assert call(harness.path, "GET", "/v1/status").status == 200


def test_reload_never_follows_a_symlink_swapped_in_for_the_socket(
    make_server: Callable[..., Harness], sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the socket path is replaced by a symlink just before the mode/group change of a
    reload, the link's target is left alone."""
    harness = make_server(mode=0o660)
    victim = Path(sockdir) / "victim"
    victim.write_text("root only\n")
    victim.chmod(0o600)
    real_chmod, real_chown = os.chmod, os.chown

    def swap() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(harness.path)
        os.symlink(victim, harness.path)

    def racing_chmod(path: Any, mode: int, **kwargs: Any) -> None:
        swap()
        real_chmod(path, mode, **kwargs)

    def racing_chown(path: Any, uid: int, gid: int, **kwargs: Any) -> None:
        swap()
        real_chown(path, uid, gid, **kwargs)

    monkeypatch.setattr(os, "chmod", racing_chmod)
    monkeypatch.setattr(os, "chown", racing_chown)
    with contextlib.suppress(ControlError):
        harness.server.apply(make_settings(harness.path, mode=0o666))
    monkeypatch.undo()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.read_text() == "root only\n"


def test_the_socket_gets_its_mode_through_a_descriptor(
    make_server: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mode and group are set on the inode sockd created (via /proc/self/fd), never by name."""
    changed: list[str] = []
    real_chmod = os.chmod

    def spying_chmod(path: Any, mode: int, **kwargs: Any) -> None:
        changed.append(str(path))
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(os, "chmod", spying_chmod)
    harness = make_server(mode=0o600)
    harness.server.apply(make_settings(harness.path, mode=0o660))
    socket_changes = [p for p in changed if "/proc/self/fd/" in p or p.endswith(".sock")]
    assert socket_changes and all(p.startswith("/proc/self/fd/") for p in socket_changes)
    assert stat.S_IMODE(os.stat(harness.path).st_mode) == 0o660


@pytest.mark.parametrize("failing", ["chown", "chmod"])
def test_a_rejected_mode_and_group_change_leaves_the_socket_as_it_was(
    make_server: Callable[..., Harness],
    read_gid: int,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """A reload to mode 0660 and a new group whose chown (or chmod, after the chown) fails
    is rejected and leaves the socket exactly as it was: mode 0600, its old group."""
    harness = make_server(mode=0o600)
    before = os.stat(harness.path)
    real = getattr(os, failing)

    def fail_on_change(path: Any, *args: Any, **kwargs: Any) -> None:
        restoring = args in ((stat.S_IMODE(before.st_mode),), (-1, before.st_gid))
        if str(path).startswith("/proc/self/fd/") and not restoring:
            raise PermissionError(1, "Operation not permitted")
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, failing, fail_on_change)
    with pytest.raises(ControlError, match="cannot change control socket"):
        harness.server.apply(make_settings(harness.path, mode=0o660, group=READ_GROUP))
    monkeypatch.undo()
    after = os.stat(harness.path)
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert after.st_gid == before.st_gid != read_gid
    assert call(harness.path, "GET", "/v1/status").status == 200


def test_groups_of_a_reader_are_resolved_once_at_accept(
    make_server: Callable[..., Harness], nobody: pwd.struct_passwd, read_gid: int
) -> None:
    """A reader's role is settled in the accept loop (one /proc read), so its GET is served
    and its POST is a 403 logged with method and path."""
    harness = make_server(mode=0o666, read_group=READ_GROUP)
    raw = build("POST", "/v1/pause").decode("latin-1")
    reader = hold(nobody, [read_gid], harness.path, 1, expect=1, payload=raw)
    reader.release()
    assert reader.report["statuses"] == {"403": 1}
    event = harness.log.wait_for("control.denied")
    assert (event["method"], event["path"], event["uid"]) == ("POST", "/v1/pause", nobody.pw_uid)
    assert harness.backend.called("pause") == []


def test_slots_are_released_after_requests_and_silent_probes(ctl_default: Harness) -> None:
    """A role's slot is given back after each request and after a connect-and-leave probe."""
    for _ in range(5):
        assert exchange(ctl_default.path, build("GET", "/v1/status")).status == 200
    wait_until(lambda: ctl_default.server.active_connections == 0, "slots to be released")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(ctl_default.path)  # connect and leave without a word: no answer due
    wait_until(lambda: ctl_default.server.active_connections == 0, "the probe's slot")
