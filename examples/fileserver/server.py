"""``FileServerHandler``: list, get and put the files of one directory, on JSON actions.

The socketserver tutorials' file service, rebuilt to be safe to expose:

- Every file lives directly in ``handler_options.root`` (required). A name is a single
  path component: no ``/``, not ``.`` or ``..``, at most 255 bytes, and not starting
  with ``.`` (hidden files and uploads in progress are not part of the service), so
  ``list`` shows exactly the names ``get`` accepts. A name holds no character that
  changes how names look rather than being part of them: no control character (C0,
  DEL, C1 such as NEL or CSI, which drive terminals), no invisible formatting character
  (the bidirectional overrides and isolates that make ``evil\u202etxt.exe`` display as
  ``evilexe.txt``, marks, zero-width characters, the byte order mark), no other
  default-ignorable code point (Unicode's ``Default_Ignorable_Code_Point``: the
  combining grapheme joiner, variation selectors, Hangul fillers, tags, which render as
  nothing), no line or paragraph separator, no space but U+0020 (no-break, em,
  ideographic...), no blank braille pattern, and no space at either end.
- Symbolic links are never followed. ``os.path.realpath`` spots a link and says whether
  it leads outside the root; files are opened with ``O_NOFOLLOW`` so a link swapped in
  after that check is refused as well, and ``os.replace`` replaces a link, never
  writes through it.
- ``handler_options.max_file_bytes`` (default 16 MiB) bounds a file in both directions,
  checked against the announced size (put) or ``fstat`` (get) before a payload byte moves.
- An upload is written to ``.upload-XXXXXXXX`` in the root (``mkstemp``), checked
  against the announced size and SHA-256, fsynced, and only then ``os.replace``d over
  the name (and the directory fsynced). Anything else -- a short or corrupt upload, a
  client that vanishes -- unlinks it in ``finally``. Readers see the old file or the new
  one, never a partial one.
- Payloads move in bounded chunks (``sendfile`` for downloads); a file is never held in
  memory.

Wire protocol: one JSON line per request and per reply, as ``JSONActionHandler``
defines; a payload is exactly ``size`` raw bytes right after the line that announces it::

    > {"action": "list"}
    < {"ok": true, "result": {"files": [{"name": "a.txt", "size": 5}]}}
    > {"action": "get", "name": "a.txt"}
    < {"ok": true, "result": {"name": "a.txt", "size": 5, "sha256": "<hex>"}}
    < (5 raw bytes)
    > {"action": "put", "name": "b.bin", "size": 3, "sha256": "<hex>"}
    < {"ok": true, "result": {"ready": true}}
    > (3 raw bytes)
    < {"ok": true, "result": {"name": "b.bin", "size": 3, "sha256": "<hex>"}}

Error codes (besides ``JSONActionHandler``'s): ``no_root``, ``bad_config``, ``bad_name``,
``not_found``, ``too_large``, ``size_mismatch``, ``checksum_mismatch``, ``file_changed``,
``io_error``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import stat
import tempfile
import unicodedata
from collections.abc import Callable
from typing import Any, Final

from sockd.handlers import ActionError, JSONActionHandler, action

__all__ = ["CHUNK", "DEFAULT_MAX_FILE_BYTES", "UPLOAD_PREFIX", "FileServerHandler", "check_name"]

#: Payload bytes moved per read or write: bounds memory per connection.
CHUNK: Final = 64 * 1024
DEFAULT_MAX_FILE_BYTES: Final = 16 * 1024 * 1024
#: Prefix of in-progress uploads in the root; a leading "." keeps them out of ``list``.
UPLOAD_PREFIX: Final = ".upload-"
#: Mode of stored files (mkstemp creates 0600; the files are meant to be served).
FILE_MODE: Final = 0o644
#: NAME_MAX on Linux filesystems.
MAX_NAME_BYTES: Final = 255

_Action = Callable[[Any, dict[str, Any]], dict[str, Any]]
#: ``@action(name="list")`` with its type spelled out: sockd's ``action`` returns Any,
#: which ``mypy --strict`` rejects as an untyped decorator.
_as_list: Callable[[_Action], _Action] = action(name="list")

_SHA256_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")
#: C0 controls, DEL and the C1 controls (U+0080-U+009F: NEL, CSI, ... act on terminals).
_CONTROL_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: Unicode categories refused in names beyond ASCII, and what to call them in errors:
#: "Cf" holds the bidi controls (U+202A-U+202E, U+2066-U+2069, U+200E/U+200F, U+061C),
#: zero-width characters and U+FEFF.
_INVISIBLE: Final = {
    "Cc": "control character",
    "Cf": "invisible formatting character (bidi control, zero-width, mark)",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Zs": "non-ASCII space",
}
#: Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt), as inclusive
#: ranges: code points a renderer shows as nothing. Many are Cf (refused above anyway);
#: these are not: U+034F, the Hangul fillers, the variation selectors, tags, unassigned
#: ones. Spelled out rather than taken from ``unicodedata``, which has no such property.
_DEFAULT_IGNORABLE: Final = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
#: Blank but not a space by category (So): shows as an empty cell.
_BRAILLE_BLANK: Final = "\u2800"


def _refused_char(char: str) -> str | None:
    """What to call ``char`` in an error if a name may not hold it (U+0020 is fine)."""
    if char == " ":
        return None
    kind = _INVISIBLE.get(unicodedata.category(char))
    if kind is not None:
        return kind
    code = ord(char)
    if any(low <= code <= high for low, high in _DEFAULT_IGNORABLE):
        return "invisible (default-ignorable) character"
    if char == _BRAILLE_BLANK:
        return "blank braille pattern"
    return None


def _shown(value: str) -> str:
    """``value`` (its first 100 characters) quoted for an error message, every character a
    name may not hold escaped: ``repr`` escapes the non-printable ones, this the rest
    (marks, fillers and blanks that ``repr`` thinks printable)."""
    return "".join(_escaped(c) for c in repr(value[:100]))


def _escaped(char: str) -> str:
    if char.isascii() or _refused_char(char) is None:
        return char
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def check_name(value: object) -> str:
    """``value`` if it is a valid file name inside the root, else an ``ActionError``."""
    if not isinstance(value, str):
        raise ActionError("bad_request", 'a request needs a string "name"')
    shown = _shown(value)
    if "\x00" in value:
        raise ActionError("bad_name", f"{shown}: NUL is not allowed in a name")
    if "/" in value:
        raise ActionError("bad_name", f"{shown}: a name is a single path component, no '/'")
    if value in ("", ".", ".."):
        raise ActionError("bad_name", f"{shown} is not a file name")
    if value.startswith("."):
        raise ActionError(
            "bad_name", f"{shown}: names starting with '.' are reserved (hidden files, uploads)"
        )
    if _CONTROL_CHARS.search(value):
        raise ActionError("bad_name", f"{shown}: control characters are not allowed in a name")
    if value[0] == " " or value[-1] == " ":
        raise ActionError("bad_name", f"{shown}: a name may not begin or end with a space")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ActionError("bad_name", f"{shown} is not valid Unicode") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ActionError("bad_name", f"a name is at most {MAX_NAME_BYTES} bytes")
    if not value.isascii():  # at most 255 characters here
        for char in value:
            kind = _refused_char(char)
            if kind is not None:
                raise ActionError(
                    "bad_name", f"{shown}: {kind} U+{ord(char):04X} is not allowed in a name"
                )
    return value


def _io_error(what: str, exc: OSError) -> ActionError:
    # strerror only: the exception's text would show the server's paths to the client.
    return ActionError("io_error", f"{what}: {exc.strerror or type(exc).__name__}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _hash_exactly(file: io.FileIO, size: int) -> str | None:
    """SHA-256 of the first ``size`` bytes of ``file``; None if it has fewer."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    remaining = size
    while remaining:
        n = file.readinto(view[: min(CHUNK, remaining)])
        if not n:
            return None
        digest.update(view[:n])
        remaining -= n
    return digest.hexdigest()


class FileServerHandler(JSONActionHandler):
    """Serves ``list``, ``get`` and ``put`` on the directory ``handler_options.root``."""

    #: The open file and size whose bytes follow the next successful reply (a ``get``).
    _pending: tuple[io.FileIO, int] | None = None

    # -- connection lifecycle ------------------------------------------------------------
    def handle(self) -> None:
        # A client vanishing mid-transfer is an ordinary end for a file service, not a
        # server bug: end the connection quietly instead of logging a traceback.
        try:
            super().handle()
        except ConnectionError as exc:
            self.log.info("fileserver.peer_gone", error=type(exc).__name__)

    def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[0].close()
        super().finish()

    def reply(self, body: dict[str, Any], request_id: Any = None) -> None:
        """Send one reply line; after a successful ``get`` the file's bytes follow it."""
        pending, self._pending = self._pending, None
        try:
            super().reply(body, request_id)
            if pending is not None and body.get("ok") is True:
                self._stream(*pending)
        finally:
            if pending is not None:
                pending[0].close()

    # -- actions -------------------------------------------------------------------------
    @_as_list
    def list_files(self, request: dict[str, Any]) -> dict[str, Any]:
        """Names and sizes of the regular files in the root (no links, dirs or dotfiles)."""
        root = self._root()
        files: list[dict[str, Any]] = []
        try:
            with os.scandir(root) as entries:
                for entry in entries:
                    try:
                        check_name(entry.name)
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        size = entry.stat(follow_symlinks=False).st_size
                    except (ActionError, OSError):
                        continue  # a name get would refuse, or a file removed meanwhile
                    files.append({"name": entry.name, "size": size})
        except OSError as exc:
            raise _io_error("cannot list the root", exc) from exc
        files.sort(key=lambda f: str(f["name"]))
        return {"files": files}

    @action
    def get(self, request: dict[str, Any]) -> dict[str, Any]:
        """Announce a file's size and SHA-256; ``reply`` then streams its bytes."""
        root = self._root()
        limit = self._limit()
        name = check_name(request.get("name"))
        file = self._open_regular(self._inside(root, name), name)
        try:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise ActionError(
                    "too_large", f"{name!r} is {size} bytes, over this server's {limit}"
                )
            digest = _hash_exactly(file, size)
            if digest is None:
                raise ActionError("file_changed", f"{name!r} shrank while being read; retry")
            file.seek(0)
        except BaseException:
            file.close()
            raise
        self._pending = (file, size)
        self.log.info("fileserver.get", name=name, size=size)
        return {"name": name, "size": size, "sha256": digest}

    @action
    def put(self, request: dict[str, Any]) -> dict[str, Any]:
        """Receive exactly ``size`` bytes and store them as ``name`` once verified."""
        root = self._root()
        limit = self._limit()
        name = check_name(request.get("name"))
        size = request.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ActionError("bad_request", 'a put needs "size", a non-negative integer')
        expected = request.get("sha256")
        if not isinstance(expected, str) or not _SHA256_HEX.fullmatch(expected):
            raise ActionError("bad_request", 'a put needs "sha256", 64 hexadecimal digits')
        expected = expected.lower()
        if size > limit:
            raise ActionError(
                "too_large", f"{size} bytes is over this server's limit of {limit} per file"
            )
        path = self._inside(root, name)
        self._check_target(path, name)
        try:
            fd, tmp = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=root)
        except OSError as exc:
            raise _io_error("cannot create the upload file", exc) from exc
        committed = False
        try:
            # The temporary file exists before "ready" is sent, so a failure to create
            # it is reported before the client sends a single byte.
            received, digest, write_error = self._receive(fd, size, request.get("id"))
            if received < size:
                raise ActionError(
                    "size_mismatch",
                    f"the connection ended after {received} of the {size} announced bytes",
                )
            if write_error is not None:
                raise _io_error(f"cannot store {name!r}", write_error)
            if digest != expected:
                raise ActionError(
                    "checksum_mismatch",
                    f"the {size} bytes received hash to {digest}, not the announced {expected}",
                )
            try:
                os.fchmod(fd, FILE_MODE)
                os.fsync(fd)  # the data is on disk before the name points at it
                os.replace(tmp, path)
                committed = True
            except OSError as exc:
                raise _io_error(f"cannot store {name!r}", exc) from exc
            self._fsync_dir(root)
        except ActionError as exc:
            self.log.info("fileserver.put_failed", name=name, size=size, code=exc.code)
            raise
        finally:
            os.close(fd)
            if not committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self.log.info("fileserver.put", name=name, size=size, sha256=digest)
        return {"name": name, "size": size, "sha256": digest}

    # -- helpers -------------------------------------------------------------------------
    def _root(self) -> str:
        root = self.options.get("root")
        if not isinstance(root, str) or not root:
            self.log.error("fileserver.no_root", reason="handler_options.root is not set")
            raise ActionError(
                "no_root", "this server has no file root: set [server.handler_options] root"
            )
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            self.log.error("fileserver.no_root", root=root, reason="not a directory")
            raise ActionError("no_root", "this server's file root is not a directory")
        return real

    def _limit(self) -> int:
        value = self.options.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ActionError(
                "bad_config", "handler_options.max_file_bytes must be a positive integer"
            )
        return value

    @staticmethod
    def _inside(root: str, name: str) -> str:
        """The path of ``name`` in ``root``, refusing a symbolic link."""
        path = os.path.join(root, name)
        real = os.path.realpath(path)
        if real != path:
            # ``root`` is already resolved and ``name`` is one component, so any
            # difference means ``name`` is a link.
            if os.path.commonpath((root, real)) != root:
                raise ActionError("bad_name", f"{name!r} is a symbolic link leading out of root")
            raise ActionError("bad_name", f"{name!r} is a symbolic link; links are not followed")
        return path

    @staticmethod
    def _open_regular(path: str, name: str) -> io.FileIO:
        # O_NOFOLLOW: a link swapped in after _inside() is refused (ELOOP), not followed.
        # O_NONBLOCK: opening a FIFO must not hang the connection; cleared below.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise ActionError("not_found", f"no file named {name!r}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ActionError("bad_name", f"{name!r} is a symbolic link") from None
            raise _io_error(f"cannot open {name!r}", exc) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ActionError("not_found", f"{name!r} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb", buffering=0)

    @staticmethod
    def _check_target(path: str, name: str) -> None:
        """A put may create ``name`` or replace a regular file, nothing else."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _io_error(f"cannot inspect {name!r}", exc) from exc
        if stat.S_ISLNK(mode):
            raise ActionError("bad_name", f"{name!r} is a symbolic link")
        if not stat.S_ISREG(mode):
            raise ActionError("bad_name", f"{name!r} exists and is not a regular file")

    def _receive(self, fd: int, size: int, request_id: Any) -> tuple[int, str, OSError | None]:
        """Say "ready", then read exactly ``size`` bytes into ``fd``, hashing them.

        Returns (bytes received, SHA-256, first write error). Reading stops early only
        when the connection ends; a write error (disk full) does not stop it, because the
        client sends ``size`` bytes regardless and the next request line comes after them.
        """
        try:
            self.reply({"ok": True, "result": {"ready": True}}, request_id)
        except OSError:
            return 0, "", None
        digest = hashlib.sha256()
        received = 0
        write_error: OSError | None = None
        while received < size:
            try:
                # The buffered reader, never self.request.recv: bytes that arrived with
                # the request line are already in its buffer.
                chunk = self.rfile.read(min(CHUNK, size - received))
            except OSError:
                break  # reset by the peer, or cut by sockd (drain deadline, kick)
            if not chunk:
                break
            received += len(chunk)
            digest.update(chunk)
            if write_error is None:
                try:
                    _write_all(fd, chunk)
                except OSError as exc:
                    write_error = exc
        return received, digest.hexdigest(), write_error

    def _fsync_dir(self, root: str) -> None:
        """Make the rename durable; the file is already in place, so only log a failure."""
        try:
            dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.log.warning("fileserver.fsync_dir_failed", error=exc.strerror)

    def _stream(self, file: io.FileIO, size: int) -> None:
        sent = self.request.sendfile(file, 0, size) if size else 0
        if sent < size:
            # The file shrank after it was hashed: something other than this service
            # (whose puts replace files whole) changed it in place. The reply promised
            # ``size`` bytes, so pad to keep the framing; the client's checksum check
            # reports the damage.
            self.log.warning("fileserver.file_changed", sent=sent, size=size)
            zeros = memoryview(bytes(CHUNK))
            while sent < size:
                n = min(CHUNK, size - sent)
                self.request.sendall(zeros[:n])
                sent += n
