"""A small client for ``FileServerHandler``: ``list``, ``get NAME`` and ``put FILE``.

``FileClient`` speaks the protocol and raises typed errors, never printing; ``main`` is
the command line and the only place that prints or chooses an exit status::

    python -m examples.fileserver.client --host 127.0.0.1 --port 9000 list
    python -m examples.fileserver.client --port 9000 get a.txt -o copy.txt
    python -m examples.fileserver.client --port 9000 put ./photo.jpg --name photo.jpg

Exit statuses: 0 success, 1 the server refused or a transfer failed, 2 usage, 3 the
server is unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any, Final

__all__ = ["ClientError", "FileClient", "ServerError", "UnreachableError", "main"]

CHUNK: Final = 64 * 1024
#: A reply line longer than this is a protocol error (a listing of ~100k files fits).
MAX_REPLY_BYTES: Final = 16 * 1024 * 1024


class ClientError(Exception):
    """A failed operation; ``exit_code`` is the status the command line exits with."""

    exit_code = 1


class ServerError(ClientError):
    """The server answered ``{"ok": false, ...}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class UnreachableError(ClientError):
    """No connection to the server."""

    exit_code = 3


class FileClient:
    """One connection to a file server; use as a context manager."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise UnreachableError(f"cannot connect to {host}:{port}: {_reason(exc)}") from None
        self.rfile = self.sock.makefile("rb")

    def __enter__(self) -> FileClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def list(self) -> list[dict[str, Any]]:
        """The server's files as ``{"name": ..., "size": ...}``, sorted by name."""
        result = self._call({"action": "list"})
        files = result.get("files")
        if not isinstance(files, list):
            raise ClientError("protocol error: the listing has no file list")
        return files

    def get(self, name: str, out: IO[bytes]) -> dict[str, Any]:
        """Write file ``name`` to ``out`` and verify it; returns its size and SHA-256."""
        result = self._call({"action": "get", "name": name})
        size, expected = result.get("size"), result.get("sha256")
        if not isinstance(size, int) or size < 0 or not isinstance(expected, str):
            raise ClientError("protocol error: the reply lacks size or sha256")
        digest = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = self._read(min(CHUNK, remaining))
            if not chunk:
                raise ClientError(f"the server closed after {size - remaining} of {size} bytes")
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
        if digest.hexdigest() != expected:
            raise ClientError(f"checksum mismatch: {name!r} arrived damaged")
        return result

    def put(self, path: str, name: str) -> dict[str, Any]:
        """Upload the local file ``path`` as ``name``; returns what the server stored."""
        try:
            file = open(path, "rb")  # noqa: SIM115  # closed below; sendfile needs the object
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {_reason(exc)}") from None
        with file:
            size = os.fstat(file.fileno()).st_size
            digest = hashlib.sha256()
            while chunk := file.read(CHUNK):
                digest.update(chunk)
            request = {"action": "put", "name": name, "size": size, "sha256": digest.hexdigest()}
            ready = self._call(request)
            if ready.get("ready") is not True:
                raise ClientError("protocol error: the server did not say ready")
            try:
                sent = self.sock.sendfile(file, 0, size) if size else 0
            except OSError as exc:
                raise ClientError(f"upload failed: {_reason(exc)}") from None
            if sent != size:
                raise ClientError(f"{path} changed while it was being sent")
            return self._reply()

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise ClientError(f"sending the request failed: {_reason(exc)}") from None
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        try:
            line = self.rfile.readline(MAX_REPLY_BYTES + 1)
        except OSError as exc:
            raise ClientError(f"reading the reply failed: {_reason(exc)}") from None
        if not line:
            raise ClientError("the server closed the connection")
        if not line.endswith(b"\n"):
            raise ClientError("protocol error: reply line too long or cut short")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ClientError("protocol error: the reply is not JSON") from None
        if not isinstance(reply, dict):
            raise ClientError("protocol error: the reply is not an object")
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        error = reply.get("error")
        if not isinstance(error, dict):
            raise ClientError("protocol error: an error reply without an error")
        raise ServerError(str(error.get("code")), str(error.get("message")))

    def _read(self, n: int) -> bytes:
        try:
            return self.rfile.read(n)
        except OSError as exc:
            raise ClientError(f"download failed: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def download(client: FileClient, name: str, output: str) -> dict[str, Any]:
    """Fetch ``name`` into ``output`` ("-": stdout) without leaving a partial file."""
    if output == "-":
        result = client.get(name, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return result
    directory = os.path.dirname(os.path.abspath(output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".download-", dir=directory)
    except OSError as exc:
        raise ClientError(f"cannot write {output}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            result = client.get(name, out)
        os.replace(tmp, output)
    except OSError as exc:
        raise ClientError(f"cannot write {output}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.fileserver.client",
        description="List, download and upload files on a sockd file server.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="server address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="server port (9000)")
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout, seconds")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="list the server's files with their sizes")
    get = commands.add_parser("get", help="download a file")
    get.add_argument("name", metavar="NAME")
    get.add_argument(
        "-o", "--output", metavar="FILE", help="where to write it (NAME's base name; - = stdout)"
    )
    put = commands.add_parser("put", help="upload a file")
    put.add_argument("file", metavar="FILE")
    put.add_argument("--name", metavar="NAME", help="name on the server (FILE's base name)")
    return parser


def run(args: argparse.Namespace) -> str:
    """Carry out one command; returns what to print on success."""
    with FileClient(args.host, args.port, args.timeout) as client:
        if args.command == "list":
            return "".join(f"{f.get('size'):>12}  {f.get('name')}\n" for f in client.list())
        if args.command == "get":
            # Never a path taken from NAME as is: "../x" must not write outside the cwd.
            output = args.output or os.path.basename(args.name)
            if output in ("", ".", ".."):
                raise ClientError(f"cannot derive a file name from {args.name!r}: use -o FILE")
            result = download(client, args.name, output)
            where = "stdout" if output == "-" else output
            return f"{args.name}: {result['size']} bytes, sha256 {result['sha256']} -> {where}\n"
        name = args.name or os.path.basename(args.file)
        result = client.put(args.file, name)
        stored = f"{result.get('name')}: {result.get('size')} bytes stored"
        return f"{stored}, sha256 {result.get('sha256')}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        text = run(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    (sys.stderr if args.command == "get" and args.output == "-" else sys.stdout).write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
