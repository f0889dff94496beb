"""Built-in handlers called directly over socketpair(): no daemon, no network."""

from __future__ import annotations

import fcntl
import json
import platform
import socket
import termios
import threading
import time
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import structlog

from sockd.connections import Connection, ConnSocket
from sockd.handlers import ActionError, EchoHandler, JSONActionHandler, SockdHandler, action


class Shop(JSONActionHandler):
    """A handler with two actions, one renamed, and a plain method that must stay hidden."""

    stock = {"apple": 3}  # noqa: RUF012  # test fixture data

    @action
    def count(self, request: dict[str, Any]) -> Any:
        item = request.get("item")
        if item not in self.stock:
            raise ActionError("not_found", f"no {item!r}")
        return self.stock[item]

    @action(name="list-items")
    def list_items(self, request: dict[str, Any]) -> Any:
        return sorted(self.stock)

    def restock(self, request: dict[str, Any]) -> Any:
        self.stock["apple"] = 999
        return "restocked"


class Child(Shop):
    """Actions are inherited; a subclass can add its own."""

    @action
    def ping(self, request: dict[str, Any]) -> Any:
        return "pong"


def serve(
    handler_cls: type, options: dict[str, Any] | None = None
) -> tuple[socket.socket, threading.Thread]:
    client, server = socket.socketpair()

    def run() -> None:
        handler = handler_cls.__new__(handler_cls)
        if options is not None:
            handler.options = options
        handler_cls.__init__(handler, server, ("test", 0), None)
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client.settimeout(10)
    return client, thread


@pytest.fixture
def shop() -> Iterator[socket.socket]:
    client, thread = serve(Child, {"max_line_bytes": 100})
    yield client
    client.close()
    thread.join(10)


def ask(sock: socket.socket, raw: bytes) -> dict[str, Any]:
    sock.sendall(raw + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, "server closed the connection"
        buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


def test_action_table_holds_only_marked_methods() -> None:
    """Only @action methods (inherited ones too) are in the dispatch table."""
    assert Child.actions == {"count": "count", "list-items": "list_items", "ping": "ping"}
    assert "restock" not in Shop.actions


def test_dispatch_and_id_echo(shop: socket.socket) -> None:
    """A known action answers ok with its result and echoes the id."""
    assert ask(shop, b'{"action": "count", "item": "apple", "id": "a1"}') == {
        "ok": True,
        "result": 3,
        "id": "a1",
    }
    assert ask(shop, b'{"action": "list-items"}')["result"] == ["apple"]
    assert ask(shop, b'{"action": "ping"}')["result"] == "pong"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b'{"action": "restock"}', "unknown_action"),
        (b'{"action": "__class__"}', "unknown_action"),
        (b'{"action": "list_items"}', "unknown_action"),
        (b'{"action": "nope"}', "unknown_action"),
        (b"{bad json", "bad_json"),
        (b"\xff\xfe\xfd", "bad_json"),
        (b"[" * 100000 + b"]" * 10, "line_too_long"),
        (b"[" * 90 + b"]" * 9, "bad_json"),
        (b'"a string"', "bad_request"),
        (b'{"no_action": 1}', "bad_request"),
        (b'{"action": 5}', "bad_request"),
        (b'{"action": "count", "item": "pear"}', "not_found"),
    ],
)
def test_bad_requests_get_error_and_connection_survives(
    shop: socket.socket, raw: bytes, code: str
) -> None:
    """Every bad request gets its error code, then the connection still works."""
    reply = ask(shop, raw)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert ask(shop, b'{"action": "ping"}')["result"] == "pong"
    assert Shop.stock["apple"] == 3


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    """Nesting deep enough to overflow the parser's recursion is answered as bad_json."""
    client, thread = serve(Child, {"max_line_bytes": 10_000_000})
    try:
        reply = ask(client, b"[" * 200_000 + b"]" * 200_000)
        assert reply["error"]["code"] == "bad_json"
        assert ask(client, b'{"action": "ping"}')["result"] == "pong"
    finally:
        client.close()
        thread.join(10)


def test_huge_integer_is_an_error() -> None:
    """An integer beyond Python's digit limit is refused cleanly."""
    client, thread = serve(Child, {"max_line_bytes": 100_000})
    try:
        reply = ask(client, b'{"action": "ping", "n": ' + b"9" * 5000 + b"}")
        assert reply["error"]["code"] == "bad_json"
    finally:
        client.close()
        thread.join(10)


def test_overlong_line_is_discarded_in_bounded_chunks() -> None:
    """A 5 MB line is refused without the handler ever holding it whole."""
    client, thread = serve(Child, {"max_line_bytes": 1000})
    try:
        sender = threading.Thread(target=lambda: client.sendall(b"x" * 5_000_000 + b"\n"))
        sender.start()
        buf = b""
        while not buf.endswith(b"\n"):
            buf += client.recv(4096)
        sender.join(10)
        assert json.loads(buf)["error"]["code"] == "line_too_long"
        assert ask(client, b'{"action": "ping"}')["result"] == "pong"
    finally:
        client.close()
        thread.join(10)


def test_works_under_bare_socketserver_without_options() -> None:
    """Without sockd (no options injected) the class defaults apply."""
    client, thread = serve(Child, None)
    try:
        assert ask(client, b'{"action": "ping"}')["result"] == "pong"
    finally:
        client.close()
        thread.join(10)


class _Recorder(SockdHandler):
    """Records what it has when ``setup()`` runs; handles nothing."""

    seen: ClassVar[list[tuple[Any, Any, Any]]] = []

    def setup(self) -> None:
        self.seen.append((self.options, self.draining, self.log))

    def handle(self) -> None:
        pass


def test_sockd_equips_the_handler_through_its_own_constructor() -> None:
    """Options, drain flag and logger come from the accepted socket and the listener's hub."""
    ours, theirs = socket.socketpair()
    request = ConnSocket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    conn = Connection(
        1,
        request,
        ("127.0.0.1", 5000),
        "127.0.0.1:9000",
        "127.0.0.1",
        _Recorder,
        {"tag": "x"},
        structlog.get_logger(),
    )
    request.sockd_conn = conn
    listener = types.SimpleNamespace(hub=types.SimpleNamespace(draining=threading.Event()))
    _Recorder.seen.clear()
    try:
        _Recorder(request, ("127.0.0.1", 5000), listener)  # type: ignore[arg-type]
    finally:
        request.close()
        theirs.close()
    [(options, draining, log)] = _Recorder.seen
    assert options is conn.options
    assert draining is listener.hub.draining
    assert log is conn.log


def test_bare_socketserver_handlers_share_no_defaults() -> None:
    """Without sockd each handler has its own empty options and its own unset drain flag."""
    _Recorder.seen.clear()
    for _ in range(2):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            _Recorder(ours, ("test", 0), None)  # type: ignore[arg-type]
    [(options_a, draining_a, _), (options_b, draining_b, _)] = _Recorder.seen
    assert options_a == options_b == {}
    assert options_a is not options_b
    assert draining_a is not draining_b
    assert not draining_a.is_set()


def test_echo_handler_echoes_until_close() -> None:
    """EchoHandler returns every byte and ends when the peer closes."""
    client, thread = serve(EchoHandler)
    for size in (1, 1000, 200_000):
        payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        got = b""
        while len(got) < len(payload):
            got += client.recv(65536)
        sender.join(10)
        assert got == payload
    client.shutdown(socket.SHUT_WR)
    thread.join(10)
    assert not thread.is_alive()
    client.close()


# --------------------------------------------------------------------------- drain


#: The futex system call's number, as /proc/<tid>/syscall shows it.
FUTEX = {"x86_64": "202", "aarch64": "98", "i686": "240", "armv7l": "240"}.get(
    platform.machine(), "unknown"
)


class Drained:
    """A ``Child`` handler on a socketpair with its own drain flag, as sockd sets it."""

    def __init__(self, sent_before: bytes = b"", drained_before: bool = False) -> None:
        """``sent_before``/``drained_before``: already in the socket / already set when the
        handler starts (a connection taken from the listen queue at a stop)."""
        self.draining = threading.Event()
        self.client, self.server = socket.socketpair()
        self.client.settimeout(10)
        self.client.sendall(sent_before)
        if drained_before:
            self.draining.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        handler = Child.__new__(Child)
        handler.options = {}
        handler.draining = self.draining
        Child.__init__(handler, self.server, ("test", 0), None)
        self.server.close()

    def unread(self) -> int:
        """Bytes sent to the handler that it has not read from its socket yet."""
        return int.from_bytes(fcntl.ioctl(self.server, termios.FIONREAD, b"\0" * 4), "little")

    def wait_blocked_on_input(self) -> None:
        """Wait until the handler read everything sent and sleeps in an I/O system call
        (not a lock): it is waiting for the client. Polled: the kernel has no event."""
        task = f"/proc/self/task/{self.thread.native_id}"
        deadline = time.monotonic() + 10
        while True:
            with open(f"{task}/stat") as stat, open(f"{task}/syscall") as syscall:
                state = stat.read().rsplit(")", 1)[1].split()[0]
                number = syscall.read().split()[0]
            if not self.unread() and state == "S" and number not in (FUTEX, "running"):
                return  # futex: a thread waiting for the GIL or a lock, not for input
            assert time.monotonic() < deadline, "the handler never blocked on its socket"
            time.sleep(0.001)  # sleep-ok: polling kernel state that has no event

    def close(self) -> None:
        self.client.close()
        self.thread.join(10)


def test_idle_connection_closes_when_the_drain_begins() -> None:
    """A client idle between requests gets end-of-stream as soon as the drain flag is set."""
    conn = Drained()
    try:
        assert ask(conn.client, b'{"action": "ping"}')["result"] == "pong"
        conn.wait_blocked_on_input()
        began = time.monotonic()
        conn.draining.set()
        assert conn.client.recv(100) == b""
        conn.thread.join(10)
        assert not conn.thread.is_alive()
        assert time.monotonic() - began < 1.0
    finally:
        conn.close()


def test_connection_that_never_sent_closes_when_the_drain_begins() -> None:
    """A client that connected and sent nothing is closed at the drain too."""
    conn = Drained()
    try:
        conn.wait_blocked_on_input()
        conn.draining.set()
        assert conn.client.recv(100) == b""
        conn.thread.join(10)
        assert not conn.thread.is_alive()
    finally:
        conn.close()


def test_request_begun_before_the_drain_is_answered_then_closed() -> None:
    """Half a request line read before the drain: its end still gets the reply, then EOF."""
    conn = Drained()
    try:
        conn.client.sendall(b'{"action": "pi')
        conn.wait_blocked_on_input()  # the handler holds half a line, waiting for the rest
        conn.draining.set()
        assert ask(conn.client, b'ng", "id": 7}') == {"ok": True, "result": "pong", "id": 7}
        assert conn.client.recv(100) == b""
    finally:
        conn.close()


def test_pipelined_requests_are_all_answered_without_a_drain() -> None:
    """Several requests in one segment are answered in order (buffered lines need no wait)."""
    conn = Drained()
    try:
        conn.client.sendall(b'{"action": "ping", "id": 1}\n\n{"action": "ping", "id": 2}\n')
        reader = conn.client.makefile("rb")
        assert [json.loads(reader.readline())["id"] for _ in range(2)] == [1, 2]
        reader.close()
        conn.client.shutdown(socket.SHUT_WR)
        conn.thread.join(10)
        assert not conn.thread.is_alive()
    finally:
        conn.close()


def read_replies(sock: socket.socket) -> list[dict[str, Any]]:
    """Every reply line until the handler closes the connection."""
    reader = sock.makefile("rb")
    replies = [json.loads(line) for line in reader]
    reader.close()
    return replies


def test_request_waiting_when_the_handler_starts_mid_drain_is_answered() -> None:
    """A handler that starts with the drain already begun answers the request its client
    sent while queued, then closes: a request sent is never dropped unanswered."""
    conn = Drained(sent_before=b'{"action": "ping", "id": 1}\n', drained_before=True)
    try:
        assert read_replies(conn.client) == [{"ok": True, "result": "pong", "id": 1}]
    finally:
        conn.close()


def test_every_request_already_sent_at_the_drain_is_answered() -> None:
    """Two pipelined requests waiting when the handler starts mid-drain: both answered in
    order before the connection closes."""
    pipelined = b'{"action": "ping", "id": 1}\n{"action": "ping", "id": 2}\n'
    conn = Drained(sent_before=pipelined, drained_before=True)
    try:
        assert [r["id"] for r in read_replies(conn.client)] == [1, 2]
    finally:
        conn.close()


def test_request_arriving_with_the_drain_is_answered() -> None:
    """A handler idle between requests, woken by the drain with a request also arrived:
    the request is read and answered, not dropped."""
    conn = Drained()
    try:
        conn.wait_blocked_on_input()
        # Let the drain's wake-up and the request arrive together: the handler's wait
        # sees both, or the drain first with the request already pending.
        conn.client.sendall(b'{"action": "ping", "id": 3}\n')
        conn.draining.set()
        assert read_replies(conn.client) == [{"ok": True, "result": "pong", "id": 3}]
    finally:
        conn.close()
