"""HTTP/1.1 framing for the control channel: reading a request, writing an answer.

Owns the deadline reader (one deadline and one byte budget for a whole request, so a
client trickling a byte at a time cannot hold a thread), the socket writer, the head
every answer carries (``X-Sockd-Api-Version``, ``Connection: close``: one request per
connection keeps the accounting simple, and control traffic is tiny), chunked streaming,
and the lingering close after an answer to a request not read in full. A leaf of the
package: imports nothing from ``sockd.control``; outside it only ``sockd`` (the version)
and ``sockd.protocol``. What the requests mean is ``sockd.control.api``.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import io
import re
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from sockd import __version__
from sockd.protocol import API_VERSION, API_VERSION_HEADER

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: Request line plus headers; control requests are a few hundred bytes.
HEAD_LIMIT: Final = 32 * 1024
REQUEST_LINE_LIMIT: Final = 8 * 1024
#: A client that stops reading our answer (or a log stream) is dropped after this.
WRITE_TIMEOUT: Final = 30.0
#: Bytes we discard while lingering after answering a request we did not read in full.
_LINGER_BYTES = 256 * 1024
LINGER_SECONDS: Final = 1.0
TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HTTP_VERSION: Final = re.compile(r"HTTP/[0-9]\.[0-9]")
#: Methods that must say ``Content-Length`` (0 for no body): else ``411``, never a guess.
BODY_METHODS: Final = frozenset({"POST", "PUT", "DELETE"})


class HeadTooLargeError(Exception):
    """The request line and headers exceed ``HEAD_LIMIT``."""


class RequestTimeoutError(Exception):
    """The request was not in by its deadline (not an ``OSError``: see ``handle``)."""


def head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """Status line and headers of every answer, including the accept loop's 503."""
    reason = http.server.BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Server: sockd/{__version__}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"{API_VERSION_HEADER}: {API_VERSION}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def full_response(
    status: int, body: bytes, content_type: str, headers: Iterable[tuple[str, str]] = ()
) -> bytes:
    start = head(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers],
    )
    return start + body


class DeadlineReader(io.RawIOBase):
    """Socket reads that share one deadline and one byte budget.

    A per-``recv`` timeout lets a client that trickles a byte at a time hold a thread
    forever; here every read gets only the time left until the request's deadline.
    The budget caps what a request can make us buffer before it is validated.
    """

    def __init__(self, sock: socket.socket, deadline: float, budget: int) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = deadline
        self.budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.budget <= 0:
            raise HeadTooLargeError
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeoutError
        self._sock.settimeout(remaining)
        with memoryview(buffer) as view:
            try:
                count = self._sock.recv_into(view, min(view.nbytes, self.budget))
            except TimeoutError:
                raise RequestTimeoutError from None
        self.budget -= count
        return count


class SocketWriter(io.BufferedIOBase):
    """``wfile`` for the base class: unbuffered, ``sendall`` without ``SIGPIPE``."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        with memoryview(data) as view:
            self._sock.sendall(view, socket.MSG_NOSIGNAL)
            return view.nbytes


class ChunkedBody:
    """A streamed answer: chunked for HTTP/1.1; for HTTP/1.0, which has no chunked
    encoding, the end of the stream is the close."""

    def __init__(self, wfile: io.BufferedIOBase, chunked: bool) -> None:
        self._wfile = wfile
        self.chunked = chunked

    def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        extra = [("Transfer-Encoding", "chunked")] if self.chunked else []
        self._wfile.write(head(status, [*headers, *extra]))

    def write(self, parts: list[bytes]) -> None:
        """One chunk, written part by part (joining would copy it)."""
        size = sum(len(part) for part in parts)
        if not size:
            return
        if self.chunked:
            self._wfile.write(b"%X\r\n" % size)
        for part in parts:
            self._wfile.write(part)
        if self.chunked:
            self._wfile.write(b"\r\n")

    def end(self) -> None:
        if self.chunked:
            self._wfile.write(b"0\r\n\r\n")


def linger(sock: socket.socket, deadline: float) -> None:
    """Half-close, then briefly discard what the client is still sending.

    Closing a Unix socket with unread input makes the client's reads fail with
    ECONNRESET and its writes with EPIPE, so a client still sending a body we
    refused (413, 403) might never see our answer.
    """
    deadline = time.monotonic() + min(LINGER_SECONDS, deadline - time.monotonic())
    discarded = 0
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while discarded < _LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            discarded += len(chunk)


def answer_at_once(sock: socket.socket, response: bytes) -> None:
    """Answer from the accept loop without blocking it (the send buffer is empty).

    What the client already sent is read and dropped first: closing a Unix socket with
    unread input would make the client's read fail with ECONNRESET before our answer.
    """
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        for _ in range(4):
            if len(sock.recv(65536)) < 65536:
                break
    with contextlib.suppress(OSError):
        sock.send(response, socket.MSG_NOSIGNAL)
