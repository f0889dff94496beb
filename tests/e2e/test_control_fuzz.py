"""Hostile input on the real daemon's control socket: always an HTTP answer, no 5xx, no hang.

Requests are raw bytes on a real ``AF_UNIX`` connection. Most are built from a valid
request (every endpoint that does not change the daemon's lifecycle) plus mutations
that each must make it fail (unknown paths, wrong methods, bad versions, garbage or
huge headers, duplicated/negative/non-numeric Content-Length, chunked bodies, bodies of
wrong JSON types, truncated bodies), so the expected status class (2xx or 4xx) is
known; others are token soup and random bytes, for which 2xx or 4xx are both fine.
``POST /v1/stop`` and ``POST /v1/reload`` are only ever sent with bodies that must be
refused; their accepted forms are exercised in a separate targeted test.

One daemon serves each test (started in the test body, not per example). Hypothesis
runs derandomized without an example database, so CI is reproducible; set
``SOCKD_FUZZ_SCALE`` (a multiplier of the example counts) for a longer local run
and ``SOCKD_FUZZ_RANDOM=1`` to explore beyond the fixed examples.

Inputs that once got a 500 (numbers past Python's 4300-digit ``int()`` limit, bodies
nested past the recursion limit, a stop timeout beyond a float, an unbalanced IPv6
authority, versions like ``HTTP/-1.1``) are in the general fuzz and also pinned by the
regression tests at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import base_config, connect, recv_exactly

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
REQUEST_TIMEOUT = 1.0
#: An answer must be complete within this; anything slower is a hang.
ANSWER_DEADLINE = REQUEST_TIMEOUT + 5.0
#: docs/control-api.md: every error code and the status it comes with.
STATUS_OF = {
    "bad_request": 400,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "timeout": 408,
    "conflict": 409,
    "length_required": 411,
    "payload_too_large": 413,
    "invalid_config": 422,
    "unavailable": 503,
    "internal": 500,
}
ROUTES: dict[str, frozenset[str]] = {
    "/v1/status": frozenset({"GET"}),
    "/v1/connections": frozenset({"GET"}),
    "/v1/config": frozenset({"GET"}),
    "/v1/reload": frozenset({"POST"}),
    "/v1/stop": frozenset({"POST"}),
    "/v1/pause": frozenset({"POST"}),
    "/v1/resume": frozenset({"POST"}),
    "/v1/log-level": frozenset({"PUT"}),
    "/v1/reopen-logs": frozenset({"POST"}),
    "/v1/logs": frozenset({"GET"}),
    "/metrics": frozenset({"GET"}),
}
CONNECTION_PREFIX = "/v1/connections/"
LIFECYCLE = ("/v1/stop", "/v1/reload")
#: Digit counts, with extra weight around Python's int() limit (4300 digits).
DIGIT_COUNTS = st.integers(1, 6000) | st.integers(4290, 4310)
#: Levels the fuzz may set: control.error (our 5xx witness in the log) stays visible.
FUZZ_LEVELS = ("debug", "info", "warning", "error")
MAX_BODY = 64 * 1024


def examples(n: int) -> settings:
    return settings(PROPERTIES, max_examples=max(1, int(n * SCALE)))


# --------------------------------------------------------------------------- wire


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None


def parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3}) ?.*", lines[0])
    assert match, f"not an HTTP status line: {lines[0]!r}"
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep, f"malformed response header: {line!r}"
        headers.append((name, value.strip()))
    return int(match.group(1)), headers


def exchange(path: str, raw: bytes, half_close: bool = True) -> Answer | None:
    """Send ``raw``, then read one complete answer (skipping 1xx); None if none came at all.

    A log stream (``application/x-ndjson``) may never end (``follow=1``): its head is enough.
    """
    deadline = time.monotonic() + ANSWER_DEADLINE
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_DEADLINE)
        sock.connect(path)
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed before taking everything: read the answer
        data = b""
        interim: list[int] = []
        eof = False

        def more() -> None:
            nonlocal data, eof
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no complete answer within {ANSWER_DEADLINE}s: {data[:300]!r}"
                )
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(
                    f"no complete answer within {ANSWER_DEADLINE}s: {data[:300]!r}"
                ) from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                eof = True
            data += chunk

        while True:
            while not (end := re.search(b"\r\n\r\n", data)):
                if eof:
                    assert not data, f"the answer ended inside its head: {data[:300]!r}"
                    return None
                more()
            status, headers = parse_head(data[: end.start()])
            data = data[end.end() :]
            if 100 <= status < 200:
                interim.append(status)
                continue
            answer = Answer(status, headers, b"", interim)
            if (answer.header("Content-Type") or "").startswith("application/x-ndjson"):
                return answer
            length = answer.header("Content-Length")
            assert length is not None and length.isdigit(), f"no Content-Length: {headers!r}"
            while len(data) < int(length) and not eof:
                more()
            assert len(data) >= int(length), f"body cut short: {len(data)} of {length}"
            answer.body = data[: int(length)]
            return answer


def check_answer(raw: bytes, answer: Answer | None, expect: str) -> None:
    """The properties every answer has, and the status class the request called for."""
    if answer is None:
        assert raw == b"", f"no answer at all to {raw[:300]!r}"
        return
    assert 200 <= answer.status < 300 or 400 <= answer.status < 500, (
        f"status {answer.status} for {raw[:300]!r}: {answer.body[:300]!r}"
    )
    assert answer.header("X-Sockd-Api-Version") == "1"
    assert set(answer.interim) <= {100}
    if expect == "2xx":
        assert 200 <= answer.status < 300, f"{raw[:300]!r} -> {answer.status} {answer.body!r}"
    elif expect == "4xx":
        assert 400 <= answer.status < 500, f"{raw[:300]!r} -> {answer.status} {answer.body!r}"
    content_type = answer.header("Content-Type") or ""
    if answer.status >= 400:
        assert content_type == "application/json"
        text = answer.body.decode("utf-8")
        assert "Traceback" not in text and 'File "' not in text
        body = json.loads(text)
        assert set(body) == {"error"}, body
        error = body["error"]
        assert {"code", "message"} <= set(error) <= {"code", "message", "details"}, error
        assert STATUS_OF.get(error["code"]) == answer.status, (answer.status, error)
        assert isinstance(error["message"], str) and error["message"].strip()
    elif content_type == "application/json":
        assert isinstance(json.loads(answer.body), dict)


# --------------------------------------------------------------------------- the oracle


def json_body(body: bytes) -> dict[str, Any] | None:
    """The request body as the API reads it (empty is {}), or None if it must be refused."""
    if not body.strip():
        return {}

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def body_accepted(path: str, body: bytes) -> bool:
    """Whether the endpoint at ``path`` accepts ``body`` (docs/control-api.md)."""
    value = json_body(body)
    if value is None:
        return False
    if path in ("/v1/status", "/v1/connections", "/v1/config", "/v1/logs", "/metrics"):
        return True  # a GET's body is read and must be JSON, but its fields are not used
    if path == "/v1/log-level":
        return set(value) == {"level"} and value["level"] in (
            "debug",
            "info",
            "warning",
            "error",
            "critical",
        )
    if path == "/v1/stop":
        timeout = value.get("timeout")
        if isinstance(timeout, int) and not isinstance(timeout, bool):
            try:
                timeout = float(timeout)
            except OverflowError:
                timeout = math.inf
        number = isinstance(timeout, float)
        return set(value) <= {"timeout"} and (
            timeout is None or (number and math.isfinite(timeout) and 0 <= timeout <= 86400)
        )
    if path == "/v1/reload":
        return set(value) <= {"dry_run"} and isinstance(value.get("dry_run", False), bool)
    return value == {}


def routed(target: bytes) -> bool:
    """Whether the daemon would route ``target`` to an endpoint (query and fragment aside)."""
    try:
        path = urlsplit(target.decode("latin-1")).path
    except ValueError:
        return False
    return path in ROUTES or path.startswith(CONNECTION_PREFIX)


def lifecycle_safe(raw: bytes) -> bool:
    """Soup and random bytes must never name an endpoint that stops or reloads the daemon."""
    return not any(path.encode() in raw for path in LIFECYCLE)


# --------------------------------------------------------------------------- structured requests


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes = b"HTTP/1.1"
    headers: list[bytes] = field(default_factory=list)
    body: bytes = b""
    #: None: the right one (if there is a body; always for POST, PUT and DELETE, which
    #: must send Content-Length: 0 for no body)
    content_length: list[bytes] | None = None
    length_twice: bool = False  # the right Content-Length, sent twice (allowed)
    eol: bytes = b"\r\n"
    trailing: bytes = b""  # after the body: never read, so harmless
    broken: list[str] = field(default_factory=list)  # mutations that must make it fail

    def raw(self) -> bytes:
        lines = [self.method + b" " + self.target + b" " + self.version, *self.headers]
        lengths = self.content_length
        if lengths is None:
            lengths = [str(len(self.body)).encode()] * (2 if self.length_twice else 1)
            needed = self.body or self.method in (b"POST", b"PUT", b"DELETE")
            lengths = lengths if needed else []
        lines.extend(b"Content-Length: " + v for v in lengths)
        return self.eol.join(lines) + self.eol + self.eol + self.body + self.trailing


no_fields = st.sampled_from([b"", b"{}", b" { } ", b"\n", b"\t{}\r\n"])
get_bodies = st.one_of(
    st.just(b""),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=2).map(
        lambda d: json.dumps(d).encode()
    ),
)
logs_queries = st.builds(
    lambda n, level, follow, order: "&".join(
        [f"n={n}", f"level={level}", f"follow={follow}"][i] for i in order if i is not None
    ),
    st.integers(0, 50),
    st.sampled_from(["debug", "info", "warning", "error", "critical", "%69nfo"]),
    st.sampled_from(["0", "false", "FALSE"]),
    st.lists(st.sampled_from([0, 1, 2]), unique=True, max_size=3),
)


@st.composite
def valid_requests(draw: st.DrawFn) -> Request:
    """A request every part of which the API accepts, for an endpoint that keeps the daemon up."""
    kind = draw(
        st.sampled_from(
            [
                "status",
                "connections",
                "config",
                "metrics",
                "logs",
                "level",
                "reopen",
                "resume",
                "pause",
            ]
        )
    )
    if kind in ("status", "connections", "config", "metrics"):
        target = "/metrics" if kind == "metrics" else f"/v1/{kind}"
        return Request(b"GET", target.encode(), body=draw(get_bodies))
    if kind == "logs":
        query = draw(logs_queries)
        return Request(b"GET", f"/v1/logs?{query}".encode() if query else b"/v1/logs")
    if kind == "level":
        level = draw(st.sampled_from(FUZZ_LEVELS))
        body = json.dumps({"level": level}, indent=draw(st.none() | st.just(1))).encode()
        return Request(b"PUT", b"/v1/log-level", body=body)
    target = {"reopen": "/v1/reopen-logs", "resume": "/v1/resume", "pause": "/v1/pause"}[kind]
    return Request(b"POST", target.encode(), body=draw(no_fields))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)


def dumps_any(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity included: the API must refuse them


wrong_bodies = st.one_of(
    json_values.map(dumps_any),
    st.dictionaries(
        st.sampled_from(["level", "timeout", "x", "Level", ""]), json_values, max_size=3
    ).map(dumps_any),
    st.builds(lambda t: dumps_any({"timeout": t}), json_values),
    st.builds(lambda lv: dumps_any({"level": lv}), json_values),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"{",
            b"null",
            b"[]",
            b'"{}"',
            b"{}{}",
            b'{"timeout": NaN}',
            b'{"timeout": Infinity}',
            b'{"timeout": -1}',
            b'{"timeout": true}',
            b'{"timeout": "5"}',
            b'{"timeout": 5, "timeout": "x"}',
            b'{"level": "DEBUG"}',
            b'{"level": "debug", "extra": 1}',
            b'{"level": ["debug"]}',
            b"\xff\xfe{}",
            b"\xef\xbb\xbf{}",
            b'{"level": "debug"}\x00',
            b"[" * 400,
        ]
    ),
    st.integers(300, 400).map(lambda k: b'{"timeout": 1' + b"0" * k + b"}"),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
)
safe_path_bytes = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if not chr(c).isspace() and c not in (0x0A, 0x0D))
)
unknown_targets = st.one_of(
    st.sampled_from(
        [
            b"/",
            b"*",
            b"/v1",
            b"/v1/",
            b"/v2/status",
            b"/v1/status/",
            b"/v1/STATUS",
            b"/v1/status%00",
            b"/v1/%73tatus",
            b"/v1/../v1/status",
            b"/v1/status/..",
            b"/v1/./status",
            b"//v1/status",
            b"/metrics/",
            b"/v1/connections/1/2",
            b"/v1/connections/{id}",
            b"/v1/connections/%31",
            b"/v1/connections/-1",
            b"/v1/connections/\xd9\xa3",
            b"/v1/logs/",
            b"v1/status",
            b"http:/v1/status",
            b"/%2e%2e/%2e%2e/etc/passwd",
            b"/../../../../etc/passwd",
            b"/v1/log-level%00",
            b"/\x00",
            b"/\xff\xfe",
            b"http://localhost/v1/nope",
            b"http://[::1]/v1/nope",
            b"http://[::1/v1/status",
            b"http://::1]/v1/status",
            b"unix:/v1/nope",
        ]
    ),
    st.builds(
        lambda n, c: b"/" + c * n,
        st.integers(1, 10_000),
        st.sampled_from([b"a", b"%", b"../", b"/"]),
    ),
    st.builds(lambda p: b"/v1/" + p, safe_path_bytes),
    safe_path_bytes.map(lambda p: b"/" + p),
).filter(lambda t: not routed(t))
bad_methods = st.one_of(
    st.sampled_from(
        [
            b"GET",
            b"POST",
            b"PUT",
            b"DELETE",
            b"PATCH",
            b"HEAD",
            b"OPTIONS",
            b"TRACE",
            b"CONNECT",
            b"get",
            b"Post",
            b"BREW",
            b"M-SEARCH",
        ]
    ),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_-", min_size=1, max_size=12).map(str.encode),
)
bad_versions = st.sampled_from(
    [
        b"HTTP/2.0",
        b"HTTP/3",
        b"HTTP/1",
        b"http/1.1",
        b"HTTP/1.1x",
        b"HTTP/a.b",
        b"HTTP/1.1.1",
        b"HTTP/",
        b"HTTP/0.9",
        b"HTTX/1.1",
        b"HTTP/12345678901.1",
        b"HTTP/0.8",
        # int() would take these (some Pythons' http.server accepted them): not DIGIT.DIGIT
        b"HTTP/-1.1",
        b"HTTP/+1.1",
        b"HTTP/1.-1",
        b"HTTP/0_1.1",
    ]
)
benign_versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])
benign_headers = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"Host: localhost",
                b"Host:",
                b"User-Agent: sockd-fuzz/1",
                b"Accept: */*",
                b"Connection: keep-alive",
                b"Content-Type: application/json",
                b"X-Empty:",
                b"X-Spaces:    padded   ",
                b"Cookie: a=b; c=d",
            ]
        ),
        st.binary(max_size=60).map(
            lambda v: b"X-Fuzz: " + bytes(c for c in v if c not in (0, 0x0A, 0x0D)).strip()
        ),
    ),
    max_size=4,
)
garbage_headers = st.one_of(
    st.sampled_from(
        [
            b"garbage-without-colon",
            b"Bad Name: x",
            b"X-Null: a\x00b",
            b" folded-continuation",
            b"\tfolded-continuation",
            b"X-\x7f: y",
            b"X-\xe9: y",
            b": no-name",
            b"X(): y",
        ]
    ),
    st.integers(101, 300).map(lambda n: b"\r\n".join([b"X-Many: 1"] * n)),
    st.integers(33 * 1024, 60 * 1024).map(lambda n: b"X-Huge: " + b"h" * n),
)
bad_lengths = st.one_of(
    st.sampled_from(
        [
            [b"-1"],
            [b"-0"],
            [b"abc"],
            [b"1e3"],
            [b"0x10"],
            [b"+5"],
            [b"5 5"],
            [b""],
            [b"\xd9\xa3"],
            [b"1.0"],
        ]
    ),
    st.tuples(st.integers(0, 100), st.integers(101, 200)).map(
        lambda t: [str(t[0]).encode(), str(t[1]).encode()]
    ),
    st.integers(MAX_BODY + 1, 10**30).map(lambda n: [str(n).encode()]),
    DIGIT_COUNTS.map(lambda n: [b"9" * max(n, 6)]),
)
bad_queries = st.one_of(
    st.sampled_from(
        [
            "n=-1",
            "n=abc",
            "n=1.5",
            "n=100001",
            "n=%EF%BC%91",
            "n=",
            "level=LOUD",
            "level=",
            "level=info%00",
            "follow=2",
            "follow=yes",
            "n=1&n=1",
            "unknown=1",
            "N=1",
        ]
    ),
    st.integers(6, 6000).map(lambda n: "n=" + "0" * n + "100001"),
    DIGIT_COUNTS.map(lambda n: "n=" + "9" * n),
)


@st.composite
def structured_requests(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """(raw bytes, expected status class, label): a valid request, maybe with breaking mutations."""
    base = draw(st.sampled_from(["valid", "valid", "valid", "stop", "reload", "delete"]))
    if base == "valid":
        request = draw(valid_requests())
    elif base == "delete":
        conn_id = draw(
            st.integers(0, 10**12).map(str)
            | st.text(max_size=6)
            | DIGIT_COUNTS.map(lambda n: "9" * n)
        )
        request = Request(b"DELETE", b"/v1/connections/" + conn_id.encode())
        request.broken.append("no such connection")  # nothing is connected while we fuzz
    else:  # stop or reload: only ever with a body that must be refused
        request = Request(b"POST", f"/v1/{base}".encode(), body=draw(wrong_bodies))
        if body_accepted(f"/v1/{base}", request.body):
            request.body = b'{"unexpected": "field"}'
        request.broken.append("wrong body")
    path = urlsplit(request.target.decode("latin-1")).path
    request.version = draw(benign_versions)
    request.headers = draw(benign_headers)
    if request.body and draw(st.booleans()):
        request.headers.append(b"Expect: 100-continue")
    if request.body and draw(st.booleans()):
        request.length_twice = True
    request.eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    lifecycle = base in ("stop", "reload")
    mutations = draw(
        st.lists(
            st.sampled_from(
                [
                    "path",
                    "method",
                    "version",
                    "header",
                    "length",
                    "chunked",
                    "body",
                    "short",
                    "extra",
                    "query",
                ]
            ),
            unique=True,
            min_size=1,
            max_size=2,
        )
        if draw(st.booleans())
        else st.just([])
    )
    for mutation in mutations:
        if mutation == "path":
            request.target = draw(unknown_targets)
        elif mutation == "method":
            method = draw(bad_methods)
            if method.decode("latin-1") in ROUTES.get(path, frozenset()):
                continue
            request.method = method
        elif mutation == "version":
            request.version = draw(bad_versions)
        elif mutation == "header":
            at = draw(st.integers(0, len(request.headers)))
            request.headers.insert(at, draw(garbage_headers))
        elif mutation == "length":
            request.content_length = draw(bad_lengths)
        elif mutation == "chunked":
            name = draw(st.sampled_from([b"Transfer-Encoding", b"transfer-encoding"]))
            value = draw(st.sampled_from([b"chunked", b"gzip, chunked", b"identity", b""]))
            request.headers.append(name + b": " + value)
            request.content_length = draw(st.sampled_from([[], None]))
            request.body = draw(
                st.sampled_from(
                    [
                        b"zz\r\n{}\r\n0\r\n\r\n",
                        b"2\r\n{}\r\n0\r\n\r\n",
                        b"-1\r\n",
                        b"ffffffffffffffff\r\n",
                        b"2\r\n{}",
                    ]
                )
            )
        elif mutation == "body":
            if path not in ROUTES or lifecycle:
                continue
            body = draw(wrong_bodies)
            if body_accepted(path, body):
                continue
            request.body = body
        elif mutation == "short":  # announce more than is sent, then half-close
            request.content_length = [str(len(request.body) + draw(st.integers(1, 1000))).encode()]
        elif mutation == "query":
            if path != "/v1/logs":
                continue
            # Each bad query is refused on its own and next to good parameters (a repeated
            # parameter is refused too).
            good = urlsplit(request.target.decode()).query
            query = draw(bad_queries)
            request.target = b"/v1/logs?" + "&".join(q for q in (good, query) if q).encode()
        elif mutation == "extra":  # bytes after a complete request are never read
            if "short" not in mutations:  # ... unless a short body would take them
                request.trailing = draw(st.binary(min_size=1, max_size=100))
            continue
        request.broken.append(mutation)
    if request.method in (b"POST", b"PUT", b"DELETE") and request.content_length == []:
        # No Content-Length at all (the chunked mutation's []): 411, body or not.
        request.broken.append("no-length")
    expect = "4xx" if request.broken else "2xx"
    label = f"{base}:{'+'.join(request.broken) or 'ok'}"
    return request.raw(), expect, label


token_soup = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"GET",
                b"POST",
                b"PUT",
                b"DELETE",
                b"PATCH",
                b"/v1/status",
                b"/v1/logs?follow=1",
                b"/v1/logs?n=5",
                b"/v1/log-level",
                b"/v1/pause",
                b"/v1/resume",
                b"/v1/connections/7",
                b"/metrics",
                b"HTTP/1.1",
                b"HTTP/1.0",
                b" ",
                b"  ",
                b"\t",
                b"\r\n",
                b"\n",
                b"\r",
                b"\r\n\r\n",
                b":",
                b"Content-Length: 2",
                b"Content-Length: 99",
                b"Content-Length: -4",
                b"Transfer-Encoding: chunked",
                b"Expect: 100-continue",
                b"{}",
                b'{"level": "info"}',
                b"\x00",
                b"\xff",
                b"%00",
                b"..",
                b"?",
                b"#",
                b"&",
                b"=",
            ]
        ),
        st.binary(max_size=8),
    ),
    max_size=25,
).map(b"".join)


@st.composite
def random_requests(draw: st.DrawFn) -> tuple[bytes, str, str]:
    """Mostly structured requests (their status class is known), some soup and raw bytes."""
    kind = draw(st.sampled_from(["structured"] * 6 + ["soup"] * 2 + ["bytes"]))
    if kind == "structured":
        return draw(structured_requests())
    if kind == "soup":
        return draw(token_soup.filter(lifecycle_safe)), "any", "soup"
    return draw(st.binary(max_size=2000).filter(lifecycle_safe)), "any", "bytes"


# --------------------------------------------------------------------------- daemon helpers


def start(
    sockd_factory: Callable[..., Any], short_tmp: Path, **control: Any
) -> tuple[Any, tuple[str, int], str]:
    config = base_config(short_tmp)
    config["control"].update({"request_timeout": REQUEST_TIMEOUT, **control})
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    proc.wait_for("control.listening")
    return proc, address, str(short_tmp / "ctl.sock")


def call(path: str, method: str, target: str, body: bytes = b"") -> Answer:
    raw = Request(method.encode(), target.encode(), body=body).raw()
    answer = exchange(path, raw)
    assert answer is not None
    return answer


def assert_still_serving(proc: Any, address: tuple[str, int], ctl: str) -> None:
    """The daemon runs, its status answers 200 with state running, and the data plane echoes."""
    assert proc.proc.poll() is None, f"the daemon exited: {proc.stderr[-2000:]}"
    assert call(ctl, "POST", "/v1/resume").status == 200  # the fuzz may have paused it
    answer = call(ctl, "GET", "/v1/status")
    assert answer.status == 200
    assert json.loads(answer.body)["state"] == "running"
    with connect(address) as sock:
        sock.sendall(b"still echoing\n")
        assert recv_exactly(sock, 14) == b"still echoing\n"
    assert proc.all("control.error") == [], "a control request failed inside sockd"


# --------------------------------------------------------------------------- tests


def test_any_request_gets_a_2xx_or_4xx_answer(sockd_factory: Any, short_tmp: Path) -> None:
    """Hostile requests get a whole 2xx (if valid) or 4xx JSON error; the daemon serves on."""
    proc, address, ctl = start(sockd_factory, short_tmp)

    @settings(examples(400))
    @example(case=(b"", "any", "empty"))
    @example(case=(b"\r\n", "4xx", "blank"))
    @example(case=(b"GET /v1/status HTTP/1.1\r\n\r\n", "2xx", "plain"))
    @example(case=(b"GET /v1/logs?follow=1 HTTP/1.1\r\n\r\n", "2xx", "follow"))
    @example(
        case=(
            b"GET /v1/status HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "4xx",
            "dup",
        )
    )
    @example(
        case=(
            b"PUT /v1/log-level HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "4xx",
            "te",
        )
    )
    @example(case=(b"POST /v1/pause HTTP/1.1\r\n\r\n{}", "4xx", "body-without-length"))
    @given(case=random_requests())
    def check(case: tuple[bytes, str, str]) -> None:
        raw, expect, _label = case
        check_answer(raw, exchange(ctl, raw), expect)
        assert proc.proc.poll() is None, f"the daemon exited after {raw[:300]!r}"

    check()
    assert_still_serving(proc, address, ctl)


def test_slow_or_incomplete_requests_time_out_with_408(sockd_factory: Any, short_tmp: Path) -> None:
    """A client that stops mid-request (without closing) gets 408 soon after request_timeout."""
    timeout = 0.3
    proc, address, ctl = start(sockd_factory, short_tmp, request_timeout=timeout)
    full = Request(b"PUT", b"/v1/log-level", body=b'{"level": "debug"}').raw()

    @settings(examples(8))
    @example(cut=0)
    @example(cut=len(full) - 1)
    @given(cut=st.integers(0, len(full) - 1))
    def check(cut: int) -> None:
        began = time.monotonic()
        answer = exchange(ctl, full[:cut], half_close=False)
        elapsed = time.monotonic() - began
        assert answer is not None
        check_answer(full[:cut], answer, "4xx")
        assert answer.status == 408
        assert timeout * 0.9 <= elapsed < timeout + 3, elapsed

    check()
    assert_still_serving(proc, address, ctl)


def test_reload_and_stop_accept_valid_bodies_and_refuse_the_rest(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Refused reload/stop bodies leave the daemon as it was; accepted ones reload, then stop it."""
    proc, address, ctl = start(sockd_factory, short_tmp)

    @settings(examples(60))
    @given(path=st.sampled_from(LIFECYCLE), body=wrong_bodies)
    def refused(path: str, body: bytes) -> None:
        if body_accepted(path, body):
            return
        answer = call(ctl, "POST", path, body)
        check_answer(body, answer, "4xx")
        assert answer.status == 400

    refused()
    assert_still_serving(proc, address, ctl)
    generation = json.loads(call(ctl, "GET", "/v1/status").body)["generation"]
    for body in (b"", b"{}", b" \r\n", b'{"dry_run": false}'):
        answer = call(ctl, "POST", "/v1/reload", body)
        check_answer(body, answer, "2xx")
        generation += 1
        assert json.loads(answer.body)["generation"] == generation
    answer = call(ctl, "POST", "/v1/reload", b'{"dry_run": true}')
    check_answer(b'{"dry_run": true}', answer, "2xx")
    assert json.loads(answer.body) == {"result": "valid", "generation": generation, "changes": []}
    answer = call(ctl, "POST", "/v1/stop", b'{"timeout": 0.5}')
    check_answer(b'{"timeout": 0.5}', answer, "2xx")
    assert answer.status == 202
    assert proc.wait_exit() == 0


#: Inputs that each got a 500 before its fix: now a 400 like any other malformed request.
FORMER_BUGS = [
    pytest.param(
        b"GET /v1/status HTTP/1.1\r\nContent-Length: " + b"0" * 4301 + b"\r\n\r\n",
        id="content-length-4301-digits",
    ),
    pytest.param(
        b"DELETE /v1/connections/" + b"1" * 4301 + b" HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        id="connection-id-4301-digits",
    ),
    pytest.param(
        b"GET /v1/logs?n=" + b"0" * 4301 + b" HTTP/1.1\r\n\r\n",
        id="logs-n-4301-digits",
    ),
    pytest.param(
        b"PUT /v1/log-level HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"[" * 2000,
        id="deeply-nested-body",
    ),
    pytest.param(
        b"POST /v1/stop HTTP/1.1\r\nContent-Length: 323\r\n\r\n"
        + b'{"timeout": 1'
        + b"0" * 309
        + b"}",
        id="stop-timeout-beyond-float",
    ),
    pytest.param(
        b"GET http://[::1/v1/status HTTP/1.1\r\n\r\n",
        id="unbalanced-ipv6-authority",
    ),
    pytest.param(
        b"POST /v1/stop HTTP/1.1\r\nContent-Length: 18\r\n\r\n" + b'{"timeout": 1e303}',
        id="stop-timeout-1e303",
    ),
]


@pytest.mark.parametrize("version", [b"HTTP/-1.1", b"HTTP/+1.1", b"HTTP/1.-1", b"HTTP/0_1.1"])
def test_malformed_http_version_is_refused(
    sockd_factory: Any, short_tmp: Path, version: bytes
) -> None:
    """A version that is not DIGIT.DIGIT is a 400, whatever int() would make of it."""
    proc, address, ctl = start(sockd_factory, short_tmp)
    raw = b"GET /v1/status " + version + b"\r\n\r\n"
    answer = exchange(ctl, raw)
    check_answer(raw, answer, "4xx")
    assert answer is not None and answer.status == 400
    assert_still_serving(proc, address, ctl)


@pytest.mark.parametrize("raw", FORMER_BUGS)
def test_former_bug_inputs_get_a_4xx(sockd_factory: Any, short_tmp: Path, raw: bytes) -> None:
    """Inputs that once crashed a control request into a 500 get a 4xx JSON error."""
    proc, address, ctl = start(sockd_factory, short_tmp)
    check_answer(raw, exchange(ctl, raw), "4xx")
    assert_still_serving(proc, address, ctl)
