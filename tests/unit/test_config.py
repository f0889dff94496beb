"""Config validation, diffing, and the docs that must agree with the one declaration."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

import pytest

from sockd import config
from sockd.config import Address, ConfigError, diff, from_mapping, load, parse_text

REPO = Path(__file__).resolve().parents[2]


def problems_of(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    return info.value.problems


def test_empty_file_gives_production_defaults() -> None:
    """An empty config is valid and its defaults fit production (backlog well above 5)."""
    cfg = from_mapping({})
    assert cfg.server.listen == (Address("127.0.0.1", 9000),)
    assert cfg.server.mode == "threading"
    assert cfg.server.request_queue_size >= 128
    assert cfg.server.shutdown_timeout == 30.0
    assert cfg.control.socket == "/run/sockd/control.sock"
    assert cfg.control.mode == 0o660


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9000", Address("127.0.0.1", 9000)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("[::1]:9000", Address("::1", 9000)),
        ("[::]:80", Address("::", 80)),
        ("localhost:8080", Address("localhost", 8080)),
    ],
)
def test_address_parsing(text: str, expected: Address) -> None:
    """host:port and [v6]:port parse, and print back the same way."""
    assert Address.parse(text) == expected
    assert str(Address.parse(text)) == text


@pytest.mark.parametrize(
    "text", ["9000", "::1:9000", "[::1]9000", "[nope]:1", "h:70000", "h:x", ":80", "256.1.1.1:80"]
)
def test_bad_addresses_are_refused(text: str) -> None:
    """Unparsable addresses raise ValueError with a reason."""
    with pytest.raises(ValueError, match=r".+"):
        Address.parse(text)


def test_a_section_that_is_not_a_table_is_one_problem() -> None:
    """server = 5 is reported once, not once for every key of the section."""
    assert problems_of({"server": 5}) == ["server: expected a table, got 5"]


def test_every_problem_is_reported_at_once() -> None:
    """Several mistakes give several problems, each with its dotted key."""
    problems = problems_of(
        {
            "server": {"mode": "forked", "listen": "127.0.0.1:9000", "reuse_port": "yes"},
            "logging": {"level": 3},
            "extra": {},
        }
    )
    joined = "\n".join(problems)
    assert 'server.mode: expected "threading" or "forking", got "forked"' in joined
    assert "server.listen: expected an array of strings" in joined
    assert "server.reuse_port: expected true or false" in joined
    assert "logging.level: expected" in joined
    assert "extra: unknown section" in joined
    assert len(problems) == 5


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            {"server": {"request_queue_size": 0}},
            "server.request_queue_size: expected an integer from 1",
        ),
        (
            {"server": {"request_queue_size": True}},
            "server.request_queue_size: expected an integer, got true",
        ),
        ({"server": {"shutdown_timeout": -1}}, "server.shutdown_timeout: expected seconds from 0"),
        ({"server": {"handler": "nomodule_xyz:H"}}, 'cannot import module "nomodule_xyz"'),
        ({"server": {"handler": "sockd.handlers:Nope"}}, 'has no attribute "Nope"'),
        ({"server": {"handler": "sockd.handlers"}}, 'expected "package.module:ClassName"'),
        ({"server": {"handler": "json:JSONDecoder"}}, "not a socketserver.BaseRequestHandler"),
        ({"server": {"listen": []}}, "at least one"),
        ({"server": {"listen": ["1.2.3.4:1", "1.2.3.4:1"]}}, "listed twice"),
        ({"server": {"allow": ["10.0.0.0/33"]}}, "server.allow: expected CIDR"),
        ({"server": {"on_limit": "drop"}}, 'server.on_limit: expected "wait" or "refuse"'),
        ({"server": {"handler_options": 3}}, "server.handler_options: expected a table"),
        ({"server": {"bogus": 1}}, "server.bogus: unknown key"),
        ({"logging": {"output": "/no/such/dir/log"}}, "logging.output:"),
        ({"control": {"mode": "0999"}}, "control.mode: expected a file mode"),
        ({"control": {"socket": "/x" * 60}}, "control.socket: a Unix socket path must be at most"),
        ({"control": {"group": "root", "read_group": "root"}}, "control.read_group: must differ"),
        ({"control": {"group": "no-such-group-x"}}, "control.group: no such group"),
        (
            {"server": {"deny": ["10.0.0.0/8", 5, "x"]}},
            "server.deny: expected an array of strings: item 2 is 5",
        ),
        (
            {"server": {"allow": ["10.0.0.0/33", "garbage"]}},
            'server.allow: expected CIDR networks like "10.0.0.0/8", got "10.0.0.0/33", "garbage"',
        ),
        ({"server": 5}, "server: expected a table"),
        ({"server": {"max_spare_threads": -1}}, "server.max_spare_threads: expected an integer"),
        ({"logging": {"identifier": "my sockd"}}, "logging.identifier: expected at most 64"),
        ({"logging": {"identifier": ""}}, "logging.identifier: expected a non-empty string"),
    ],
)
def test_each_problem_names_key_and_expectation(data: dict[str, object], fragment: str) -> None:
    """Each kind of mistake is explained with its key and what was expected."""
    assert any(fragment in p for p in problems_of(data)), problems_of(data)


def test_control_mode_accepts_octal_string_and_integer() -> None:
    """control.mode takes "0640" or 0o640."""
    assert from_mapping({"control": {"mode": "0640"}}).control.mode == 0o640
    assert parse_text("[control]\nmode = 0o600\n").control.mode == 0o600


def test_networks_are_parsed() -> None:
    """allow/deny hold ip_network objects (host bits tolerated)."""
    cfg = from_mapping({"server": {"deny": ["10.1.2.3/8", "::1/128"]}})
    assert cfg.server.deny == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


def test_toml_syntax_error_keeps_position() -> None:
    """tomllib's line and column survive into the error."""
    with pytest.raises(ConfigError, match="line 2, column 8"):
        parse_text("[server]\nmode = forking\n")


def test_diff_lists_changed_keys_in_declaration_order() -> None:
    """diff() names exactly the keys whose value changed."""
    old = from_mapping({})
    new = from_mapping({"server": {"mode": "forking"}, "logging": {"level": "debug"}})
    assert [c.key for c in diff(old, new)] == ["server.mode", "logging.level"]
    assert diff(old, from_mapping({})) == []
    assert diff(old, new)[0].as_dict() == {
        "key": "server.mode",
        "old": "threading",
        "new": "forking",
    }


def test_to_dict_round_trips_through_validation() -> None:
    """The effective config dump is itself a valid config giving the same settings."""
    cfg = from_mapping({"server": {"allow": ["10.0.0.0/8"], "listen": ["[::1]:1"]}})
    assert from_mapping(config.to_dict(cfg)) == cfg


def test_example_config_matches_declaration() -> None:
    """etc/sockd.toml is exactly what the declarations generate (run
    scripts/update_readme_tables.py after changing a setting)."""
    assert (REPO / "etc" / "sockd.toml").read_text() == config.example_toml()


def test_example_config_is_the_quick_start_and_every_other_key_its_default() -> None:
    """etc/sockd.toml serves the echo handler on 127.0.0.1:9000 with console logs and the
    default control socket, leaves every other key at its default, and shows each key
    under a comment."""
    text = config.example_toml()
    cfg = from_mapping(tomllib.loads(text))
    assert cfg.server.listen == (Address("127.0.0.1", 9000),)
    assert cfg.server.handler == "sockd.handlers:EchoHandler"
    assert (cfg.logging.format, cfg.logging.output) == ("console", "stdout")
    assert cfg.control.socket == "/run/sockd/control.sock"
    changed = {c.key for c in diff(config.defaults(), cfg)}
    assert changed == {"logging.format"}  # the other set keys restate their defaults
    assert set(config.EXAMPLE_VALUES) <= {s.key for s in config.SETTINGS}
    for setting in config.SETTINGS:
        if setting.key in config.FREE_TABLES:
            assert f"\n[{setting.key}]\n# " in text
            continue
        commented = "" if setting.key in config.EXAMPLE_VALUES else "# "
        pattern = rf"^# [^\n]*\n{commented}{re.escape(setting.name)} = "
        assert re.search(pattern, text, re.MULTILINE), f"{setting.key} not shown as declared"


def test_settings_are_the_section_dataclasses_fields() -> None:
    """Each field of a section dataclass is one declared key, in the file's order."""
    from dataclasses import fields

    declared = [
        f"{section}.{f.name}"
        for section, cls in [
            ("server", config.ServerConfig),
            ("logging", config.LoggingConfig),
            ("control", config.ControlConfig),
        ]
        for f in fields(cls)
    ]
    assert [s.key for s in config.SETTINGS] == declared
    assert config.SECTIONS == ("server", "logging", "control")


def test_control_mode_is_shown_as_written_in_the_file() -> None:
    """control.mode reads "0660" in the effective config, the reload diff and the table."""
    old, new = from_mapping({}), from_mapping({"control": {"mode": 0o600}})
    assert config.to_dict(old)["control"]["mode"] == "0660"
    assert [c.as_dict() for c in diff(old, new)] == [
        {"key": "control.mode", "old": "0660", "new": "0600"}
    ]
    assert '| `control.mode` | `"0660"` |' in config.reference_table()


def test_readme_reference_table_matches_declaration() -> None:
    """The README's settings table is exactly what SETTINGS generates."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block == config.reference_table()


def test_handler_check_options_problems_are_config_errors() -> None:
    """A handler's check_options() findings become server.handler_options errors."""
    problems = problems_of({"server": {"handler": "tests.handlers:Picky"}})
    assert problems == [
        'server.handler_options: root: expected a directory path, e.g. root = "/srv/files"'
    ]
    ok = from_mapping(
        {"server": {"handler": "tests.handlers:Picky", "handler_options": {"root": "/srv"}}}
    )
    assert ok.server.handler_options == {"root": "/srv"}


def test_json_action_handler_checks_max_line_bytes() -> None:
    """JSONActionHandler rejects a max_line_bytes that is not a positive integer."""
    problems = problems_of(
        {
            "server": {
                "handler": "tests.handlers:Calculator",
                "handler_options": {"max_line_bytes": 0},
            }
        }
    )
    assert problems == [
        "server.handler_options: max_line_bytes: expected a positive integer, got 0"
    ]


def test_readme_event_table_matches_declaration() -> None:
    """The README's log event table is exactly what sockd.logs.EVENTS generates."""
    from sockd.logs import events_table

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- events:begin -->\n", 1)[1].split("<!-- events:end -->", 1)[0]
    assert block == events_table()


def test_relative_file_paths_are_taken_from_the_config_directory(tmp_path: Path) -> None:
    """control.socket and logging.output relative to the config file, not the working
    directory (which --daemon changes to "/" and sockctl does not share)."""
    (tmp_path / "logs").mkdir()
    path = tmp_path / "sockd.toml"
    path.write_text('[control]\nsocket = "c.sock"\n[logging]\noutput = "logs/s.log"\n')
    config = load(str(path))
    assert config.control.socket == str(tmp_path / "c.sock")
    assert config.logging.output == str(tmp_path / "logs" / "s.log")
    path.write_text('[logging]\noutput = "stderr"\n[control]\nsocket = "/run/x.sock"\n')
    config = load(str(path))
    assert (config.logging.output, config.control.socket) == ("stderr", "/run/x.sock")
    path.write_text('[logging]\noutput = "nodir/s.log"\n')
    assert any(str(tmp_path / "nodir") in p for p in problems_of_file(path))


def problems_of_file(path: Path) -> list[str]:
    try:
        load(str(path))
    except ConfigError as exc:
        return exc.problems
    return []


def test_one_invalid_key_does_not_hide_a_handler_options_problem() -> None:
    """Rules involving several keys still run when an unrelated key is invalid."""
    problems = problems_of(
        {
            "server": {
                "handler": "sockd.handlers:JSONActionHandler",
                "handler_options": {"max_line_bytes": 0},
            },
            "logging": {"level": "loud"},
        }
    )
    assert any(p.startswith("logging.level:") for p in problems), problems
    assert any(p.startswith("server.handler_options:") for p in problems), problems


def test_relative_paths_are_normalised_and_socket_words_are_paths(tmp_path: Path) -> None:
    """ "../x" is resolved and normalised; "stdout" is a word only for logging.output."""
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "sockd.toml"
    path.write_text('[control]\nsocket = "../run/stdout"\n[logging]\noutput = "stdout"\n')
    config = load(str(path))
    assert config.control.socket == str(tmp_path / "run" / "stdout")
    assert config.logging.output == "stdout"
    path.write_text('[control]\nsocket = "stdout"\n')
    assert load(str(path)).control.socket == str(tmp_path / "etc" / "stdout")


def test_secrets_are_declared_once_and_redacted_from_config_and_changes() -> None:
    """handler_options is declared secret; redact_config and redact_changes hide its
    values (keys kept) and leave every other setting as it is."""
    assert {s.key for s in config.SETTINGS if s.secret} == {"server.handler_options"}
    old = from_mapping({"server": {"handler_options": {"password": "a"}}})
    options = {"password": "b", "dsn": "c"}
    new = from_mapping({"server": {"handler_options": options}, "logging": {"level": "debug"}})
    shown = config.redact_config(config.to_dict(new))
    assert shown["server"]["handler_options"] == {"password": "<redacted>", "dsn": "<redacted>"}
    assert shown["logging"] == config.to_dict(new)["logging"]
    changes = config.redact_changes([c.as_dict() for c in diff(old, new)])
    assert changes == [
        {
            "key": "server.handler_options",
            "old": {"password": "<redacted>"},
            "new": {"password": "<redacted>", "dsn": "<redacted>"},
        },
        {"key": "logging.level", "old": "info", "new": "debug"},
    ]
    assert config.redact("server.handler_options", "not a table") == "<redacted>"
