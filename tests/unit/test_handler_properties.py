"""Hostile-input properties of ``JSONActionHandler``, driven directly over ``socketpair()``.

Each example opens one connection to a small handler subclass, sends a batch of hostile
lines (invalid UTF-8, deep nesting, huge numbers, non-object JSON, NULs, CRs, lines over
``max_line_bytes``) followed by a valid ``ping``, and checks the replies against a model
of the documented protocol: one reply line per non-blank request line, in order, each a
JSON object with ``ok`` and a documented error code, and the connection still usable.
Hypothesis runs derandomized without an example database, so CI is reproducible; set
``SOCKD_FUZZ_SCALE`` (a multiplier of the example counts) for a longer local run
and ``SOCKD_FUZZ_RANDOM=1`` to explore beyond the fixed examples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sockd.handlers import JSONActionHandler, action

SCALE = float(os.environ.get("SOCKD_FUZZ_SCALE", "1"))
PROPERTIES = settings(
    # Reproducible by default; SOCKD_FUZZ_RANDOM=1 explores new examples (a failure prints
    # a @reproduce_failure blob to pin it).
    derandomize=not os.environ.get("SOCKD_FUZZ_RANDOM"),
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEADLINE = 10.0
ERROR_CODES = frozenset({"bad_json", "bad_request", "unknown_action", "line_too_long"})
SMALL_LIMIT = 256
BIG_LIMIT = 1_000_000


def examples(n: int) -> settings:
    return settings(PROPERTIES, max_examples=max(1, int(n * SCALE)))


class Probe(JSONActionHandler):
    """Two harmless actions: ``ping`` and ``echo`` (returns the request's ``value``)."""

    @action
    def ping(self, request: dict[str, Any]) -> Any:
        return "pong"

    @action
    def echo(self, request: dict[str, Any]) -> Any:
        return request.get("value")

    def helper(self, request: dict[str, Any]) -> Any:  # not an action: must stay unreachable
        raise AssertionError("a plain method was dispatched")


ACTIONS = frozenset({"ping", "echo"})


@dataclass
class Connection:
    """The client end of a socketpair whose other end a ``Probe`` handler is serving."""

    sock: socket.socket
    reader: Any
    thread: threading.Thread
    errors: list[BaseException]

    def send_in_background(self, data: bytes) -> threading.Thread:
        """Send from another thread, so large requests and large replies cannot deadlock."""

        def send() -> None:
            with contextlib.suppress(OSError):  # the test already failed and closed the socket
                self.sock.sendall(data)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        return sender

    def reply(self) -> bytes:
        line: bytes = self.reader.readline()
        assert line.endswith(b"\n"), f"connection ended or reply unterminated: {line[:200]!r}"
        return line

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "the handler did not end when the client closed"
        # A reply written after the client hung up (a failed check closes early) is no bug.
        unexpected = [e for e in self.errors if not isinstance(e, ConnectionError)]
        assert unexpected == [], f"the handler raised: {unexpected!r}"


def serve(max_line_bytes: int) -> Connection:
    """Run ``Probe`` on one end of a socketpair in a thread, as sockd's server would."""
    client, server = socket.socketpair()
    errors: list[BaseException] = []

    no_server: Any = None  # the handler never looks at self.server

    def run() -> None:
        handler = Probe.__new__(Probe)
        handler.options = {"max_line_bytes": max_line_bytes}
        try:
            Probe.__init__(handler, server, ("test", 0), no_server)
        except BaseException as exc:  # reported by Connection.close()
            errors.append(exc)
        finally:
            server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client.settimeout(DEADLINE)
    return Connection(client, client.makefile("rb"), thread, errors)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Expected:
    """The modelled reply to one line: ``code`` is "ok" or an error code."""

    code: str
    request: Any = None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_out_of_range(text: str) -> float:
    """A number literal beyond a double (1e999 would parse as inf) is not a usable request."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def expected_reply(line: bytes, limit: int) -> Expected | None:
    """What the documented protocol answers to one request line (sent without its newline).

    ``None`` for a blank line: no reply at all.
    """
    if len(line) > limit:
        return Expected("line_too_long")
    if not line.strip():
        return None
    try:  # the newline matters to json's UTF-16/32 detection
        request = json.loads(
            line + b"\n", parse_constant=_refuse_constant, parse_float=_refuse_out_of_range
        )
    except (ValueError, RecursionError):
        return Expected("bad_json")
    if not isinstance(request, dict):
        return Expected("bad_request")
    name = request.get("action")
    if not isinstance(name, str):
        code = "bad_request"
    elif name not in ACTIONS:
        code = "unknown_action"
    else:
        code = "ok"
    return Expected(code, request)


def canonical(value: Any) -> str:
    """Compare JSON values by their serialisation."""
    return json.dumps(value, sort_keys=True, default=str)


def check_reply(raw: bytes, line: bytes, expected: Expected) -> None:
    reply = json.loads(raw, parse_constant=_refuse_constant)  # replies are strict JSON
    assert isinstance(reply, dict), raw[:200]
    context = (line[:200], raw[:300])
    request = expected.request
    if expected.code == "ok":
        assert reply.get("ok") is True, context
        assert set(reply) <= {"ok", "result", "id"}
        want = "pong" if request["action"] == "ping" else request.get("value")
        assert canonical(reply["result"]) == canonical(want)
    else:
        assert reply.get("ok") is False, context
        assert set(reply) <= {"ok", "error", "id"}
        error = reply["error"]
        assert error["code"] in ERROR_CODES, context
        assert error["code"] == expected.code, context
        assert isinstance(error["message"], str) and error["message"]
        assert "Traceback" not in error["message"]
    if isinstance(request, dict) and request.get("id") is not None:
        assert canonical(reply.get("id")) == canonical(request["id"])
    else:
        assert "id" not in reply


def exchange(connection: Connection, lines: list[bytes], limit: int) -> None:
    """Send ``lines`` then a ping; every line gets its modelled reply, then the ping answers."""
    expected = [(line, expected_reply(line, limit)) for line in lines]
    payload = b"".join(line + b"\n" for line in lines) + b'{"action": "ping", "id": "last"}\n'
    sender = connection.send_in_background(payload)
    for line, want in expected:
        if want is not None:
            check_reply(connection.reply(), line, want)
    assert json.loads(connection.reply()) == {"ok": True, "result": "pong", "id": "last"}
    sender.join(DEADLINE)
    assert not sender.is_alive()


# --------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # json.dumps writes NaN/Infinity, which the handler must refuse
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
action_names = st.one_of(
    st.sampled_from(["ping", "echo"]),
    st.sampled_from(
        [
            "helper",
            "handle",
            "setup",
            "dispatch_line",
            "reply",
            "__init__",
            "__class__",
            "actions",
            "PING",
            "ping ",
            "",
        ]
    ),
    st.text(max_size=10),
    json_values,
)


@st.composite
def request_objects(draw: st.DrawFn) -> bytes:
    """A JSON object, usually with an action, an id and a value, serialised in varied ways."""
    request: dict[str, Any] = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    if draw(st.integers(0, 3)):
        request["action"] = draw(action_names)
    if draw(st.booleans()):
        request["id"] = draw(json_values)
    if draw(st.booleans()):
        request["value"] = draw(json_values)
    text = json.dumps(
        request, ensure_ascii=draw(st.booleans()), indent=draw(st.none() | st.just(0))
    )
    return text.replace("\n", " ").encode()


def splice(data: bytes, position: int, insert: bytes) -> bytes:
    at = position % (len(data) + 1)
    return data[:at] + insert + data[at:]


#: Nesting depths clear of the interpreter's recursion limit (~1000), where whether the
#: parser or the encoder gives up first depends on the stack depth of the calling thread.
deep = st.integers(1, 800) | st.integers(1_200, 150_000)
digits = st.integers(1, 12_000)
shapes: list[st.SearchStrategy[bytes]] = [
    request_objects(),
    request_objects(),
    request_objects(),
    json_values.map(lambda v: json.dumps(v).encode()),  # non-object JSON
    st.binary(max_size=300),
    st.builds(
        splice,
        request_objects(),
        st.integers(0, 10**6),
        st.sampled_from(
            [b"\x00", b"\r", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\t"]
        ),
    ),
    st.one_of(
        deep.map(lambda n: b"[" * n + b"]" * n),
        deep.map(lambda n: b"[" * n),
        deep.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        deep.map(lambda n: b'{"action": "echo", "value": ' + b"[" * n + b"]" * n + b"}"),
    ),
    st.one_of(
        digits.map(lambda n: b"1" * n),
        digits.map(lambda n: b'{"action": "echo", "value": ' + b"9" * n + b"}"),
        digits.map(lambda n: b'{"action": "echo", "id": -' + b"9" * n + b"}"),
        digits.map(lambda n: b'{"action": "echo", "value": 1.' + b"5" * n + b"}"),
        digits.map(lambda n: b'{"action": "echo", "value": 1e' + b"9" * n + b"}"),
    ),
    st.sampled_from(
        [
            b'{"action": "ping"}\r',
            b'\r{"action": "ping"}',
            b'{"action": "ping"}\x00',
            b'{"action": "pi\x00ng"}',
            b'{"action": "ping", "id": "\xff"}',
            b'{"action": "ping", "id": "\\ud800"}',
            b'{"action": "echo", "value": NaN}',
            b'{"action": "echo", "value": -Infinity}',
            b'{"action": "ping", "action": 5}',
            b'{"action": 5, "action": "ping"}',
            b"\xfe\xff\x00{\x00}",
            b"\xff\xfe{\x00}\x00",
            b"{" * 200,
            b'"\\',
            b"   ",
            b"\r",
            b"\x0b\x0c",
            b"",
        ]
    ),
    st.one_of(  # around the small limit
        st.integers(1, 3 * SMALL_LIMIT).map(lambda n: b"x" * n),
        st.integers(0, 40).map(
            lambda n: b'{"action": "ping", "pad": "' + b"p" * (SMALL_LIMIT - 31 + n) + b'"}'
        ),
    ),
]
#: One line, never containing a newline (a newline would make it two lines).
hostile_lines = (
    st.sampled_from(shapes).flatmap(lambda shape: shape).map(lambda line: line.replace(b"\n", b""))
)


# --------------------------------------------------------------------------- tests


@settings(examples(250))
@example(lines=[b"\xff\xfe\xfd", b"[" * 300, b'{"action": "ping"', b"9" * 5000], limit=SMALL_LIMIT)
@example(
    lines=[b"x" * 257, b"x" * 256, b'{"action": "echo", "value": "' + b"v" * 230 + b'"}'],
    limit=SMALL_LIMIT,
)
@example(
    lines=[b"[" * 200_000 + b"]" * 200_000, b'{"action": "echo", "value": ' + b"1" * 5000 + b"}"],
    limit=BIG_LIMIT,
)
@given(
    lines=st.lists(hostile_lines, min_size=1, max_size=6),
    limit=st.sampled_from([SMALL_LIMIT, BIG_LIMIT]),
)
def test_every_line_gets_one_documented_reply_and_the_connection_survives(
    lines: list[bytes], limit: int
) -> None:
    """Each non-blank line gets one JSON reply with a documented code; a ping still answers."""
    connection = serve(limit)
    try:
        exchange(connection, lines, limit)
    finally:
        connection.close()


@settings(examples(60))
@given(batches=st.lists(st.lists(hostile_lines, min_size=1, max_size=4), min_size=2, max_size=4))
def test_hostile_batches_on_one_connection_never_desynchronise(batches: list[list[bytes]]) -> None:
    """Batch after batch on one long-lived connection, replies stay in step with requests."""
    connection = serve(SMALL_LIMIT)
    try:
        for lines in batches:
            exchange(connection, lines, SMALL_LIMIT)
    finally:
        connection.close()


@pytest.mark.parametrize("limit", [SMALL_LIMIT, 65536])
def test_fifty_megabyte_line_is_refused_in_bounded_memory(limit: int) -> None:
    """A 50 MB line gets line_too_long while the process's traced peak stays far below its size."""
    size = 50 * 1024 * 1024
    chunk = b"x" * (1024 * 1024)
    connection = serve(limit)
    try:
        tracemalloc.start()
        try:

            def send() -> None:
                for _ in range(size // len(chunk)):
                    connection.sock.sendall(chunk)
                connection.sock.sendall(b'\n{"action": "ping"}\n')

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            first = json.loads(connection.reply())
            second = json.loads(connection.reply())
            sender.join(DEADLINE)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert first["ok"] is False
        assert first["error"]["code"] == "line_too_long"
        assert second == {"ok": True, "result": "pong"}
        assert peak < 5 * 1024 * 1024, f"peak traced memory {peak} bytes for a {size}-byte line"
    finally:
        connection.close()


def test_plain_methods_are_never_dispatched() -> None:
    """A method without @action is unknown_action even though it exists on the class."""
    connection = serve(SMALL_LIMIT)
    try:
        connection.sock.sendall(b'{"action": "helper", "id": 1}\n')
        reply = json.loads(connection.reply())
        assert reply["error"]["code"] == "unknown_action"
        assert reply["id"] == 1
    finally:
        connection.close()


@pytest.mark.parametrize(
    "line",
    [
        b'{"action": "echo", "value": 1e400}',
        b'{"action": "ping", "id": -1e999}',
        b'{"action": "echo", "value": NaN}',
    ],
)
def test_replies_are_strict_json(line: bytes) -> None:
    """Every reply is RFC 8259 JSON: no NaN or Infinity tokens, whatever the request held."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    connection = serve(SMALL_LIMIT)
    try:
        connection.sock.sendall(line + b"\n")
        json.loads(connection.reply(), parse_constant=refuse)
    finally:
        connection.close()


@pytest.mark.parametrize(
    "line",
    [
        b'{"action": "ping", "id": 1e999}',
        b'{"action": "nope", "id": -1e400}',
        b'{"action": "echo", "value": [1e309], "id": 7}',
    ],
)
def test_out_of_range_numbers_are_a_client_error(line: bytes) -> None:
    """A number beyond a double is refused as a client error, not answered as internal."""
    connection = serve(SMALL_LIMIT)
    try:
        connection.sock.sendall(line + b"\n")
        reply = json.loads(connection.reply())
        assert reply["ok"] is False
        assert reply["error"]["code"] in {"bad_json", "bad_request"}, reply
    finally:
        connection.close()
