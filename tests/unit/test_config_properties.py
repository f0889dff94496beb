"""Hostile-input properties of config loading: any document or file gives a Config or a ConfigError.

The documents are arbitrary TOML (every scalar type, datetimes, nested tables) whose
section and key names are the real ones (``sockd.config.SETTINGS``) much of the time,
so each validator sees wrong types and out-of-range values, not only unknown keys.
Hypothesis runs derandomized and without an example database, so CI is reproducible;
set ``SOCKD_FUZZ_SCALE`` (a multiplier of the example counts) for a longer local run
and ``SOCKD_FUZZ_RANDOM=1`` to explore beyond the fixed examples.
"""

from __future__ import annotations

import datetime as dt
import grp
import json
import math
import os
import string
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sockd.config import (
    LOG_LEVELS,
    SECTIONS,
    SETTINGS,
    Config,
    Setting,
    from_mapping,
    load,
    parse_text,
    to_dict,
)
from sockd.errors import ConfigError

SCALE = float(os.environ.get("SOCKD_FUZZ_SCALE", "1"))
#: Reproducible: the same examples on every run, nothing remembered between runs.
PROPERTIES = settings(
    # Reproducible by default; SOCKD_FUZZ_RANDOM=1 explores new examples (a failure prints
    # a @reproduce_failure blob to pin it).
    derandomize=not os.environ.get("SOCKD_FUZZ_RANDOM"),
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    return settings(PROPERTIES, max_examples=max(1, int(n * SCALE)))


# --------------------------------------------------------------------------- TOML values

BARE_KEY = frozenset(string.ascii_letters + string.digits + "_-")


def toml_string(text: str) -> str:
    """A TOML basic string: escapes quotes, backslashes and every control character."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if key and set(key) <= BARE_KEY else toml_string(key)


def toml_inline(value: Any) -> str:
    """Any TOML-able value as an inline TOML value (one line, whatever it contains)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # 'inf', '-inf', '1e+16' and '-0.0' are all valid TOML
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_inline(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"not TOML-able: {value!r}")


def render(document: dict[str, Any]) -> str:
    """A TOML document: scalars first, then each table as a ``[header]`` section."""
    lines = [f"{toml_key(k)} = {toml_inline(v)}" for k, v in document.items() if not _is_table(v)]
    for key, value in document.items():
        if _is_table(value):
            lines.append(f"[{toml_key(key)}]")
            lines.extend(f"{toml_key(k)} = {toml_inline(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


timezones = st.one_of(
    st.just(dt.UTC),
    st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m))),
)
# fold=1 is invisible in TOML (and in isoformat()): generate what TOML can express.
datetimes = st.datetimes(timezones=st.none() | timezones).map(lambda d: d.replace(fold=0))
times = st.times().map(lambda t: t.replace(fold=0))
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),  # nan and infinities included: TOML has them
    st.text(max_size=20),
    datetimes,
    st.dates(),
    times,
)
keys = st.text(max_size=8)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=6,
)
non_tables = st.one_of(toml_scalars, st.lists(toml_values, max_size=3))
non_strings = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    datetimes,
    st.lists(toml_values, max_size=3),
    st.dictionaries(keys, toml_values, max_size=3),
)


# --------------------------------------------------------------------------- per-setting values

ports = st.integers(0, 65535)
octet = st.integers(0, 255)
ipv4_address = st.builds("{}.{}.{}.{}".format, octet, octet, octet, octet)
ipv6_address = st.one_of(
    st.sampled_from(["::", "::1", "fe80::1%eth0", "::ffff:10.0.0.1", "2001:db8::"]),
    st.lists(st.integers(0, 0xFFFF).map("{:x}".format), min_size=8, max_size=8).map(":".join),
)
good_address = st.one_of(
    st.builds("{}:{}".format, ipv4_address, ports),
    st.builds("[{}]:{}".format, ipv6_address, ports),
    st.builds("{}:{}".format, st.sampled_from(["localhost", "example.org", "0.0.0.0"]), ports),
)
any_address = st.one_of(
    good_address,
    st.sampled_from(
        [
            "localhost",
            "127.0.0.1:99999",
            ":80",
            "[::1]80",
            "[nope]:1",
            "::1:80",
            "1.2.3.4:-1",
            "1.2.3.4:²",
            "1.2.3.4:٣",
            "h:" + "0" * 5000,
            "",
        ]
    ),
    st.text(max_size=20),
)
networks = st.one_of(
    st.builds("{}/{}".format, ipv4_address, st.integers(0, 32)),
    st.builds("{}/{}".format, ipv6_address, st.integers(0, 128)),
    ipv4_address,
)
any_network = st.one_of(networks, st.sampled_from(["10.0.0.0/33", "x/8", "", "::/129"]), keys)
#: Handler paths: importable on purpose. Random module names would make validation
#: import whatever they happen to name (``this`` prints, ``antigravity`` opens a browser).
valid_handlers = st.sampled_from(
    [
        "sockd.handlers:EchoHandler",
        "sockd.handlers:JSONActionHandler",
        "socketserver:StreamRequestHandler",
        "socketserver:BaseRequestHandler",
    ]
)
invalid_handlers = st.one_of(
    st.sampled_from(
        [
            "sockd.handlers",
            "sockd.handlers:",
            ":EchoHandler",
            "sockd.handlers:NoSuchClass",
            "sockd.handlers:EchoHandler.handle",
            "sockd.handlers:action",
            "json:JSONDecoder",
            "..handlers:EchoHandler",
            ".handlers:X",
            "\x00:X",
            "sockd.handlers:EchoHandler\n",
            "sockd.handlers:EchoHandler.__mro__",
        ]
    ),
    st.builds(
        "zz_nosuch_{}:{}".format,
        st.text("abc.", min_size=1, max_size=6),
        st.text("AB_.", max_size=6),
    ),
)
seconds = st.one_of(st.integers(-10, 100_000), st.floats(-10, 100_000), st.floats(allow_nan=True))
modes = st.one_of(
    st.sampled_from(["0660", "0600", "0777", "0", "0800", "0o660", "660x", "", "0" * 500]),
    st.integers(-1, 0o1000),
)
outputs = st.sampled_from(
    ["stdout", "stderr", "journald", "/tmp/sockd-fuzz.log", "/no/such/dir/x.log", "rel.log", ""]
)


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


groups = st.sampled_from(["", "adm", "staff", "root", "0", "no-such-group"])
#: Groups this machine has (a config naming a missing group is invalid).
existing_groups = st.sampled_from(
    [g for g in ["", "adm", "staff", "root", "0"] if not g or g.isdigit() or _has_group(g)]
)
socket_paths = st.one_of(
    st.sampled_from(["/tmp/sockd-fuzz.sock", "ctl.sock", "", "/" + "s" * 107, "/" + "é" * 60]),
    st.text(max_size=20),
)

#: For each key: values that validate, and values of any kind (mostly wrong).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "server.listen": st.lists(good_address, min_size=1, max_size=3, unique=True),
    "server.mode": st.sampled_from(["threading", "forking"]),
    "server.handler": valid_handlers,
    "server.handler_options": st.dictionaries(keys, toml_values, max_size=4),
    "server.request_queue_size": st.integers(1, 65535),
    "server.reuse_port": st.booleans(),
    "server.shutdown_timeout": st.one_of(st.integers(0, 86400), st.floats(0, 86400)),
    "server.max_connections": st.integers(0, 2**63 - 1),
    "server.on_limit": st.sampled_from(["wait", "refuse"]),
    "server.max_per_ip": st.integers(0, 10**6),
    "server.rate_per_ip": st.one_of(st.integers(0, 1000), st.floats(0, 1000)),
    "server.rate_burst": st.integers(1, 1000),
    "server.ipv6_prefix": st.integers(1, 128),
    "server.idle_timeout": st.one_of(st.integers(0, 86400), st.floats(0, 86400)),
    "server.max_connection_duration": st.one_of(st.integers(0, 86400), st.floats(0, 86400)),
    "server.allow": st.lists(networks, max_size=3),
    "server.deny": st.lists(networks, max_size=3),
    "server.max_children": st.integers(1, 65535),
    "server.max_spare_threads": st.integers(0, 65535),
    "logging.level": st.sampled_from(LOG_LEVELS),
    "logging.format": st.sampled_from(["json", "logfmt", "console"]),
    "logging.output": st.sampled_from(["stdout", "stderr", "journald", "/tmp/sockd-fuzz.log"]),
    "logging.ring_size": st.integers(0, 1_000_000),
    "logging.identifier": st.sampled_from(["sockd", "sockd-alpha", "x" * 64]),
    "control.socket": st.sampled_from(["/tmp/sockd-fuzz.sock", "ctl.sock", "/" + "s" * 106]),
    # The group's write bit: with control.group set, a mode without it is refused.
    "control.mode": st.one_of(
        st.sampled_from(["0660", "0620", "020", "777"]),
        st.integers(0, 0o777).map(lambda m: m | 0o020),
    ),
    "control.group": existing_groups,
    "control.read_group": st.just(""),  # may not equal control.group
    "control.request_timeout": st.one_of(st.integers(1, 3600), st.floats(0.1, 3600)),
}
ANY: dict[str, st.SearchStrategy[Any]] = {
    "server.listen": st.lists(any_address, max_size=3) | non_tables,
    "server.mode": st.sampled_from(["threading", "forking", "forked", "", "THREADING"]),
    "server.handler": valid_handlers | invalid_handlers | non_strings,
    # max_line_bytes reaches JSONActionHandler.check_options with every kind of value
    "server.handler_options": st.dictionaries(
        st.just("max_line_bytes") | keys, toml_values, max_size=3
    )
    | toml_values,
    "server.allow": st.lists(any_network, max_size=3) | toml_values,
    "server.deny": st.lists(any_network, max_size=3) | toml_values,
    "server.shutdown_timeout": seconds,
    "server.idle_timeout": seconds,
    "server.max_connection_duration": seconds,
    "control.request_timeout": seconds,
    "logging.level": st.sampled_from([*LOG_LEVELS, "loud", "INFO", ""]),
    "logging.output": outputs,
    "logging.identifier": st.sampled_from(["", "two words", "x" * 65, "tab\there", "sockd-b"]),
    "control.socket": socket_paths,
    "control.mode": modes,
    "control.group": groups,
    "control.read_group": groups,
}
for _setting in SETTINGS:
    ANY[_setting.key] = st.one_of(
        VALID.get(_setting.key, st.nothing()), ANY.get(_setting.key, st.nothing()), toml_values
    )
    if _setting.key == "server.handler":  # see invalid_handlers: no random module names
        ANY[_setting.key] = valid_handlers | invalid_handlers | non_strings


def settings_of(section: str) -> list[Setting]:
    return [s for s in SETTINGS if s.section == section]


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Any TOML document, shaped like a sockd config often enough to reach every validator."""
    document: dict[str, Any] = {}
    for section in SECTIONS:
        shape = draw(st.sampled_from(["absent", "table", "table", "table", "not a table"]))
        if shape == "absent":
            continue
        if shape == "not a table":
            document[section] = draw(non_tables)
            continue
        table: dict[str, Any] = {}
        for setting in settings_of(section):
            if draw(st.booleans()):
                table[setting.name] = draw(ANY[setting.key])
        table.update(draw(st.dictionaries(keys, toml_values, max_size=1)))
        document[section] = table
    document.update(draw(st.dictionaries(keys, toml_values, max_size=1)))
    return document


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A document that must validate: real keys only, each with a value its validator accepts."""
    document: dict[str, Any] = {}
    for section in SECTIONS:
        if not draw(st.booleans()):
            continue
        document[section] = {
            s.name: draw(VALID[s.key]) for s in settings_of(section) if draw(st.booleans())
        }
    return document


# --------------------------------------------------------------------------- the checks

SPECIAL_PREFIXES = ("TOML syntax error", "cannot read", "config file is not UTF-8")


def path_key(name: str) -> str:
    """A key as a dotted path writes it: bare if TOML allows, else quoted (so it stays one line)."""
    return name if name and set(name) <= BARE_KEY else json.dumps(name, ensure_ascii=False)


def key_paths(document: Any) -> set[str]:
    """Every key path a problem about ``document`` may begin with."""
    paths = {s.key for s in SETTINGS} | set(SECTIONS)
    if isinstance(document, dict):
        paths |= {path_key(name) for name in document}
        for section in SECTIONS:
            table = document.get(section)
            if isinstance(table, dict):
                paths |= {f"{section}.{path_key(name)}" for name in table}
    return paths


def check_problems(error: ConfigError, document: Any) -> None:
    """Problems are non-empty strings, each naming a key path of the document (or a file issue)."""
    assert error.problems, "a ConfigError must list at least one problem"
    allowed = tuple(f"{path}: " for path in key_paths(document))
    for problem in error.problems:
        assert isinstance(problem, str)
        assert problem.strip(), "an empty problem"
        assert problem.startswith(allowed) or problem.startswith(SPECIAL_PREFIXES), problem
        assert "Traceback" not in problem


#: What ends a line on a terminal, in journald or for `grep`: LF, CR, VT and FF.
LINE_BREAKS = frozenset("\n\r\x0b\x0c")


def is_one_line(text: str) -> bool:
    return not LINE_BREAKS & set(text)


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to itself (TOML can carry NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def without_none(dumped: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``to_dict`` writes unset optional keys as None, which TOML cannot express."""
    return {s: {k: v for k, v in t.items() if v is not None} for s, t in dumped.items()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One directory for the files the properties write (module-scoped: Hypothesis reruns)."""
    yield tmp_path_factory.mktemp("config-properties")


# --------------------------------------------------------------------------- tests


@examples(100)
@given(document=documents())
def test_generated_documents_are_faithful_toml(document: dict[str, Any]) -> None:
    """The generator's TOML text parses back to exactly the document it was rendered from."""
    assert same(tomllib.loads(render(document)), document)


@examples(300)
@example(document={"control": {"socket": "ctl.sock"}})
@given(document=documents())
def test_any_document_gives_config_or_config_error(document: dict[str, Any]) -> None:
    """Any TOML document gives a Config or a ConfigError naming keys; nothing else escapes."""
    text = render(document)
    try:
        config = parse_text(text, "fuzz.toml")
    except ConfigError as error:
        event("invalid")
        check_problems(error, document)
        assert error.path == "fuzz.toml"
        with pytest.raises(ConfigError) as again:
            from_mapping(document, "fuzz.toml")
        assert again.value.problems == error.problems  # text and mapping agree
        return
    event("valid")
    assert isinstance(config, Config)
    # The same path: relative file paths are taken from the config file's directory.
    assert from_mapping(document, "fuzz.toml") == config


@examples(200)
@example(document={"server": {"mode": "a\nb"}})
@example(document={"x\ny": 1, "server": {"a\rb": 1, "allow": ["\x0c"], "handler": "a\x0b:b"}})
@given(document=documents())
def test_every_problem_is_one_line(document: dict[str, Any]) -> None:
    """Each problem is a single line, whatever characters the offending key or value holds."""
    try:
        parse_text(render(document))
    except ConfigError as error:
        for problem in error.problems:
            assert is_one_line(problem), repr(problem)


@examples(200)
@given(document=valid_documents())
@example(document={"server": {"handler_options": {"": math.nan}}})
def test_valid_configs_round_trip(document: dict[str, Any]) -> None:
    """A valid config survives to_dict -> from_mapping, and to_dict -> TOML text -> parse_text."""
    config = from_mapping(document)
    dumped = to_dict(config)
    # Compared by repr: handler_options may hold nan, which never equals itself.
    assert repr(from_mapping(dumped)) == repr(config)
    assert repr(parse_text(render(without_none(dumped)))) == repr(config)
    assert repr(to_dict(from_mapping(dumped))) == repr(dumped)


@examples(150)
@example(handler="sockd.handlers:EchoHandler", limit=math.nan)
@given(
    handler=st.sampled_from(["sockd.handlers:JSONActionHandler", "sockd.handlers:EchoHandler"]),
    limit=toml_values | st.integers(-5, 5),
)
def test_handler_options_are_checked_by_the_handler(handler: str, limit: Any) -> None:
    """A handler's check_options turns a bad option into a server.handler_options problem."""
    document = {"server": {"handler": handler, "handler_options": {"max_line_bytes": limit}}}
    usable = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    try:
        config = parse_text(render(document))
    except ConfigError as error:
        check_problems(error, document)
        assert handler.endswith("JSONActionHandler") and not usable
        assert [p for p in error.problems if p.startswith("server.handler_options: ")]
        return
    assert usable or handler.endswith("EchoHandler")
    assert same(config.server.handler_options, {"max_line_bytes": limit})  # NaN included


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, delete count, insertion) edits, positions taken modulo the length."""
    for position, delete, insert in edits:
        at = position % (len(data) + 1)
        data = data[:at] + insert + data[at + delete :]
    return data


raw_files = st.one_of(
    st.binary(max_size=600),
    st.builds(
        mutate,
        documents().map(lambda d: render(d).encode()),
        st.lists(
            st.tuples(
                st.integers(0, 10**6),
                st.integers(0, 4),
                st.binary(max_size=4) | st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\r", b"["]),
            ),
            max_size=3,
        ),
    ),
    st.sampled_from(
        [
            b"\xef\xbb\xbf[server]\n",  # a byte-order mark
            b"\xff\xfe[\x00s\x00]\x00",  # UTF-16
            b"[server]\nmode = 'threading'\r\n",
            b"[server]\r\nmode = 'threading'\r",  # a lone CR is not a TOML newline
            b"[server]\nlisten = [" * 200,
            b"a = " + b"[" * 300 + b"]" * 300,
            b"a = " + b"[" * 2000 + b"]" * 2000,  # deeper than tomllib's recursion allows
            b"a = " + b"{b = " * 1000 + b"1" + b"}" * 1000,
            b"x = " + b"9" * 4300,
            b"x = " + b"9" * 4301,  # past Python's int() digit limit
            b"x = 0x" + b"f" * 5000,
            b"x = 1" + b"0" * 5000 + b".5",
        ]
    ),
)


@examples(300)
@given(raw=raw_files)
def test_any_file_gives_config_or_config_error(scratch: Path, raw: bytes) -> None:
    """Any bytes in a loaded file give a Config or a ConfigError; nothing else escapes."""
    path = scratch / "fuzz.toml"
    path.write_bytes(raw)
    try:
        text = raw.decode("utf-8")
        document: Any = tomllib.loads(text)
    # UnicodeDecodeError and TOMLDecodeError are ValueErrors, and so is int()'s digit limit.
    except (ValueError, RecursionError):
        document = None
    try:
        config = load(str(path))
    except ConfigError as error:
        event("invalid")
        check_problems(error, document)
        assert error.path == str(path)
        if document is None:
            assert len(error.problems) == 1
            assert error.problems[0].startswith(("TOML syntax error", "config file is not UTF-8"))
        return
    event("valid")
    assert isinstance(config, Config)
    assert config.path == str(path)
    assert document is not None


@examples(200)
@given(text=st.text(max_size=300))
def test_any_text_gives_config_or_config_error(text: str) -> None:
    """Arbitrary Unicode text is a Config or a ConfigError, never another exception."""
    try:
        document: Any = tomllib.loads(text)
    except (ValueError, RecursionError):  # TOMLDecodeError, or int()'s digit limit
        document = None
    try:
        parse_text(text)
    except ConfigError as error:
        check_problems(error, document)
        if document is None:
            assert error.problems[0].startswith("TOML syntax error")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"a = " + b"[" * 2000 + b"]" * 2000, id="arrays"),
        pytest.param(b"a = " + b"{b = " * 1000 + b"1" + b"}" * 1000, id="inline-tables"),
        pytest.param(b"[server]\nhandler_options = " + b"[" * 2000, id="unclosed"),
    ],
)
def test_deeply_nested_toml_is_a_config_error(scratch: Path, raw: bytes) -> None:
    """TOML nested deeper than the parser's recursion allows is a ConfigError, not a crash."""
    path = scratch / "deep.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert caught.value.problems[0].startswith("TOML syntax error")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"x = " + b"9" * 4301, id="top-level"),
        pytest.param(b"[server.handler_options]\nn = -" + b"1" * 5000, id="handler-option"),
    ],
)
def test_integer_past_the_digit_limit_is_a_config_error(scratch: Path, raw: bytes) -> None:
    """An integer too long for Python's int() conversion is a ConfigError, not a ValueError."""
    path = scratch / "digits.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert len(caught.value.problems) == 1


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path_is_cannot_read(scratch: Path, kind: str) -> None:
    """A missing file or a directory is a one-problem ConfigError saying it cannot be read."""
    path = scratch / kind
    if kind == "directory":
        path.mkdir(exist_ok=True)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("cannot read config file: ")
    assert is_one_line(caught.value.problems[0])


def test_path_with_nul_is_cannot_read(scratch: Path) -> None:
    """A path that the OS cannot even represent is reported as a ConfigError, not a ValueError."""
    with pytest.raises(ConfigError) as caught:
        load(str(scratch / "a\x00b.toml"))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("cannot read config file: ")
    assert is_one_line(caught.value.problems[0])


def test_valid_documents_really_cover_every_setting() -> None:
    """The valid-value table names exactly the declared settings (a new setting must be added)."""
    assert set(VALID) == {s.key for s in SETTINGS}
