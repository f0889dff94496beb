"""scripts/install.sh and uninstall.sh, run as the README says, in a freshly booted box.

The box is a stock system as far as sockd is concerned: no sockd user, no /etc/sockd, no
/etc/sysusers.d, an empty /opt and (``tmpfs=["/usr/local"]``) an empty writable
/usr/local. It has no network, so pip gets its packages from a wheelhouse built on the
host (which reaches PyPI) with the command the README gives for offline installs, and the
install commands get the README's offline options ``--no-index --find-links DIR``.

Slow parts: the wheelhouse is built once per session (about 5 s); each install builds or
unpacks sockd into a fresh virtual environment in the box (about 6 s from the checkout,
2 s from the wheel).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .box import PROJECT, VENV_PYTHON, Box

INSTALL = "./scripts/install.sh"
UNINSTALL = "./scripts/uninstall.sh"
DOC_PREFIX = "/usr/local/share/doc/sockd/"
#: What the sdist must carry besides the code (MANIFEST.in).
SDIST_MUST_HAVE = (
    "LICENSE",
    "packaging/systemd/sockd.service",
    "packaging/systemd/sockd@.service",
    "packaging/systemd/sockd.socket",
    "packaging/sysusers.d/sockd.conf",
    "packaging/tmpfiles.d/sockd.conf",
    "etc/sockd.toml",
    "etc/logrotate.d/sockd",
    "docs/systemd.md",
    "docs/sockctl.md",
    "docs/control-api.md",
    "examples/fileserver/server.py",
    "scripts/install.sh",
    "scripts/uninstall.sh",
)


def _source_copy(destination: Path) -> Path:
    """The project without its venv, VCS data and build litter (pip builds in the tree)."""
    shutil.copytree(
        PROJECT,
        destination,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "build", "dist"
        ),
    )
    return destination


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sockd's wheel, its dependencies and setuptools, as the README's offline recipe makes
    them (``pip wheel -w wheelhouse . 'setuptools>=77.0.3'``), built on the host."""
    source = _source_copy(tmp_path_factory.mktemp("source") / "sockd")
    house = tmp_path_factory.mktemp("wheelhouse")
    pip_wheel = ["pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(house)]
    subprocess.run(
        [VENV_PYTHON, "-m", *pip_wheel, ".", "setuptools>=77.0.3"],
        cwd=source,
        check=True,
        timeout=150,
    )
    return house


@pytest.fixture
def stock_box(box_factory: Callable[..., Box], wheelhouse: Path) -> Box:
    """A fresh box with a writable, empty /usr/local and the wheelhouse bound read-only."""
    box = box_factory(tmpfs=["/usr/local"], binds_ro=[wheelhouse])
    assert not box.exists("/etc/sysusers.d")  # as on a stock Debian 12
    assert box.run("id", "sockd").rc != 0
    return box


def sh(box: Box, command: str, *, timeout: float = 30.0) -> tuple[int, str]:
    """Run ``command`` in the checkout, as an operator would; returns (rc, stdout+stderr)."""
    result = box.run(
        "/bin/sh", "-c", f"cd {shlex.quote(str(PROJECT))} && {command}", timeout=timeout
    )
    print(f"$ {command}\n{result.output}")
    return result.rc, result.output


def offline(house: Path) -> str:
    return f"--no-index --find-links {shlex.quote(str(house))}"


def echo(box: Box, port: int) -> str:
    """One line through the echo service on 127.0.0.1:``port`` in the box."""
    code = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n"
        "s.sendall(b'hello\\n')\n"
        "print(s.makefile('rb').readline().decode(), end='')\n"
    )
    return box.run("python3", "-c", code, check=True).stdout


def service_uid(box: Box, unit: str) -> str:
    pid = box.unit_property(unit, "MainPID")
    status = box.read_file(f"/proc/{pid}/status")
    found = re.search(r"^Uid:\s+(\d+)\s", status, re.MULTILINE)
    assert found, status
    return found.group(1)


def assert_uninstalled(box: Box) -> None:
    """No unit, command, venv, snippet, doc or logrotate file of sockd is left."""
    assert box.is_active("sockd.service") == "inactive"
    out = box.systemctl("list-unit-files", "--no-legend", "sockd*").stdout
    assert out.strip() == "", out
    assert box.systemctl("cat", "sockd.service").rc != 0
    for path in (
        "/opt/sockd",
        "/usr/local/bin/sockd",
        "/usr/local/bin/sockctl",
        "/usr/local/lib/systemd/system/sockd.service",
        "/usr/local/lib/sysusers.d/sockd.conf",
        "/usr/local/lib/tmpfiles.d/sockd.conf",
        "/usr/local/share/doc/sockd",
        "/etc/logrotate.d/sockd",
    ):
        assert not box.exists(path), path
    wants = box.run("find", "/etc/systemd/system", "-name", "sockd*").stdout
    assert wants == "", wants


@pytest.mark.systemd
@pytest.mark.timeout(180)
def test_install_from_checkout_serves_then_uninstall_keeps_config(
    stock_box: Box, wheelhouse: Path
) -> None:
    """install.sh from the checkout leaves sockd enabled, serving and answering sockctl as
    root; uninstall.sh stops it and removes it all but the config."""
    box = stock_box
    rc, out = sh(box, f"{INSTALL} --help")
    assert rc == 0 and out.startswith("Usage: install.sh"), out
    assert sh(box, f"{INSTALL} --bogus") == (
        2,
        "install.sh: unknown argument: --bogus (see --help)\n",
    )
    rc, out = sh(box, f"{INSTALL} --prefix /root/sockd")
    assert rc == 2 and "ProtectHome=" in out and out.count("\n") == 1, out
    box.sh("mkdir -p /usr/local/bin && touch /usr/local/bin/sockctl", check=True)
    rc, out = sh(box, f"{INSTALL} {offline(wheelhouse)}")
    assert rc == 1 and out.count("\n") == 1, out
    assert "/usr/local/bin/sockctl exists and is not a link to /opt/sockd/bin/sockctl" in out
    box.run("rm", "/usr/local/bin/sockctl", check=True)
    assert not box.exists("/opt/sockd")  # nothing was changed by the refused commands

    rc, out = sh(box, f"{INSTALL} {offline(wheelhouse)}", timeout=150)
    assert rc == 0, out
    assert "sockd.service is enabled and running" in out
    assert box.is_active("sockd.service") == "active"
    assert box.systemctl("is-enabled", "sockd.service").stdout.strip() == "enabled"
    assert echo(box, 9000) == "hello\n"
    rc, out = sh(box, "sockctl status")
    assert rc == 0, out
    assert "running" in out and "config:      /etc/sockd/sockd.toml" in out
    assert "supervisor:  systemd" in out

    # The pieces are where the docs say, from the virtual environment in /opt/sockd.
    assert box.run("readlink", "-f", "/usr/local/bin/sockd").stdout == "/opt/sockd/bin/sockd\n"
    fragment = box.unit_property("sockd.service", "FragmentPath")
    assert fragment == "/usr/local/lib/systemd/system/sockd.service"
    assert service_uid(box, "sockd.service") == box.run("id", "-u", "sockd").stdout.strip()
    verify = box.run("systemd-analyze", "verify", fragment)
    assert (verify.rc, verify.output) == (0, ""), verify.output
    docs = box.unit_property("sockd.service", "Documentation").split()
    assert docs and all(d.startswith(f"file:{DOC_PREFIX}") for d in docs), docs
    for doc in docs:
        assert box.exists(doc.removeprefix("file:")), doc
    assert box.exists("/etc/logrotate.d/sockd")
    assert box.run("stat", "-c", "%a %U", "/etc/sockd/sockd.toml").stdout == "644 root\n"

    box.sh("echo '# edited by the operator' >> /etc/sockd/sockd.toml", check=True)
    rc, out = sh(box, UNINSTALL)
    assert rc == 0, out
    assert_uninstalled(box)
    assert box.read_file("/etc/sockd/sockd.toml").endswith("# edited by the operator\n")
    assert box.run("id", "sockd").rc == 0  # the user stays, as documented
    assert sh(box, UNINSTALL)[0] == 0  # twice is fine


@pytest.mark.systemd
@pytest.mark.timeout(180)
def test_install_from_wheel_upgrades_in_place_and_purge_removes_everything(
    stock_box: Box, wheelhouse: Path
) -> None:
    """install.sh --wheel installs and starts sockd; run again it keeps the edited config and
    restarts sockd and its running instances; uninstall.sh --purge leaves nothing."""
    box = stock_box
    (wheel,) = wheelhouse.glob("sockd-*.whl")
    command = f"{INSTALL} --wheel {shlex.quote(str(wheel))} {offline(wheelhouse)}"
    # A hardened root's umask must not make the environment unreadable to the sockd user.
    rc, out = sh(box, f"umask 077 && {command}", timeout=150)
    assert rc == 0, out
    assert box.is_active("sockd.service") == "active"
    assert echo(box, 9000) == "hello\n"
    assert box.run("stat", "-c", "%a", "/opt/sockd").stdout == "755\n"

    # The operator edits the config and adds an instance.
    box.sh("sed -i 's/127.0.0.1:9000/127.0.0.1:9002/' /etc/sockd/sockd.toml", check=True)
    box.write_config(
        '[server]\nlisten = ["127.0.0.1:9003"]\n'
        '[logging]\nidentifier = "sockd-alpha"\n'
        '[control]\nsocket = "/run/sockd-alpha/control.sock"\n',
        "/etc/sockd/alpha.toml",
    )
    assert box.systemctl("enable", "--now", "sockd@alpha.service").rc == 0
    assert echo(box, 9003) == "hello\n"
    before = {u: box.unit_property(u, "MainPID") for u in ("sockd.service", "sockd@alpha.service")}

    rc, out = sh(box, command, timeout=150)
    assert rc == 0, out
    assert "kept /etc/sockd/sockd.toml" in out
    after = {u: box.unit_property(u, "MainPID") for u in before}
    assert all(after[u] != before[u] for u in before), (before, after)
    assert echo(box, 9002) == "hello\n"  # the kept, edited config is the one in force
    assert echo(box, 9003) == "hello\n"

    # An invalid config stops the upgrade before any restart: the running sockd stays.
    box.sh("echo 'max_conections = 5' >> /etc/sockd/sockd.toml", check=True)
    rc, out = sh(box, command, timeout=150)
    assert rc == 78, out
    assert "install.sh: /etc/sockd/sockd.toml is not valid (exit 78)" in out
    assert box.unit_property("sockd.service", "MainPID") == after["sockd.service"]
    assert echo(box, 9002) == "hello\n"

    rc, out = sh(box, f"{UNINSTALL} --purge")
    assert rc == 0, out
    assert_uninstalled(box)
    assert box.is_active("sockd@alpha.service") == "inactive"
    for path in ("/etc/sockd", "/var/log/sockd"):
        assert not box.exists(path), path


@pytest.mark.timeout(120)
def test_sdist_carries_packaging_docs_and_examples(
    wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The sdist holds the units, snippets, example config, logrotate file, docs, examples,
    install scripts and LICENSE, and declares the SPDX license."""
    tmp = tmp_path_factory.mktemp("sdist")
    source = _source_copy(tmp / "sockd")
    # setuptools from the wheelhouse (PEP 639 needs >= 77.0.3; the test venv may have an
    # older one): a pure-Python wheel imports from its unpacked files, and -S keeps every
    # site-packages directory out of the way.
    (setuptools_wheel,) = wheelhouse.glob("setuptools-*.whl")
    with zipfile.ZipFile(setuptools_wheel) as archive:
        archive.extractall(tmp / "setuptools")  # noqa: S202  # pip fetched it from PyPI
    build = (
        f"import sys; sys.path.insert(0, {str(tmp / 'setuptools')!r}); "
        f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp)!r}))"
    )
    built = subprocess.run(
        [sys.executable, "-S", "-c", build],
        cwd=source,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    name = built.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp / name) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        pkg_info = sdist.extractfile(f"{name.removesuffix('.tar.gz')}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    missing = [path for path in SDIST_MUST_HAVE if path not in names]
    assert missing == [], sorted(names)
    assert "License-Expression: MIT" in metadata
    assert not any("__pycache__" in n for n in names)
