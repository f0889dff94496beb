"""The real sockd as instances of the shipped template sockd@.service, under a real systemd.

``packaged_box`` installs sockd@.service as docs/systemd.md says, next to sockd.service.
Each instance gets the config the template names, ``/etc/sockd/NAME.toml``, with its own
port and its own control socket in the runtime directory the template gives it,
``/run/sockd-NAME`` (``RuntimeDirectory=sockd-%i``). The handler is ``tests.handlers:Tagged``
with the instance's name as its tag, so a reply says which instance served it; a drop-in
for the template puts the project on ``PYTHONPATH`` so the daemon can import it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .box import PROJECT, VENV_PYTHON, Box, Result
from .test_sockd_systemd import ECHO_CLIENT, SOCKCTL

pytestmark = pytest.mark.systemd

TEMPLATE_DROPIN = "/etc/systemd/system/sockd@.service.d/test.conf"
#: Each instance's port: far from sockd.service's 9000, and different from each other.
PORTS = {"alpha": 9101, "beta": 9102}


def unit(name: str) -> str:
    return f"sockd@{name}.service"


def config_path(name: str) -> str:
    """The config the template's ExecStart= names for instance ``name``."""
    return f"/etc/sockd/{name}.toml"


def control_socket(name: str) -> str:
    """Where the instance's config puts its control socket: its own RuntimeDirectory=."""
    return f"/run/sockd-{name}/control.sock"


def instance_toml(name: str) -> str:
    """A config for instance ``name``: its own port and control socket, replies tagged."""
    return (
        "[server]\n"
        f'listen = ["127.0.0.1:{PORTS[name]}"]\n'
        'handler = "tests.handlers:Tagged"\n'
        "[server.handler_options]\n"
        f'tag = "{name}"\n'
        "[control]\n"
        f'socket = "{control_socket(name)}"\n'
        "[logging]\n"
        'output = "journald"\n'
        f'identifier = "sockd-{name}"\n'
    )


def set_up_instance(box: Box, name: str) -> None:
    """Write the instance's config (and, once, the template's PYTHONPATH drop-in)."""
    if not box.exists(TEMPLATE_DROPIN):
        box.write_file(TEMPLATE_DROPIN, f"[Service]\nEnvironment=PYTHONPATH={PROJECT}\n")
        box.daemon_reload()
    box.write_config(instance_toml(name), path=config_path(name))


def start(box: Box, name: str) -> None:
    # enable --now, as docs/systemd.md installs an instance: an enabled unit stays loaded
    # once stopped, so Result= and ExecMainStatus= still describe the run afterwards.
    rc, _out, err = box.systemctl("enable", "--now", unit(name))
    assert rc == 0, err + box.journal(unit(name))


def echo(box: Box, port: int, payload: str = "hello\n") -> str:
    """What the service on 127.0.0.1:``port`` sends back for ``payload`` (client in the box)."""
    return box.run(VENV_PYTHON, "-c", ECHO_CLIENT, str(port), payload, timeout=20).stdout


def sockctl(box: Box, name: str, *args: str) -> Result:
    """sockctl as the template's ExecReload= runs it: the instance's config names the socket."""
    return box.run(SOCKCTL, "--config", config_path(name), *args)


def status(box: Box, name: str) -> dict[str, Any]:
    rc, out, err = sockctl(box, name, "--json", "status")
    assert rc == 0, out + err
    answer: dict[str, Any] = json.loads(out)
    return answer


def props(box: Box, name: str, *names: str) -> dict[str, str]:
    out = box.systemctl("show", "-p", ",".join(names), unit(name), check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_instance_serves_its_own_config(packaged_box: Box) -> None:
    """sockd@alpha reads /etc/sockd/alpha.toml: active once started, serving on its port,
    reachable by sockctl on /run/sockd-alpha/control.sock, journaled under its own unit,
    and systemctl reload reaches that instance."""
    box = packaged_box
    set_up_instance(box, "alpha")
    start(box, "alpha")
    # No waiting: Type=notify means start returned only after READY=1.
    state = props(box, "alpha", "ActiveState", "SubState", "MainPID", "StatusText")
    assert state["ActiveState"] == "active"
    assert state["SubState"] == "running"
    pid = state["MainPID"]
    assert pid != "0"
    assert state["StatusText"] == f"serving 0 connections on 127.0.0.1:{PORTS['alpha']}"
    assert echo(box, PORTS["alpha"], "over the template\n") == "alpha:over the template\n"

    answer = status(box, "alpha")
    assert answer["pid"] == int(pid)
    assert answer["state"] == "running"
    assert answer["config_path"] == config_path("alpha")
    assert answer["listen"] == [f"127.0.0.1:{PORTS['alpha']}"]
    # The socket is in the instance's runtime directory, owned by the sockd user; the
    # single unit's /run/sockd was never made.
    owner = box.run("stat", "-c", "%U %F", control_socket("alpha"), check=True).stdout.strip()
    assert owner == "sockd socket"
    assert box.run("stat", "-c", "%U", "/run/sockd-alpha", check=True).stdout.strip() == "sockd"
    assert not box.exists("/run/sockd")
    # Explicitly by path, too: the socket is the instance's, not a default one.
    rc, out, err = box.run(SOCKCTL, "--socket", control_socket("alpha"), "--json", "status")
    assert rc == 0, out + err
    assert json.loads(out)["pid"] == int(pid)

    # journalctl -u sockd@alpha (what docs/systemd.md tells operators) has its events.
    [listening] = box.journal_entries(unit("alpha"), "SOCKD_EVENT=server.listening")
    assert listening["_SYSTEMD_UNIT"] == unit("alpha")
    assert listening["SOCKD_ADDRESS"] == f"127.0.0.1:{PORTS['alpha']}"
    assert listening["_PID"] == pid

    # ExecReload= runs sockctl with the instance's config: it reaches this daemon.
    rc, _out, err = box.systemctl("reload", unit("alpha"))
    assert rc == 0, err + box.journal(unit("alpha"))
    assert status(box, "alpha")["generation"] == 2
    assert box.unit_property(unit("alpha"), "MainPID") == pid


def test_two_instances_run_side_by_side_and_stop_separately(packaged_box: Box) -> None:
    """sockd@alpha and sockd@beta serve their own ports with their own control sockets at
    once; stopping alpha exits it cleanly (status 0, inactive) and leaves beta untouched."""
    box = packaged_box
    for name in PORTS:
        set_up_instance(box, name)
        start(box, name)
    pids = {name: box.unit_property(unit(name), "MainPID") for name in PORTS}
    assert len(set(pids.values())) == 2, pids
    for name, port in PORTS.items():
        assert box.is_active(unit(name)) == "active"
        assert echo(box, port) == f"{name}:hello\n"
        answer = status(box, name)
        assert answer["pid"] == int(pids[name])
        assert answer["listen"] == [f"127.0.0.1:{port}"]
        assert box.exists(control_socket(name))

    rc, _out, err = box.systemctl("stop", unit("alpha"))
    assert rc == 0, err + box.journal(unit("alpha"))
    state = props(box, "alpha", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: exited by itself, not killed
        "ExecMainStatus": "0",
    }
    [stopped] = box.journal_entries(unit("alpha"), "SOCKD_EVENT=server.stopped")
    assert stopped["_PID"] == pids["alpha"]
    # Its runtime directory went with it, so sockctl says "not running" (exit 3).
    assert not box.exists("/run/sockd-alpha")
    rc, out, err = sockctl(box, "alpha", "status")
    assert rc == 3, out + err
    assert box.run(VENV_PYTHON, "-c", ECHO_CLIENT, str(PORTS["alpha"]), "x").rc != 0

    # beta: the same process, still serving, its socket still there, nothing journaled
    # about stopping.
    assert box.is_active(unit("beta")) == "active"
    assert box.unit_property(unit("beta"), "MainPID") == pids["beta"]
    assert echo(box, PORTS["beta"], "still here\n") == "beta:still here\n"
    assert status(box, "beta")["state"] == "running"
    assert box.exists(control_socket("beta"))
    assert not box.journal_entries(unit("beta"), "SOCKD_EVENT=server.stopping")


def test_instance_events_carry_the_instance_identifier(packaged_box: Box) -> None:
    """With logging.identifier = "sockd-alpha" (as docs/systemd.md tells), sockd@alpha's
    events are journaled under the template's SyslogIdentifier=, so instances can be told
    apart in a merged journal (journalctl -t sockd-alpha)."""
    box = packaged_box
    set_up_instance(box, "alpha")
    start(box, "alpha")
    assert box.unit_property(unit("alpha"), "SyslogIdentifier") == "sockd-alpha"
    [listening] = box.journal_entries(unit("alpha"), "SOCKD_EVENT=server.listening")
    assert listening["SYSLOG_IDENTIFIER"] == "sockd-alpha"
