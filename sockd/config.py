"""Settings: declared once, loaded from TOML, validated completely, diffed on reload.

Every key is declared exactly once, as a field of its section's dataclass
(``ServerConfig``, ``LoggingConfig``, ``ControlConfig``) whose metadata carries the
default as written in the file, the parser, the doc, whether a reload applies it live
and how the effective config shows it. ``SETTINGS`` is derived from those fields, and
validation, the effective-config dump, the reload diff, the README's reference table
and ``etc/sockd.toml`` all derive from it, so they cannot drift. Loading never binds or
starts anything, nor changes ``sys.path`` (the command lines do that): it is what
``sockd --check-config`` and ``sockctl check`` run.

Over 600 lines on purpose: a third of it is the declarations, which are the operator's
documentation (the README table and etc/sockd.toml are generated from them), and they
sit next to the parsers they name. The address and value parsers are the part that
could leave, as one leaf module, if this grows.
"""

from __future__ import annotations

import grp
import importlib
import ipaddress
import json
import os
import re
import socketserver
import stat
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeAlias, cast, get_type_hints

from sockd import protocol
from sockd.errors import ConfigError
from sockd.protocol import DEFAULT_CONTROL_SOCKET, LOG_LEVELS

Mode: TypeAlias = Literal["threading", "forking"]
LogFormat: TypeAlias = Literal["json", "logfmt", "console"]
OnLimit: TypeAlias = Literal["wait", "refuse"]
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Declared in sockd.protocol, which sockctl shares; ``sockd --config``'s default.
DEFAULT_CONFIG_PATH = protocol.DEFAULT_CONFIG_PATH


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A TCP listen address; ``str()`` gives the canonical ``host:port`` / ``[v6]:port``."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``"host:port"`` or ``"[v6]:port"``; raises ``ValueError`` with the reason.

        A host is an IPv4 or IPv6 literal or a DNS name (RFC 1123: ASCII letters, digits
        and hyphens, labels separated by dots); a port is ASCII digits from 0 to 65535.
        Python's ``int`` and ``str.isdigit`` also take other scripts' digits (fullwidth,
        Arabic-Indic, superscripts), which no operator means.
        """
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError('IPv6 addresses are written "[::1]:9000"')
            port_text = rest[1:]
            _check_ipv6(host)
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError('expected "host:port"')
            if ":" in host:
                raise ValueError('IPv6 addresses are written "[::1]:9000"')
            _check_host(host)
            # A valid name is resolved when sockd binds (DNS may not be up at check time).
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            raise ValueError(f"port {_q(port_text[:20])} is not a number from 0 to 65535")
        if int(port_text) > 65535:
            raise ValueError(f"port {port_text} is not a number from 0 to 65535")
        return cls(host, int(port_text))


#: One DNS label (RFC 1123): ASCII letters and digits, hyphens inside, 1 to 63 characters.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: A last label that getaddrinfo would read as a number (inet_aton: "0x7f", "017", "1").
_NUMERIC_LABEL = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)")


def _check_ipv6(host: str) -> None:
    address, _, scope = host.partition("%")
    if not (host.isascii() and host.isprintable()) or " " in host:
        raise ValueError(f"{_q(host)} is not an IPv6 address")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise ValueError(f"{_q(host)} is not an IPv6 address") from None
    if "%" in host and not _LABEL.fullmatch(scope.replace("_", "-").replace(".", "-")):
        raise ValueError(f"{_q(host)} has an invalid scope (expected an interface name)")


def _check_host(host: str) -> None:
    """An IPv4 literal or an RFC 1123 host name, else ``ValueError`` saying which it is not."""
    if host.replace(".", "").isdigit():  # looks like IPv4 (in any script), so it must be one
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{_q(host)} is not an IPv4 address") from None
        return
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (
        len(host) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or _NUMERIC_LABEL.fullmatch(labels[-1])
    ):
        raise ValueError(
            f"host {_q(host)} is neither an IP address nor a valid host name "
            "(ASCII letters, digits and hyphens, labels separated by dots)"
        )


class Invalid(ValueError):  # noqa: N818  # reads as 'raise Invalid("expected ...")'
    """Raised by a parser; the message says what was expected."""


Parser: TypeAlias = Callable[[Any], Any]


def _q(text: str) -> str:
    """A string quoted and escaped for one-line messages (newlines, control characters)."""
    return json.dumps(text, ensure_ascii=False)


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _choice(*choices: str) -> Parser:
    expected = " or ".join(f'"{c}"' for c in choices)
    if len(choices) > 2:
        expected = ", ".join(f'"{c}"' for c in choices[:-1]) + f' or "{choices[-1]}"'

    def parse(value: Any) -> str:
        if value not in choices:
            raise Invalid(f"expected {expected}, got {_describe(value)}")
        return cast(str, value)

    return parse


def _integer(low: int, high: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise Invalid(f"expected an integer {bound}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"expected a number of seconds, got {_describe(value)}")
        if not low <= value <= high:
            raise Invalid(f"expected seconds from {low:g} to {high:g}, got {value}")
        return float(value)

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {_describe(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty string, got {_describe(value)}")
    return value


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"expected connections per second (a number), got {_describe(value)}")
    if not 0 <= value <= 1_000_000:  # nan fails this too
        raise Invalid(f"expected connections per second from 0 to 1000000, got {value!r}")
    return float(value)


def _identifier(value: Any) -> str:
    text = _string(value)
    if len(text) > 64 or not text.isprintable() or any(c.isspace() for c in text):
        raise Invalid(f"expected at most 64 printable characters, no spaces, got {_q(text)}")
    return text


def _optional_group(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid(f"expected a group name, got {_describe(value)}")
    if not value.isdigit():
        try:
            grp.getgrnam(value)
        except (KeyError, ValueError):  # ValueError: a NUL byte, which no group name has
            raise Invalid(f"no such group {_q(value)}") from None
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise Invalid(f"expected an array of strings, got {_describe(value)}")
    wrong = [
        f"item {i + 1} is {_describe(v)}" for i, v in enumerate(value) if not isinstance(v, str)
    ]
    if wrong:
        raise Invalid(f"expected an array of strings: {'; '.join(wrong)}")
    return cast(list[str], value)


def _listen(value: Any) -> tuple[Address, ...]:
    items = _string_list(value)
    if not items:
        raise Invalid('expected at least one "host:port" address')
    parsed: list[Address] = []
    problems: list[str] = []
    for item in items:
        try:
            address = Address.parse(item)
        except ValueError as exc:
            problems.append(f"{item!r}: {exc}")
            continue
        if address in parsed and address.port != 0:
            problems.append(f"{item!r} is listed twice")
        parsed.append(address)
    if problems:
        raise Invalid("; ".join(problems))
    return tuple(parsed)


def _networks(value: Any) -> tuple[Network, ...]:
    networks: list[Network] = []
    bad: list[str] = []
    for item in _string_list(value):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            bad.append(_q(item))
    if bad:
        raise Invalid(f'expected CIDR networks like "10.0.0.0/8", got {", ".join(bad)}')
    return tuple(networks)


def _handler_path(value: Any) -> str:
    text = _string(value)
    import_handler(text)  # raises Invalid with the reason
    return text


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"expected a table, got {_describe(value)}")
    return value


def _file_mode(value: Any) -> int:
    if isinstance(value, str) and value and all(c in "01234567" for c in value):
        value = int(value, 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise Invalid(f'expected a file mode like "0660" or 0o660, got {_describe(value)}')
    return value


def _log_output(value: Any) -> str:
    text = _string(value)
    if text in _OUTPUT_WORDS:
        return text
    problem = log_output_problem(text)
    if problem:
        raise Invalid(problem)
    return text


def log_output_problem(path: str) -> str | None:
    """Why sockd could not append to the log file ``path``, or None if it could.

    Checked without creating anything: an existing path must be something a process can
    open for append (not a directory or a socket) and writable by this process's user; a
    new one needs an existing directory this user may create files in. ``--check-config``
    and a reload therefore refuse an output that opening would fail on, instead of a
    reload failing half way (issue 9).
    """
    expected = 'expected "stdout", "stderr", "journald" or a file sockd can append to'
    shown = _q(path)
    if path.endswith("/"):
        return f"{shown} names a directory; {expected}"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except (OSError, ValueError) as exc:  # ENOTDIR, EACCES on a parent, ELOOP, a NUL byte
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot inspect {shown}: {reason}; {expected}"
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            return f"{shown} is a directory; {expected}"
        if stat.S_ISSOCK(info.st_mode):
            return f"{shown} is a socket; {expected}"
        if not _may(path, os.W_OK):
            return f"{shown} is not writable by uid {os.geteuid()} (the user checking); {expected}"
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        return f"{shown} is in a directory that does not exist ({_q(parent)}); {expected}"
    if not os.path.isdir(parent):
        return f"{shown} is in {_q(parent)}, which is not a directory; {expected}"
    if not _may(parent, os.W_OK | os.X_OK):
        return (
            f"{shown} does not exist and uid {os.geteuid()} (the user checking) may not "
            f"create files in {_q(parent)}; {expected}"
        )
    return None


def _may(path: str, mode: int) -> bool:
    """``os.access`` for the effective user (sockd's), which is what opening checks."""
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)  # pragma: no cover  # Linux supports effective ids


def _socket_path(value: Any) -> str:
    text = _string(value)
    size = len(os.fsencode(text))
    if size > 107:
        raise Invalid(f"a Unix socket path must be at most 107 bytes, got {size}: {_q(text)}")
    return text


def _plain(value: Any) -> Any:
    """A JSON-ready rendering of a setting's value."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Address | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def _octal(mode: int) -> str:
    """A file mode as operators write it ("0660"), not as JSON would show it (432)."""
    return f"0{mode:o}"


@dataclass(frozen=True, slots=True)
class Setting:
    """One config key: its default as written in the file, how to parse it, what operators
    read about it, whether a reload applies it, and how the effective config shows it."""

    key: str
    default: Any
    parse: Parser
    doc: str
    live: bool = True
    #: Shown commented out in etc/sockd.toml instead of the default, where the default
    #: would say nothing (a group that is unset, an empty free-form table).
    example: Any = None
    #: The value as GET /v1/config and the reload diff show it: written as in the file.
    dump: Callable[[Any], Any] = _plain
    #: A relative path is taken from the config file's directory.
    file_path: bool = False
    #: Its value may hold secrets (passwords, DSNs): ``redact`` hides it wherever the
    #: control API shows setting values to someone not trusted with them.
    secret: bool = False

    @property
    def section(self) -> str:
        return self.key.rsplit(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.rsplit(".", 1)[1]


#: The metadata entry of a section dataclass's field that declares its config key.
_SETTING = "sockd.setting"


def _declare(
    default: Any,
    parse: Parser,
    doc: str,
    *,
    live: bool = True,
    example: Any = None,
    dump: Callable[[Any], Any] = _plain,
    file_path: bool = False,
    secret: bool = False,
) -> dict[str, Setting]:
    """The ``field(metadata=...)`` that makes a section dataclass's field a config key.

    Adding a setting is adding one such field; then run scripts/update_readme_tables.py
    to regenerate the README table and etc/sockd.toml. ``default`` is written as in the
    file (``"0660"``, not ``0o660``) and is parsed like a value read from it. The key
    ("section.field") comes from where the field sits, so it is not written twice; the
    field stays required, so building a section by hand must name every value.
    """
    return {_SETTING: Setting("", default, parse, doc, live, example, dump, file_path, secret)}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The [server] table: what is served, how, and to whom."""

    listen: tuple[Address, ...] = field(
        metadata=_declare(
            ["127.0.0.1:9000"],
            _listen,
            'Addresses to serve, "host:port" or "[v6]:port". Port 0 picks a free port.',
        )
    )
    mode: Mode = field(
        metadata=_declare(
            "threading",
            _choice("threading", "forking"),
            '"threading" (ThreadingTCPServer: a thread for each open connection, reused, see '
            'max_spare_threads) or "forking" (ForkingTCPServer: a process per connection).',
        )
    )
    handler: str = field(
        metadata=_declare(
            "sockd.handlers:EchoHandler",
            _handler_path,
            'The socketserver.BaseRequestHandler subclass to run, as "package.module:Class".',
        )
    )
    handler_options: Mapping[str, Any] = field(
        metadata=_declare(
            {},
            _table,
            "Free-form table handed to the handler as self.options (sockd-aware handlers, "
            "e.g. JSONActionHandler's max_line_bytes).",
            example={"max_line_bytes": 65536},
            # Handlers are given passwords and DSNs here: readers see only the keys.
            secret=True,
        )
    )
    request_queue_size: int = field(
        metadata=_declare(
            1024,
            _integer(1, 65535),
            "Listen backlog: connections the kernel queues before sockd accepts them "
            "(capped by net.core.somaxconn).",
        )
    )
    reuse_port: bool = field(
        metadata=_declare(
            False,
            _boolean,
            "Set SO_REUSEPORT so several processes can bind the same address.",
        )
    )
    shutdown_timeout: float = field(
        metadata=_declare(
            30.0,
            _seconds(0, 86400),
            "Seconds a graceful stop waits for in-flight connections before closing them; "
            "sockd exits within this plus 0.5 s.",
        )
    )
    max_connections: int = field(
        metadata=_declare(
            0,
            _integer(0),
            "Concurrent connections served at most; 0 means no limit.",
        )
    )
    on_limit: OnLimit = field(
        metadata=_declare(
            "wait",
            _choice("wait", "refuse"),
            'At max_connections: "wait" leaves new connections in the listen backlog, '
            '"refuse" closes them at once.',
        )
    )
    max_per_ip: int = field(
        metadata=_declare(
            0,
            _integer(0),
            "Concurrent connections from one peer address (IPv6: one prefix); 0 means no limit.",
        )
    )
    rate_per_ip: float = field(
        metadata=_declare(
            0.0,
            _rate,
            "New connections per second one peer address (IPv6: one prefix) may open, "
            "sustained; the excess is closed at once. 0 means no limit.",
        )
    )
    rate_burst: int = field(
        metadata=_declare(
            10,
            _integer(1, 1_000_000),
            "With rate_per_ip: connections a peer may open at once before the rate applies.",
        )
    )
    ipv6_prefix: int = field(
        metadata=_declare(
            64,
            _integer(1, 128),
            "Prefix length that counts as one IPv6 peer for max_per_ip and rate_per_ip.",
        )
    )
    idle_timeout: float = field(
        metadata=_declare(
            0.0,
            _seconds(0, 86400),
            "Close a connection with no data moving either way (received or sent) for this "
            "many seconds; 0 disables.",
        )
    )
    max_connection_duration: float = field(
        metadata=_declare(
            0.0,
            _seconds(0, 31_536_000),
            "Close a connection this many seconds after it was accepted, however busy "
            '(ended="max_duration"; against clients that trickle data forever); 0 disables.',
        )
    )
    allow: tuple[Network, ...] = field(
        metadata=_declare(
            [],
            _networks,
            "CIDR networks allowed to connect; empty allows every peer not denied.",
        )
    )
    deny: tuple[Network, ...] = field(
        metadata=_declare(
            [],
            _networks,
            "CIDR networks refused before the handler runs; deny wins over allow.",
        )
    )
    max_children: int = field(
        metadata=_declare(
            256,
            _integer(1, 65535),
            "Forking mode: child processes at most; further connections wait in the backlog.",
        )
    )
    max_spare_threads: int = field(
        metadata=_declare(
            64,
            _integer(0, 65535),
            "Threading mode: finished connection threads kept (about 60 s) to serve the next "
            "connection instead of starting a thread (most of a short connection's cost); 0 "
            "starts one per connection. Context variables are fresh for every connection, "
            'threading.local state is not (see "Writing a handler" in the README).',
        )
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """The [logging] table: what is logged, how, and where."""

    level: str = field(
        metadata=_declare("info", _choice(*LOG_LEVELS), "Least severe level written.")
    )
    format: LogFormat = field(
        metadata=_declare(
            "json",
            _choice("json", "logfmt", "console"),
            '"json" (one object per line), "logfmt" (key=value) or "console" '
            "(coloured when the output is a terminal).",
        )
    )
    output: str = field(
        metadata=_declare(
            "stdout",
            _log_output,
            '"stdout", "stderr", "journald" or a file path (reopened by sockctl '
            "reopen-logs; a relative path is taken from the config file's directory). A "
            "file must be one sockd's user can append to, or create in an existing "
            "directory: --check-config and a reload refuse one that opening would fail on.",
            file_path=True,
        )
    )
    ring_size: int = field(
        metadata=_declare(
            1000,
            _integer(0, 1_000_000),
            "Recent events kept in memory for sockctl logs.",
        )
    )
    identifier: str = field(
        metadata=_declare(
            "sockd",
            _identifier,
            "SYSLOG_IDENTIFIER of journal entries (journalctl -t NAME); an instance of "
            'sockd@.service sets "sockd-NAME" to match its unit\'s SyslogIdentifier=.',
        )
    )


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The [control] table: the control channel's socket and who may use it."""

    socket: str = field(
        metadata=_declare(
            DEFAULT_CONTROL_SOCKET,
            _socket_path,
            "Path of the control channel's Unix socket (sockctl talks to it); a relative "
            "path is taken from the config file's directory.",
            file_path=True,
        )
    )
    mode: int = field(
        metadata=_declare(
            "0660",
            _file_mode,
            'File mode of the control socket, "0660" or 0o660. With group or read_group '
            "set it must give the group write permission, which connecting needs "
            '("0640" is refused).',
            dump=_octal,
        )
    )
    group: str | None = field(
        metadata=_declare(
            None,
            _optional_group,
            "Group that owns the control socket; its members may use every command.",
            example="sockd",
        )
    )
    read_group: str | None = field(
        metadata=_declare(
            None,
            _optional_group,
            "Group whose members may use the read-only commands (status, connections, logs).",
            example="sockd",
        )
    )
    request_timeout: float = field(
        metadata=_declare(
            10.0,
            _seconds(0.1, 3600),
            "Seconds a control client may take to send its request.",
        )
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole file: each field but ``path`` is a [section] of it, in the file's order."""

    server: ServerConfig
    logging: LoggingConfig
    control: ControlConfig
    path: str | None = field(default=None, compare=False)

    def handler_class(self) -> type[socketserver.BaseRequestHandler]:
        """The configured handler class (already proven importable by validation)."""
        return import_handler(self.server.handler)


def _sections() -> dict[str, Any]:
    """Each [section] of the file and the dataclass its keys fill, from ``Config``'s fields."""
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if f.name != "path"}


_SECTION_TYPES = _sections()
SECTIONS = tuple(_SECTION_TYPES)
SETTINGS: tuple[Setting, ...] = tuple(
    replace(f.metadata[_SETTING], key=f"{section}.{f.name}")
    for section, cls in _SECTION_TYPES.items()
    for f in fields(cls)
)
SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
#: Keys holding a file path: a relative one is taken from the config file's directory.
FILE_PATHS = frozenset(s.key for s in SETTINGS if s.file_path)
#: Keys whose value is a free-form table: their contents are not checked key by key.
FREE_TABLES = frozenset(s.key for s in SETTINGS if s.parse is _table)
#: logging.output's words that are not file names.
_OUTPUT_WORDS = frozenset({"stdout", "stderr", "journald"})


def relative_to_config(value: Any, config_path: str, key: str = "control.socket") -> Any:
    """A relative file path made absolute against the config file's directory.

    Not against the working directory: that is "/" after --daemon, and sockctl, which
    reads control.socket from the same file, runs from anywhere.
    """
    if not isinstance(value, str) or (key == "logging.output" and value in _OUTPUT_WORDS):
        return value
    return protocol.relative_to_config(value, config_path)  # sockctl resolves it the same way


def import_handler(path: str) -> type[socketserver.BaseRequestHandler]:
    """Import ``"package.module:Class"``; raise ``Invalid`` saying why it is unusable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise Invalid(f'expected "package.module:ClassName", got {_q(path)}')
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a config error
        raise Invalid(f"cannot import module {_q(module_name)}: {_q(str(exc))[1:-1]}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise Invalid(f"module {_q(module_name)} has no attribute {_q(attr)}") from None
    if not isinstance(obj, type) or not issubclass(obj, socketserver.BaseRequestHandler):
        raise Invalid(f"{_q(path)} is not a socketserver.BaseRequestHandler subclass")
    return obj


def _check_cross(values: Mapping[str, Any], problems: list[str]) -> None:
    """Rules that involve more than one key."""
    handler = values.get("server.handler")
    options = values.get("server.handler_options")
    if handler is not None and options is not None:
        check = getattr(import_handler(handler), "check_options", None)
        if callable(check):
            try:
                found = check(dict(options))
            except Exception as exc:  # user code: its failure is a config problem
                found = [f"check_options raised {type(exc).__name__}: {exc}"]
            problems.extend(f"server.handler_options: {p}" for p in found or ())
    if values.get("control.group") and values.get("control.group") == values.get(
        "control.read_group"
    ):
        problems.append("control.read_group: must differ from control.group")
    mode = values.get("control.mode")
    group_key = next((k for k in ("control.group", "control.read_group") if values.get(k)), None)
    if mode is not None and group_key is not None and not mode & 0o020:
        # Connecting to a Unix socket needs write permission on it: without the group's
        # write bit the group named to use the channel is locked out, while "other" may
        # still get in (control.mode = "0646"). Refused rather than silently fixed.
        problems.append(
            f"control.mode: 0{mode:o} gives {group_key} no write permission, which "
            f'connecting needs; expected e.g. "0{mode | 0o060:o}"'
        )


def _key(name: str) -> str:
    """A TOML key as written in a dotted path: bare if it can be, else quoted."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    return name if bare else _q(name)


def from_mapping(data: Mapping[str, Any], path: str | None = None) -> Config:
    """Validate a parsed TOML document; raise ``ConfigError`` listing every problem."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in SECTIONS:
            problems.append(f"{_key(key)}: unknown section (expected one of {', '.join(SECTIONS)})")
        elif not isinstance(value, dict):
            problems.append(f"{key}: expected a table, got {_describe(value)}")
    for section in SECTIONS:
        table = data.get(section, {})
        if not isinstance(table, dict):
            continue
        for name in table:
            key = f"{section}.{name}"
            if key not in SETTINGS_BY_KEY:
                known = ", ".join(s.name for s in SETTINGS if s.section == section)
                problems.append(f"{section}.{_key(name)}: unknown key (known keys: {known})")
    for setting in SETTINGS:
        table = data.get(setting.section, {})
        if not isinstance(table, dict):
            continue  # reported once above, not once per key
        raw = table.get(setting.name, setting.default)
        if path is not None and setting.file_path:
            raw = relative_to_config(raw, path, setting.key)
        try:
            values[setting.key] = setting.parse(raw)
        except Invalid as exc:
            problems.append(f"{setting.key}: {exc}")
    _check_cross(values, problems)  # it skips rules whose keys were invalid
    if problems:
        raise ConfigError(problems, path)
    return build(values, path)


def build(values: Mapping[str, Any], path: str | None) -> Config:
    """Assemble the frozen settings objects from validated values."""
    sections = {
        section: cls(**{f.name: values[f"{section}.{f.name}"] for f in fields(cls)})
        for section, cls in _SECTION_TYPES.items()
    }
    return Config(**sections, path=path)


def parse_text(text: str, path: str | None = None) -> Config:
    """Parse TOML text; syntax errors keep tomllib's line and column."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], path) from None
    except (ValueError, RecursionError) as exc:  # digit limit, nesting too deep
        raise ConfigError([f"TOML syntax error: {type(exc).__name__}: {exc}"], path) from None
    return from_mapping(data, path)


def load(path: str) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"], path) from None
    except ValueError as exc:  # a NUL byte in the path
        raise ConfigError([f"cannot read config file: {exc}"], path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file is not UTF-8 (byte {exc.start})"], path) from None
    return parse_text(text, path)


def value_of(config: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The effective config, JSON-ready, in the file's shape."""
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for setting in SETTINGS:
        out[setting.section][setting.name] = setting.dump(value_of(config, setting.key))
    return out


#: What is shown instead of a secret setting's value (or of each value of a secret table).
REDACTED = "<redacted>"


def redact(key: str, shown: Any) -> Any:
    """``key``'s value as dumped (``Setting.dump``), as someone not trusted with secrets
    may see it: unchanged unless the setting is declared ``secret``. A secret table
    keeps its keys (which options are set is not the secret), each value replaced."""
    setting = SETTINGS_BY_KEY.get(key)
    if setting is None or not setting.secret:
        return shown
    if isinstance(shown, Mapping):
        return dict.fromkeys(shown, REDACTED)
    return REDACTED


def redact_config(config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``to_dict``'s shape with every secret setting's value ``redact``-ed."""
    return {
        section: {name: redact(f"{section}.{name}", value) for name, value in table.items()}
        for section, table in config.items()
    }


def redact_changes(changes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``Change.as_dict`` entries with the old and new values of secret settings hidden."""
    return [
        {**change, "old": redact(key, change["old"]), "new": redact(key, change["new"])}
        for change in changes
        for key in (str(change["key"]),)
    ]


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    old: Any
    new: Any

    def as_dict(self) -> dict[str, Any]:
        """Old and new written as GET /v1/config shows them (secrets included: see
        ``redact_changes`` for what others may see)."""
        dump = SETTINGS_BY_KEY[self.key].dump
        return {"key": self.key, "old": dump(self.old), "new": dump(self.new)}


def diff(old: Config, new: Config) -> list[Change]:
    """Keys whose value differs between two configs, in declaration order."""
    return [
        Change(s.key, value_of(old, s.key), value_of(new, s.key))
        for s in SETTINGS
        if value_of(old, s.key) != value_of(new, s.key)
    ]


def defaults() -> Config:
    """The configuration an empty file gives."""
    return from_mapping({})


def describe_problems(error: ConfigError) -> Sequence[str]:
    """One line per problem, prefixed with the file, for terminals and logs."""
    where = f"{error.path}: " if error.path else ""
    return [f"{where}{problem}" for problem in error.problems]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if value else "0"
    return str(value)


def reference_table() -> str:
    """The README's settings reference, generated from ``SETTINGS``."""
    rows = ["| key | default | reload | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = "(none)" if s.default is None else _toml(s.default)
        live = "live" if s.live else "restart"
        rows.append(f"| `{s.key}` | `{default}` | {live} | {s.doc} |")
    return "\n".join(rows) + "\n"


#: The keys etc/sockd.toml sets, written as in the file: what the README's quick start
#: relies on. Every other key appears there commented out with its default.
EXAMPLE_VALUES: Mapping[str, Any] = {
    "server.listen": ["127.0.0.1:9000"],
    "server.handler": "sockd.handlers:EchoHandler",
    "logging.format": "console",  # the default, "json", is for machines
    "control.socket": DEFAULT_CONTROL_SOCKET,
}

_EXAMPLE_HEADER = """\
# sockd configuration, as the README's quick start runs it: the keys set below give an
# echo service on 127.0.0.1:9000 with logs on the terminal and the control socket at
# /run/sockd/control.sock. Every other key is commented out with its default, each under
# a comment saying what it does.
#
# Validate with: sockd --check-config --config PATH   (or: sockctl check PATH)
# Apply changes without dropping a connection: sockctl reload  (or SIGHUP)
# Generated by scripts/update_readme_tables.py from the declarations in sockd/config.py."""


def _comment(text: str) -> str:
    return textwrap.fill(
        text,
        width=88,
        initial_indent="# ",
        subsequent_indent="# ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _example_key(setting: Setting) -> str:
    """A key's doc comment, then the key: set if the example sets it, else commented out."""
    if setting.key in EXAMPLE_VALUES:
        line = f"{setting.name} = {_toml(EXAMPLE_VALUES[setting.key])}"
    elif setting.default is None:  # TOML cannot write "unset": show what a value looks like
        return f"{_comment(setting.doc + ' Unset by default.')}\n# {setting.name} = " + _toml(
            setting.example
        )
    else:
        line = f"# {setting.name} = {_toml(setting.default)}"
    return f"{_comment(setting.doc)}\n{line}"


def _example_table(setting: Setting) -> str:
    """A free-form table as its own [section.key], after the section's other keys (TOML
    gives every key after a header to that table); its entries set or shown as examples."""
    if setting.key in EXAMPLE_VALUES:
        entries = [f"{_key(k)} = {_toml(v)}" for k, v in EXAMPLE_VALUES[setting.key].items()]
    else:
        shown = setting.example or setting.default
        entries = [f"# {_key(k)} = {_toml(v)}" for k, v in shown.items()]
    return "\n".join([f"[{setting.key}]", _comment(setting.doc), *entries])


def example_toml() -> str:
    """etc/sockd.toml, generated from ``SETTINGS`` and ``EXAMPLE_VALUES``."""
    parts = [_EXAMPLE_HEADER]
    for section in SECTIONS:
        settings = [s for s in SETTINGS if s.section == section]
        keys = "\n\n".join(_example_key(s) for s in settings if s.key not in FREE_TABLES)
        parts.append(f"[{section}]\n{keys}")
        parts.extend(_example_table(s) for s in settings if s.key in FREE_TABLES)
    return "\n\n".join(parts) + "\n"
