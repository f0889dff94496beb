"""The example file server (examples/fileserver) under the real sockd, over real sockets."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SockdProcess, base_config, connect

HANDLER = "examples.fileserver.server:FileServerHandler"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Conn:
    """One raw protocol connection: JSON request lines out, reply lines and payloads in."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = connect(address)
        self.rfile = self.sock.makefile("rb")
        self.port: int = self.sock.getsockname()[1]

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def line(self, request: dict[str, Any]) -> bytes:
        return json.dumps(request).encode() + b"\n"

    def reply(self) -> dict[str, Any]:
        raw = self.rfile.readline()
        assert raw.endswith(b"\n"), f"no complete reply line: {raw!r}"
        reply: dict[str, Any] = json.loads(raw)
        return reply

    def call(self, **request: Any) -> dict[str, Any]:
        self.sock.sendall(self.line(request))
        return self.reply()

    def error(self, **request: Any) -> str:
        reply = self.call(**request)
        assert reply["ok"] is False, reply
        code: str = reply["error"]["code"]
        return code

    def get(self, name: str) -> tuple[dict[str, Any], bytes]:
        reply = self.call(action="get", name=name)
        assert reply["ok"] is True, reply
        data = self.rfile.read(reply["result"]["size"])
        return reply["result"], data

    def put(self, name: str, data: bytes, **override: Any) -> dict[str, Any]:
        """Announce, wait for ready, send the bytes; the final reply (or the refusal)."""
        request = {"action": "put", "name": name, "size": len(data), "sha256": sha256(data)}
        first = self.call(**{**request, **override})
        if first != {"ok": True, "result": {"ready": True}}:
            return first
        self.sock.sendall(data)
        return self.reply()

    def names(self) -> list[str]:
        reply = self.call(action="list")
        assert reply["ok"] is True, reply
        return [f["name"] for f in reply["result"]["files"]]


@pytest.fixture
def root(short_tmp: Path) -> Path:
    path = short_tmp / "files"
    path.mkdir()
    return path


@pytest.fixture
def outside(short_tmp: Path) -> Path:
    path = short_tmp / "outside"
    path.mkdir()
    (path / "secret.txt").write_bytes(b"do not touch")
    return path


def start(
    sockd_factory: Any,
    short_tmp: Path,
    options: dict[str, Any] | None,
    mode: str = "threading",
    name: str = "sockd.toml",
) -> tuple[SockdProcess, tuple[str, int]]:
    config = base_config(short_tmp, handler=HANDLER, mode=mode)
    config["control"]["socket"] = str(short_tmp / f"{Path(name).stem}.sock")
    if options is not None:
        config["server.handler_options"] = options
    proc: SockdProcess = sockd_factory(config, name=name)
    (address,) = proc.wait_ready()
    return proc, address


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_round_trip_with_3mb_binary(
    sockd_factory: Any, short_tmp: Path, root: Path, mode: str
) -> None:
    """A 3 MB binary and an empty file go up and come back byte for byte, checksums agreeing."""
    proc, address = start(sockd_factory, short_tmp, {"root": str(root)}, mode=mode)
    big = os.urandom(3 * 1024 * 1024)
    with Conn(address) as conn:
        stored = conn.put("big.bin", big)
        assert stored == {
            "ok": True,
            "result": {"name": "big.bin", "size": len(big), "sha256": sha256(big)},
        }
        assert conn.put("empty", b"")["result"]["size"] == 0
        listing = conn.call(action="list")["result"]["files"]
        assert listing == [{"name": "big.bin", "size": len(big)}, {"name": "empty", "size": 0}]
        header, data = conn.get("big.bin")
        assert header == {"name": "big.bin", "size": len(big), "sha256": sha256(big)}
        assert data == big
        assert conn.get("empty") == ({"name": "empty", "size": 0, "sha256": sha256(b"")}, b"")
    assert (root / "big.bin").read_bytes() == big
    assert stat.S_IMODE((root / "big.bin").stat().st_mode) == 0o644
    assert sorted(os.listdir(root)) == ["big.bin", "empty"]
    assert proc.all("handler.error") == []


def test_payload_sent_with_the_request_line_is_not_lost(
    sockd_factory: Any, short_tmp: Path, root: Path
) -> None:
    """Bytes that arrive in the same segment as the put line are read from the buffer."""
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    data = os.urandom(100_000)
    with Conn(address) as conn:
        line = conn.line(
            {"action": "put", "name": "p.bin", "size": len(data), "sha256": sha256(data)}
        )
        conn.sock.sendall(line + data + conn.line({"action": "list"}))
        assert conn.reply() == {"ok": True, "result": {"ready": True}}
        assert conn.reply()["result"]["sha256"] == sha256(data)
        assert conn.reply()["result"]["files"] == [{"name": "p.bin", "size": len(data)}]
    assert (root / "p.bin").read_bytes() == data


def run_client(port: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "examples.fileserver.client", "--port", str(port), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=30,
        check=False,
    )


def test_client_command_round_trip_and_errors(
    sockd_factory: Any, short_tmp: Path, root: Path
) -> None:
    """The client command puts, lists and gets; failures are one line with the documented status."""
    _, (_, port) = start(sockd_factory, short_tmp, {"root": str(root), "max_file_bytes": 4_000_000})
    work = short_tmp / "work"
    work.mkdir()
    data = os.urandom(3_000_000)
    (work / "local.bin").write_bytes(data)

    put = run_client(port, "put", "local.bin", "--name", "remote.bin", cwd=work)
    assert put.returncode == 0, put.stderr
    assert sha256(data) in put.stdout
    listing = run_client(port, "list", cwd=work)
    assert listing.returncode == 0
    assert listing.stdout.split() == [str(len(data)), "remote.bin"]
    got = run_client(port, "get", "remote.bin", "-o", "copy.bin", cwd=work)
    assert got.returncode == 0, got.stderr
    assert (work / "copy.bin").read_bytes() == data
    assert run_client(port, "get", "remote.bin", cwd=work).returncode == 0
    assert (work / "remote.bin").read_bytes() == data

    (work / "huge.bin").write_bytes(b"x" * 4_000_001)
    failures = {
        ("get", "absent"): "not_found",
        ("get", "../etc/passwd"): "bad_name",
        ("put", "local.bin", "--name", ".hidden"): "bad_name",
        ("put", "huge.bin"): "too_large",
        ("put", "no-such-local-file"): "no-such-local-file",
    }
    for args, expected in failures.items():
        result = run_client(port, *args, cwd=work)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(os.listdir(root)) == ["remote.bin"]
    assert not list(work.glob(".download-*"))

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connecting is refused
    unreachable = run_client(closed.getsockname()[1], "list", cwd=work)
    closed.close()
    assert unreachable.returncode == 3
    assert "cannot connect" in unreachable.stderr
    assert run_client(port, "frobnicate", cwd=work).returncode == 2


def test_missing_root_is_no_root(sockd_factory: Any, short_tmp: Path) -> None:
    """Without handler_options.root, or with a root that is not a directory, actions get no_root."""
    for index, options in enumerate([None, {"root": str(short_tmp / "absent")}]):
        _, address = start(sockd_factory, short_tmp, options, name=f"r{index}.toml")
        with Conn(address) as conn:
            assert conn.error(action="list") == "no_root"
            assert conn.error(action="get", name="a.txt") == "no_root"
            reply = conn.put("a.txt", b"data")
            assert reply["error"]["code"] == "no_root"  # refused before "ready"
            assert "root" in reply["error"]["message"]
    assert not (short_tmp / "absent").exists()


BAD_NAMES = [
    "..",
    ".",
    "",
    "/etc/passwd",
    "../secret.txt",
    "../outside/secret.txt",
    "a/b",
    "a\x00b",
    ".hidden",
    ".upload-abc123",
    "line\nbreak",
    "x" * 256,
]
#: Names that display as something else: C0/DEL/C1 controls, bidi controls, invisibles.
DECEPTIVE_NAMES = [
    "esc\x1b[31mred",
    "del\x7f",
    "nel\x85",
    "csi\x9b31m",
    "c1\x9f",
    "evil\u202etxt.exe",  # RIGHT-TO-LEFT OVERRIDE: shows as "evilexe.txt"
    "lre\u202a",
    "pdf\u202c",
    "lri\u2066x",
    "pdi\u2069",
    "lrm\u200e",
    "rlm\u200f",
    "alm\u061c",
    "zw\u200bsp",
    "bom\ufeff",
    "ls\u2028x",
    "ps\u2029x",
    # Default-ignorable code points outside category Cf (rendered as nothing at all):
    "a\u034fb.txt",  # COMBINING GRAPHEME JOINER
    "a\ufe0fb.txt",  # VARIATION SELECTOR-16
    "\u3164.txt",  # HANGUL FILLER
    "a\u115fb",  # HANGUL CHOSEONG FILLER
    "a\uffa0b",  # HALFWIDTH HANGUL FILLER
    "a\u17b4b",  # KHMER VOWEL INHERENT AQ
    "a\u180bb",  # MONGOLIAN FREE VARIATION SELECTOR ONE
    "a\U000e0100b",  # VARIATION SELECTOR-17
    "a\U000e0041b",  # TAG LATIN CAPITAL LETTER A
    "a\u2065b",  # unassigned, default ignorable
    # Blanks that look like a space or like nothing, and spaces at either end:
    "a\u2800b",  # BRAILLE PATTERN BLANK
    "file.txt\u2003",  # EM SPACE
    "a\u00a0b.txt",  # NO-BREAK SPACE
    "a\u3000b",  # IDEOGRAPHIC SPACE
    " lead.txt",
    "trail.txt ",
]


def test_names_escaping_or_reserved_are_refused(
    sockd_factory: Any, short_tmp: Path, root: Path, outside: Path
) -> None:
    """Traversal, absolute paths, '/', NUL, dotfiles, control chars and long names are bad_name."""
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    before = snapshot(outside)
    with Conn(address) as conn:
        for name in BAD_NAMES:
            assert conn.error(action="get", name=name) == "bad_name", name
            assert conn.put(name, b"payload")["error"]["code"] == "bad_name", name
        assert conn.error(action="get", name=7) == "bad_request"
        assert conn.error(action="get") == "bad_request"
        assert conn.error(action="get", name="absent.txt") == "not_found"
        assert conn.names() == []
    assert os.listdir(root) == []
    assert snapshot(outside) == before


def test_deceptive_names_are_refused_and_hidden(
    sockd_factory: Any, short_tmp: Path, root: Path
) -> None:
    """Control (C0, DEL, C1), bidi-override, default-ignorable and blank characters, spaces
    other than U+0020 and spaces at either end are bad_name for get and put, and files
    already named so are left out of list."""
    for index, name in enumerate(DECEPTIVE_NAMES):
        (root / name).write_bytes(b"planted %d" % index)
    (root / "caf\u00e9 \U0001f600.txt").write_bytes(b"fine")
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    with Conn(address) as conn:
        for name in DECEPTIVE_NAMES:
            reply = conn.call(action="get", name=name)
            assert reply["error"]["code"] == "bad_name", name
            if not (name.isascii() and name.isprintable()):  # (a quoted space is visible)
                assert name not in reply["error"]["message"]  # shown escaped, never raw
            assert conn.put(name, b"payload")["error"]["code"] == "bad_name", name
        assert conn.names() == ["caf\u00e9 \U0001f600.txt"]
        assert conn.get("caf\u00e9 \U0001f600.txt")[1] == b"fine"
    for index, name in enumerate(DECEPTIVE_NAMES):
        assert (root / name).read_bytes() == b"planted %d" % index


def test_symlinks_out_of_root_are_refused(
    sockd_factory: Any, short_tmp: Path, root: Path, outside: Path
) -> None:
    """A symlink in the root leading outside (or anywhere) is refused for get and put."""
    (root / "link").symlink_to(outside / "secret.txt")
    (root / "dangling").symlink_to(outside / "created-through-link.txt")
    (root / "dirlink").symlink_to(outside)
    (root / "real.txt").write_bytes(b"real")
    (root / "alias").symlink_to(root / "real.txt")
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    with Conn(address) as conn:
        for name in ("link", "dangling", "dirlink"):
            reply = conn.call(action="get", name=name)
            assert reply["error"]["code"] == "bad_name", name
            assert "out of root" in reply["error"]["message"]
            assert conn.put(name, b"overwrite")["error"]["code"] == "bad_name", name
        assert conn.error(action="get", name="alias") == "bad_name"
        assert conn.put("alias", b"overwrite")["error"]["code"] == "bad_name"
        assert conn.names() == ["real.txt"]
    assert (outside / "secret.txt").read_bytes() == b"do not touch"
    assert not (outside / "created-through-link.txt").exists()
    assert (root / "real.txt").read_bytes() == b"real"
    assert (root / "link").is_symlink()


def test_size_limit_is_enforced_before_reading(
    sockd_factory: Any, short_tmp: Path, root: Path
) -> None:
    """A put over max_file_bytes is refused before "ready"; get refuses such a file too."""
    (root / "placed.bin").write_bytes(b"z" * 1001)
    _, address = start(sockd_factory, short_tmp, {"root": str(root), "max_file_bytes": 1000})
    with Conn(address) as conn:
        reply = conn.put("big.bin", b"y" * 1001)
        assert reply["error"]["code"] == "too_large"
        assert "1000" in reply["error"]["message"]
        assert conn.error(action="get", name="placed.bin") == "too_large"
        assert conn.put("fits.bin", b"y" * 1000)["ok"] is True  # the connection stayed in step
    assert sorted(os.listdir(root)) == ["fits.bin", "placed.bin"]


def test_bad_checksum_leaves_the_old_file(sockd_factory: Any, short_tmp: Path, root: Path) -> None:
    """A put whose bytes do not match its sha256 is refused and the old file is kept."""
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    with Conn(address) as conn:
        assert conn.put("a.txt", b"version one")["ok"] is True
        reply = conn.put("a.txt", b"version two", sha256=sha256(b"something else"))
        assert reply["error"]["code"] == "checksum_mismatch"
        assert conn.get("a.txt")[1] == b"version one"
        assert conn.put("a.txt", b"version three")["ok"] is True
        assert conn.get("a.txt")[1] == b"version three"
    assert os.listdir(root) == ["a.txt"]


def test_put_needs_valid_size_and_checksum(sockd_factory: Any, short_tmp: Path, root: Path) -> None:
    """A put without a non-negative integer size or a hex sha256 is bad_request."""
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    good = {"action": "put", "name": "a", "size": 1, "sha256": sha256(b"a")}
    with Conn(address) as conn:
        for override in (
            {"size": None},
            {"size": -1},
            {"size": True},
            {"size": "1"},
            {"sha256": None},
            {"sha256": "abc"},
            {"sha256": "g" * 64},
        ):
            request = {k: v for k, v in {**good, **override}.items() if v is not None}
            assert conn.error(**request) == "bad_request", override
        assert conn.names() == []
    assert os.listdir(root) == []


def test_put_onto_a_directory_is_refused(sockd_factory: Any, short_tmp: Path, root: Path) -> None:
    """A put may replace a regular file but not a directory of the same name."""
    (root / "sub").mkdir()
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    with Conn(address) as conn:
        assert conn.put("sub", b"data")["error"]["code"] == "bad_name"
        assert conn.error(action="get", name="sub") == "not_found"
    assert os.listdir(root) == ["sub"]


def test_short_upload_then_half_close_is_size_mismatch(
    sockd_factory: Any, short_tmp: Path, root: Path
) -> None:
    """Fewer bytes than announced, then end-of-stream, gets size_mismatch and leaves nothing."""
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    data = os.urandom(10_000)
    with Conn(address) as conn:
        request = {"action": "put", "name": "s.bin", "size": len(data), "sha256": sha256(data)}
        assert conn.call(**request)["result"] == {"ready": True}
        conn.sock.sendall(data[:5000])
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.reply()
        assert reply["error"]["code"] == "size_mismatch"
        assert "5000 of the 10000" in reply["error"]["message"]
    assert os.listdir(root) == []


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_interrupted_upload_leaves_nothing(
    sockd_factory: Any, short_tmp: Path, root: Path, mode: str
) -> None:
    """A client that disconnects mid-upload leaves no file, temporary or final, and no traceback."""
    proc, address = start(sockd_factory, short_tmp, {"root": str(root)}, mode=mode)
    data = os.urandom(2 * 1024 * 1024)
    conn = Conn(address)
    request = {"action": "put", "name": "cut.bin", "size": len(data), "sha256": sha256(data)}
    assert conn.call(**request)["result"] == {"ready": True}
    conn.sock.sendall(data[: len(data) // 2])
    (upload,) = os.listdir(root)  # the temporary file exists from "ready" on...
    assert upload.startswith(".upload-")
    with Conn(address) as other:
        assert other.names() == []  # ...and is hidden from list
    conn.close()
    proc.wait_for("conn.close", lambda e: e["peer_port"] == conn.port)
    assert os.listdir(root) == []
    assert proc.all("handler.error") == []


def test_list_shows_regular_files_only(sockd_factory: Any, short_tmp: Path, root: Path) -> None:
    """list returns names and sizes of regular files only, sorted; a FIFO cannot hang get."""
    (root / "b.txt").write_bytes(b"bbb")
    (root / "a.bin").write_bytes(b"")
    (root / "sub").mkdir()
    (root / ".hidden").write_bytes(b"h")
    (root / ".upload-stale").write_bytes(b"partial")
    (root / "link").symlink_to(root / "b.txt")
    (root / "bad\nname").write_bytes(b"n")
    os.mkfifo(root / "fifo")
    _, address = start(sockd_factory, short_tmp, {"root": str(root)})
    with Conn(address) as conn:
        assert conn.call(action="list") == {
            "ok": True,
            "result": {"files": [{"name": "a.bin", "size": 0}, {"name": "b.txt", "size": 3}]},
        }
        assert conn.error(action="get", name="fifo") == "not_found"
        assert conn.error(action="get", name="sub") == "not_found"


def test_example_config_validates() -> None:
    """examples/fileserver/sockd.toml passes sockd --check-config."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sockd",
            "--check-config",
            "--config",
            "examples/fileserver/sockd.toml",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
