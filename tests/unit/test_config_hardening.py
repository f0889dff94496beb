"""Config validation against hostile or mistaken input (issue 9): listen addresses, the
log output and the control socket's mode."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sockd.config import Address, ConfigError, from_mapping, log_output_problem


def problems_of(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    return info.value.problems


# --------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:\uff19\uff10\uff10\uff10",  # fullwidth digits
        "127.0.0.1:\u0669\u0660\u0660\u0660",  # Arabic-Indic digits
        "127.0.0.1:\u09ef\u09e6",  # Bengali digits
        "127.0.0.1:\u00b2",  # superscript two: isdigit() but not a decimal
        "[::1]:\uff18\uff10",
        "127.0.0.1:+80",
        "127.0.0.1: 80",
        "127.0.0.1:80 ",
        "127.0.0.1:" + "0" * 5000,
    ],
)
def test_ports_must_be_ascii_digits(text: str) -> None:
    """A port in another script's digits, signed, padded or overlong is refused by name."""
    with pytest.raises(ValueError, match=r"port .* is not a number from 0 to 65535"):
        Address.parse(text)


@pytest.mark.parametrize(
    "host",
    [
        "127.0. 0.1",
        "my host",
        " localhost",
        "localhost ",
        "tab\there",
        "new\nline",
        "nul\x00",
        "under_score",
        "-leading.example",
        "trailing-.example",
        "two..dots",
        ".",
        "a" * 64 + ".example",
        "caf\u00e9.example",  # an IDN must be given in its ASCII (xn--) form
        "\u0661\u0662\u0667.0.0.1",  # Arabic-Indic digits looking like an IPv4 address
        "0x7f.1",  # getaddrinfo reads it as 127.0.0.1
        "10.0.0.1.5",
        "host.123",
    ],
)
def test_hosts_must_be_addresses_or_host_names(host: str) -> None:
    """A host with spaces, control characters or other non-RFC 1123 text is refused."""
    with pytest.raises(ValueError, match=r"not an IPv4 address|neither an IP address nor"):
        Address.parse(f"{host}:9000")


@pytest.mark.parametrize(
    "text",
    [
        "localhost:80",
        "example.org:443",
        "example.org.:443",
        "xn--bcher-kva.example:443",
        "a-b.c-d.example:1",
        "sockd1:9000",
        "10.0.0.1:65535",
        "[::1]:0",
        "[fe80::1%eth0]:80",
        "[::ffff:10.0.0.1]:80",
        "127.0.0.1:00080",
    ],
)
def test_valid_hosts_and_ports_still_parse(text: str) -> None:
    """Host names, IPv4 and IPv6 literals (scoped too) and zero-padded ports are accepted."""
    Address.parse(text)


@pytest.mark.parametrize("host", ["[::1 ]", "[fe80::1%eth 0]", "[fe80::1%\x00]"])
def test_ipv6_literals_with_spaces_or_controls_are_refused(host: str) -> None:
    """An IPv6 literal or its scope with spaces or control characters is refused."""
    with pytest.raises(ValueError, match="IPv6"):
        Address.parse(f"{host}:80")


def test_listen_problems_name_the_key_and_every_address() -> None:
    """Each bad listen address is reported under server.listen, all at once."""
    (problem,) = problems_of(
        {"server": {"listen": ["127.0.0.1:\uff19\uff10", "my host:9000", "127.0.0.1:9001"]}}
    )
    assert problem.startswith("server.listen: ")
    assert "'127.0.0.1:\uff19\uff10': port" in problem
    assert "'my host:9000': host \"my host\" is neither an IP address nor a valid host name" in (
        problem
    )
    assert "9001" not in problem


# --------------------------------------------------------------------------- logging.output


def test_log_output_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    """A directory as logging.output is a config problem naming the key and the path."""
    (problem,) = problems_of({"logging": {"output": str(tmp_path)}})
    assert problem == (
        f'logging.output: "{tmp_path}" is a directory; expected "stdout", "stderr", '
        '"journald" or a file sockd can append to'
    )
    (problem,) = problems_of({"logging": {"output": str(tmp_path / "logs") + "/"}})
    assert "names a directory" in problem


def test_log_output_in_a_missing_or_non_directory_parent_is_refused(tmp_path: Path) -> None:
    """A file in a directory that does not exist, or under a regular file, is refused."""
    (problem,) = problems_of({"logging": {"output": str(tmp_path / "nope" / "sockd.log")}})
    assert "in a directory that does not exist" in problem
    (tmp_path / "file").write_text("")
    (problem,) = problems_of({"logging": {"output": str(tmp_path / "file" / "sockd.log")}})
    assert problem.startswith("logging.output: ")
    assert "not a directory" in problem.lower()


def test_log_output_that_is_a_socket_is_refused(tmp_path: Path) -> None:
    """A Unix socket cannot be opened for append: refused."""
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert "is a socket" in str(log_output_problem(str(path)))


def test_log_output_check_creates_nothing(tmp_path: Path) -> None:
    """Validating a new log file path leaves the file uncreated; an existing one is unchanged."""
    new = tmp_path / "new.log"
    assert from_mapping({"logging": {"output": str(new)}}).logging.output == str(new)
    assert not new.exists()
    old = tmp_path / "old.log"
    old.write_text("kept\n")
    from_mapping({"logging": {"output": str(old)}})
    assert old.read_text() == "kept\n"


def test_dev_null_and_words_are_accepted() -> None:
    """/dev/null (a character device) and the output words pass."""
    for output in ("/dev/null", "stdout", "stderr", "journald"):
        assert from_mapping({"logging": {"output": output}}).logging.output == output


# --------------------------------------------------------------------------- control.mode


@pytest.mark.parametrize(
    ("control", "expected"),
    [
        (
            {"mode": "0640", "group": "root"},
            "control.mode: 0640 gives control.group no write permission, which connecting "
            'needs; expected e.g. "0660"',
        ),
        (
            {"mode": "0600", "read_group": "root"},
            "control.mode: 0600 gives control.read_group no write permission, which "
            'connecting needs; expected e.g. "0660"',
        ),
        (
            {"mode": 0o646, "group": "0"},
            "control.mode: 0646 gives control.group no write permission, which connecting "
            'needs; expected e.g. "0666"',
        ),
    ],
)
def test_mode_without_group_write_is_refused_when_a_group_is_set(
    control: dict[str, object], expected: str
) -> None:
    """A mode that locks the configured group out of the control socket is a config error."""
    assert problems_of({"control": control}) == [expected]


@pytest.mark.parametrize(
    "control",
    [
        {"mode": "0660", "group": "root"},
        {"mode": "0620", "read_group": "root"},
        {"mode": "0600"},
        {"mode": "0"},
        {"mode": "0606"},
    ],
)
def test_modes_that_let_the_group_in_or_name_no_group_are_fine(control: dict[str, object]) -> None:
    """With the group's write bit, or with no group configured, any mode is accepted."""
    from_mapping({"control": control})


def test_mode_problem_is_reported_with_the_others() -> None:
    """The mode rule is one problem among all the file's problems, not the only one shown."""
    problems = problems_of(
        {
            "server": {"listen": ["my host:1"]},
            "logging": {"output": "/"},
            "control": {"mode": "0640", "group": "root"},
        }
    )
    assert [p.split(":", 1)[0] for p in problems] == [
        "server.listen",
        "logging.output",
        "control.mode",
    ]


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("key", ["group", "read_group"])
def test_group_with_a_nul_byte_is_a_config_error(key: str) -> None:
    """A group name with a NUL byte is reported as no such group, not a crash in grp."""
    assert problems_of({"control": {key: "ops\x00"}}) == [
        f'control.{key}: no such group "ops\\u0000"'
    ]
