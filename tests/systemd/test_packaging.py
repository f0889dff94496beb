"""Static checks of the shipped unit files that need no systemd (run everywhere)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .box import PACKAGING, PROJECT

SYSTEMD = PACKAGING / "systemd"
#: Where scripts/install.sh puts README.md and docs/ (the units' Documentation= links).
DOC_DIR = "/usr/local/share/doc/sockd/"
# Keys that legitimately differ per instance in sockd@.service.
PER_INSTANCE = {"Description", "ExecStart", "ExecReload", "RuntimeDirectory", "SyslogIdentifier"}


def directives(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section name -> (key, value) pairs in file order, comments dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def settings(path: Path, section: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in directives(path)[section]:
        out.setdefault(key, []).append(value)
    return out


def test_template_keeps_the_same_hardening() -> None:
    """sockd@.service differs from sockd.service only in per-instance keys."""
    single = settings(SYSTEMD / "sockd.service", "Service")
    template = settings(SYSTEMD / "sockd@.service", "Service")
    for key in PER_INSTANCE:
        single.pop(key, None)
        template.pop(key, None)
    assert template == single
    unit_single = settings(SYSTEMD / "sockd.service", "Unit")
    unit_template = settings(SYSTEMD / "sockd@.service", "Unit")
    unit_single.pop("Description")
    unit_template.pop("Description")
    assert unit_template == unit_single


def test_required_service_settings() -> None:
    """The settings the daemon relies on are present with the agreed values."""
    service = settings(SYSTEMD / "sockd.service", "Service")
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": ["/usr/local/bin/sockd --config /etc/sockd/sockd.toml"],
        "ExecReload": ["/usr/local/bin/sockctl --config /etc/sockd/sockd.toml reload"],
        "Restart": ["on-failure"],
        "RestartPreventExitStatus": ["78"],
        "WatchdogSec": ["10"],
        "TimeoutStopSec": ["45"],
        "KillMode": ["mixed"],
        "RuntimeDirectory": ["sockd"],
        "FileDescriptorStoreMax": ["16"],
        "User": ["sockd"],
    }
    assert {key: service.get(key) for key in expected} == expected


def test_socket_unit_matches_default_listen_address() -> None:
    """sockd.socket binds the default server.listen, so the defaults work together."""
    from sockd import config

    socket_unit = settings(SYSTEMD / "sockd.socket", "Socket")
    default_listen = [str(a) for a in config.defaults().server.listen]
    assert socket_unit["ListenStream"] == default_listen


def test_stop_timeout_exceeds_shutdown_timeout() -> None:
    """TimeoutStopSec leaves room for the default graceful drain before SIGKILL."""
    from sockd import config

    service = settings(SYSTEMD / "sockd.service", "Service")
    (stop,) = service["TimeoutStopSec"]
    assert re.fullmatch(r"\d+", stop)
    assert int(stop) > config.defaults().server.shutdown_timeout


def test_units_link_the_docs_install_sh_installs() -> None:
    """Every unit's Documentation= links name files under the install script's doc
    directory that exist in the checkout (the install test checks them in place)."""
    install = (PROJECT / "scripts" / "install.sh").read_text()
    assert f"DOCDIR={DOC_DIR.rstrip('/')}" in install
    for unit in sorted(SYSTEMD.iterdir()):
        links = [
            link
            for value in settings(unit, "Unit").get("Documentation", [])
            for link in value.split()
        ]
        assert links, f"{unit.name} has no Documentation="
        for link in links:
            assert link.startswith(f"file:{DOC_DIR}"), link
            assert (PROJECT / link.removeprefix(f"file:{DOC_DIR}")).is_file(), link


@pytest.mark.parametrize("script", ["install.sh", "uninstall.sh"])
def test_install_scripts_pass_shellcheck(script: str) -> None:
    """scripts/install.sh and uninstall.sh have no shellcheck findings."""
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", PROJECT / "scripts" / script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
