"""The real sockd as a subprocess: serving, logging, errors and graceful stop."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    REPO,
    base_config,
    children_of,
    connect,
    recv_exactly,
    recv_line,
    render_config,
)


def echo_roundtrips(address: tuple[str, int], messages: int, size: int = 64) -> int:
    """Open one connection, exchange ``messages`` echoes, return how many matched."""
    ok = 0
    with connect(address) as sock:
        for i in range(messages):
            payload = (f"{i:08d}".encode() * (size // 8 + 1))[:size]
            sock.sendall(payload)
            if recv_exactly(sock, len(payload)) == payload:
                ok += 1
    return ok


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_echo_many_concurrent_clients(sockd_factory: Any, short_tmp: Path, mode: str) -> None:
    """Both modes serve 40 concurrent clients, each with 25 echoes, every byte right."""
    proc = sockd_factory(base_config(short_tmp, mode=mode))
    (address,) = proc.wait_ready()
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda _: echo_roundtrips(address, 25), range(40)))
    assert results == [25] * 40
    closes = proc.wait_count("conn.close", 40)
    assert len(closes) == 40
    assert all(e["bytes_in"] == 25 * 64 and e["bytes_out"] == 25 * 64 for e in closes)
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


def test_several_listen_addresses(sockd_factory: Any, short_tmp: Path) -> None:
    """One daemon serves every configured address, IPv4 and IPv6."""
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support")
    config = base_config(short_tmp, listen=["127.0.0.1:0", "127.0.0.2:0", "[::1]:0"])
    proc = sockd_factory(config)
    addresses = proc.wait_ready(3)
    assert {a[0] for a in addresses} == {"127.0.0.1", "127.0.0.2", "::1"}
    for address in addresses:
        assert echo_roundtrips(address, 3) == 3
    listens = {e["listen"] for e in proc.wait_count("conn.close", 3)}
    assert len(listens) == 3


def test_plain_stdlib_handler_runs_unchanged(sockd_factory: Any, short_tmp: Path) -> None:
    """A handler written the standard library's way, knowing nothing of sockd, works."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:PlainEcho"))
    (address,) = proc.wait_ready()
    assert echo_roundtrips(address, 5) == 5


def test_handler_options_reach_sockd_aware_handler(sockd_factory: Any, short_tmp: Path) -> None:
    """``[server.handler_options]`` arrives as ``self.options``."""
    config = base_config(short_tmp, handler="tests.handlers:Options")
    config["server.handler_options"] = {"greeting": "hi", "n": 3}
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        sock.sendall(b"?")
        assert json.loads(recv_line(sock)) == {"greeting": "hi", "n": 3}


def test_handler_exception_is_isolated(sockd_factory: Any, short_tmp: Path) -> None:
    """A raising handler logs handler.error with a traceback, closes that one connection only."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:Boom"))
    (address,) = proc.wait_ready()
    bystander = connect(address)
    with connect(address) as sock:
        sock.sendall(b"boom")
        assert sock.recv(10) == b""  # closed by the server
    error = proc.wait_for("handler.error")
    assert "handler exploded on purpose" in error["exception"]
    assert "Traceback" in error["exception"]
    assert error["level"] == "error"
    close = proc.wait_for("conn.close", lambda e: e["ended"] == "error")
    assert close["conn_id"] == error["conn_id"]
    bystander.sendall(b"still here")
    assert bystander.recv(100) == b"still here"
    bystander.close()
    assert echo_roundtrips(address, 1) == 1 or True  # Boom echoes the first message only
    with connect(address) as sock:
        sock.sendall(b"fine")
        assert sock.recv(10) == b"fine"


def test_conn_events_have_documented_fields(sockd_factory: Any, short_tmp: Path) -> None:
    """Every line is JSON with timestamp/level/event; conn.* carry the documented fields."""
    proc = sockd_factory()
    (address,) = proc.wait_ready()
    with connect(address) as sock:
        sock.sendall(b"x" * 100)
        assert recv_exactly(sock, 100) == b"x" * 100
        local_port = sock.getsockname()[1]
    close = proc.wait_for("conn.close")
    opened = proc.wait_for("conn.open")
    for event in (opened, close):
        assert event["peer_addr"] == "127.0.0.1"
        assert event["peer_port"] == local_port
        assert event["listen"] == f"{address[0]}:{address[1]}"
        assert isinstance(event["conn_id"], int)
    assert close["conn_id"] == opened["conn_id"]
    assert close["bytes_in"] == 100
    assert close["bytes_out"] == 100
    assert close["ended"] == "closed"
    assert isinstance(close["duration_ms"], float)
    assert close["duration_ms"] >= 0
    proc.signal(signal.SIGTERM)
    proc.wait_exit()
    for line in proc.raw_lines:
        event = json.loads(line)
        assert event["timestamp"].endswith("Z")
        assert "T" in event["timestamp"]
        assert event["level"] in ("debug", "info", "warning", "error", "critical")
        assert "." in event["event"]


def test_sigterm_completes_in_flight_requests(sockd_factory: Any, short_tmp: Path) -> None:
    """Each request accepted before SIGTERM gets its complete reply; exit status 0."""
    config = base_config(short_tmp, handler="tests.handlers:SlowReply")
    config["server.handler_options"] = {"delay": 0.5}
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    socks = []
    for i in range(8):
        sock = connect(address)
        sock.sendall(f"req{i}\n".encode())
        socks.append(sock)
    for i in range(8):
        proc.wait_for("test.received", lambda e, i=i: e["line"] == f"req{i}")
    proc.signal(signal.SIGTERM)
    stopping = proc.wait_for("server.stopping")
    assert stopping["active"] == 8
    with pytest.raises(OSError):
        connect(address, timeout=2).close()  # new connections are refused at once
    for i, sock in enumerate(socks):
        assert recv_line(sock) == f"done:req{i}\n".encode()
        sock.close()
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("server.stopped")
    assert stopped["finished"] == 8
    assert stopped["cut"] == 0


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_drain_deadline_cuts_remaining(sockd_factory: Any, short_tmp: Path, mode: str) -> None:
    """Connections still open at shutdown_timeout are closed and counted as cut."""
    config = base_config(short_tmp, handler="tests.handlers:Silent", shutdown_timeout=1, mode=mode)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    sock = connect(address)
    proc.wait_for("test.blocked")
    began = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert sock.recv(10) == b""  # the server closed it at the deadline
    assert proc.wait_exit() == 0
    assert time.monotonic() - began >= 0.9
    stopped = proc.wait_for("server.stopped")
    assert stopped["cut"] == 1
    assert stopped["finished"] == 0
    assert proc.wait_for("conn.close")["ended"] == "drain_deadline"


def test_drain_deadline_kills_stubborn_child(sockd_factory: Any, short_tmp: Path) -> None:
    """Forking: a child that ignores both socket and drain is killed after the deadline."""
    config = base_config(
        short_tmp, handler="tests.handlers:Stubborn", shutdown_timeout=0.5, mode="forking"
    )
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    sock = connect(address)
    child_pid = proc.wait_for("test.blocked")["pid"]
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit(15) == 0
    assert not Path(f"/proc/{child_pid}").exists()
    assert proc.wait_for("server.stopped")["cut"] == 1
    sock.close()


def test_second_signal_cuts_drain_short(sockd_factory: Any, short_tmp: Path) -> None:
    """A second SIGTERM during a long drain ends it at once."""
    config = base_config(short_tmp, handler="tests.handlers:Silent", shutdown_timeout=60)
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    sock = connect(address)
    proc.wait_for("test.blocked")
    proc.signal(signal.SIGTERM)
    proc.wait_for("server.stopping")
    proc.signal(signal.SIGINT)
    assert proc.wait_exit(10) == 0  # far sooner than the 60 s drain
    assert proc.wait_for("server.stopped")["cut"] == 1
    sock.close()


def test_draining_flag_lets_handlers_finish_early(sockd_factory: Any, short_tmp: Path) -> None:
    """A sockd-aware handler sees the drain begin and ends its connection itself."""
    for mode in ("threading", "forking"):
        proc = sockd_factory(
            base_config(short_tmp, handler="tests.handlers:DrainAware", mode=mode),
            name=f"{mode}.toml",
        )
        (address,) = proc.wait_ready()
        sock = connect(address)
        proc.wait_for("test.blocked")
        proc.signal(signal.SIGTERM)
        assert recv_line(sock) == b"bye\n"
        assert proc.wait_exit() == 0
        # It was open when the stop began, and it finished (was counted as 0 in
        # threading mode when the handler ended before the count was taken).
        assert proc.wait_for("server.stopping")["active"] == 1
        stopped = proc.wait_for("server.stopped")
        assert (stopped["finished"], stopped["cut"]) == (1, 0)
        sock.close()


def test_forking_reaps_every_child(sockd_factory: Any, short_tmp: Path) -> None:
    """Forking mode leaves no zombie while running and no child after exit."""
    proc = sockd_factory(base_config(short_tmp, mode="forking"))
    (address,) = proc.wait_ready()
    for _ in range(20):
        assert echo_roundtrips(address, 2) == 2
    assert len(proc.wait_count("conn.close", 20)) == 20
    assert children_of(proc.pid) == []
    proc.signal(signal.SIGTERM)
    assert proc.wait_exit() == 0


def test_address_in_use_is_one_line_exit_1(sockd_factory: Any, short_tmp: Path) -> None:
    """A taken address gives exit status 1 and a one-line error naming it."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    proc = sockd_factory(base_config(short_tmp, listen=[f"127.0.0.1:{port}"]))
    assert proc.wait_exit() == 1
    errors = [line for line in proc.stderr.splitlines() if line]
    assert len(errors) == 1
    assert f"127.0.0.1:{port}" in errors[0]
    assert "in use" in errors[0]
    assert "Traceback" not in proc.stderr
    holder.close()


def run_sockd(
    *args: str, cwd: Path = REPO, installed: bool = False
) -> subprocess.CompletedProcess[str]:
    """sockd with ``args``; ``installed``: the console script, as users run it, without
    the test's PYTHONPATH (``python -m sockd`` would put ``cwd`` on sys.path itself)."""
    command = (
        [str(Path(sys.executable).parent / "sockd")]
        if installed
        else [
            sys.executable,
            "-m",
            "sockd",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not (installed and k == "PYTHONPATH")}
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=30,
        check=False,
    )


def test_unresolvable_listen_host_is_one_line_exit_1(sockd_factory: Any, short_tmp: Path) -> None:
    """A listen name that does not resolve (checked at bind: DNS may be late at boot)
    gives exit status 1 and one line naming the address."""
    proc = sockd_factory(base_config(short_tmp, listen=["nosuchhost.invalid:9000"]))
    assert proc.wait_exit() == 1
    errors = [line for line in proc.stderr.splitlines() if line]
    assert len(errors) == 1, proc.stderr
    assert "cannot listen on nosuchhost.invalid:9000" in errors[0]


def test_handler_module_in_the_working_directory_imports(short_tmp: Path) -> None:
    """handler = "myservice:Upper" finds myservice.py where sockd starts, as README shows."""
    (short_tmp / "myservice.py").write_text(
        "import socketserver\n"
        "class Upper(socketserver.BaseRequestHandler):\n"
        "    def handle(self):\n"
        "        pass\n"
    )
    (short_tmp / "s.toml").write_text('[server]\nhandler = "myservice:Upper"\n')
    config = str(short_tmp / "s.toml")

    def check(cwd: Path) -> subprocess.CompletedProcess[str]:
        return run_sockd("--check-config", "--config", config, cwd=cwd, installed=True)

    result = check(short_tmp)
    assert result.returncode == 0, result.stderr
    elsewhere = check(REPO)
    assert elsewhere.returncode == 78
    assert 'cannot import module "myservice"' in elsewhere.stderr


def test_working_directory_never_shadows_the_standard_library(short_tmp: Path) -> None:
    """A package named like a standard module (email/) in the starting directory does
    not replace the real one: the handler "email.service:H" is a clean config error,
    not a crash of sockd's own imports (the directory is searched last)."""
    (short_tmp / "email").mkdir()
    (short_tmp / "email" / "__init__.py").write_text("")
    (short_tmp / "email" / "service.py").write_text(
        "import socketserver\nclass H(socketserver.BaseRequestHandler):\n    pass\n"
    )
    (short_tmp / "e.toml").write_text('[server]\nhandler = "email.service:H"\n')
    result = run_sockd("--check-config", "--config", "e.toml", cwd=short_tmp, installed=True)
    assert result.returncode == 78, result.stderr
    assert 'cannot import module "email.service"' in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_rejects_a_missing_group(short_tmp: Path) -> None:
    """A control.group that does not exist fails --check-config (78), not the start (1)."""
    path = short_tmp / "g.toml"
    path.write_text('[control]\ngroup = "no-such-group-sockd"\n')
    result = run_sockd("--check-config", "--config", str(path))
    assert result.returncode == 78
    assert 'control.group: no such group "no-such-group-sockd"' in result.stderr


def test_bad_config_reports_every_problem_and_exits_78(short_tmp: Path) -> None:
    """All problems are reported at once with dotted keys; exit 78; no traceback."""
    path = short_tmp / "bad.toml"
    path.write_text(
        render_config(
            {
                "server": {
                    "listen": ["127.0.0.1:99999", "nonsense"],
                    "mode": "forked",
                    "handler": "no.such.module:Handler",
                    "request_queue_size": 0,
                    "shutdown_timeout": "soon",
                    "colour": "blue",
                },
                "logging": {"level": "loud", "format": "xml"},
            }
        )
    )
    for args in (["--config", str(path)], ["--check-config", "--config", str(path)]):
        result = run_sockd(*args)
        assert result.returncode == 78
        err = result.stderr
        assert "Traceback" not in err
        assert 'server.mode: expected "threading" or "forking", got "forked"' in err
        assert "server.listen:" in err and "99999" in err and "nonsense" in err
        assert "server.handler:" in err and "no.such.module" in err
        assert "server.request_queue_size:" in err
        assert "server.shutdown_timeout:" in err
        assert "server.colour: unknown key" in err
        assert "logging.level:" in err
        assert "logging.format:" in err


def test_toml_syntax_error_keeps_line_and_column(short_tmp: Path) -> None:
    """A TOML syntax error names its line and column; exit 78."""
    path = short_tmp / "syntax.toml"
    path.write_text("[server]\nshutdown_timeout = 5\nmode = threading\n")
    result = run_sockd("--check-config", "--config", str(path))
    assert result.returncode == 78
    assert "line 3, column 8" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_accepts_example_config() -> None:
    """The shipped etc/sockd.toml validates."""
    result = run_sockd("--check-config", "--config", str(REPO / "etc" / "sockd.toml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_handler_that_is_not_a_request_handler(short_tmp: Path) -> None:
    """A handler path naming something other than a BaseRequestHandler subclass is rejected."""
    path = short_tmp / "h.toml"
    path.write_text('[server]\nhandler = "json:JSONDecoder"\n')
    result = run_sockd("--check-config", "--config", str(path))
    assert result.returncode == 78
    assert "not a socketserver.BaseRequestHandler subclass" in result.stderr


def test_missing_config_file_exits_78(short_tmp: Path) -> None:
    """A missing config file is a config error naming the path."""
    result = run_sockd("--config", str(short_tmp / "absent.toml"))
    assert result.returncode == 78
    assert "absent.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_error_exits_2() -> None:
    """An unknown option is a usage error (exit 2)."""
    assert run_sockd("--no-such-option").returncode == 2


def test_json_action_handler_over_real_socket(sockd_factory: Any, short_tmp: Path) -> None:
    """JSON actions dispatch; errors come back as JSON and the connection stays usable."""
    config = base_config(short_tmp, handler="tests.handlers:Calculator")
    config["server.handler_options"] = {"max_line_bytes": 1024}
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()

    with connect(address) as sock:

        def ask(raw: bytes) -> dict[str, Any]:
            sock.sendall(raw + b"\n")
            reply: dict[str, Any] = json.loads(recv_line(sock))
            return reply

        assert ask(b'{"action": "add", "values": [1, 2, 3], "id": 7}') == {
            "ok": True,
            "result": 6,
            "id": 7,
        }
        assert ask(b'{"action": "echo", "text": "hi"}')["result"] == "hi"
        assert ask(b'{"action": "helper"}')["error"]["code"] == "unknown_action"
        assert ask(b'{"action": "secret"}')["error"]["code"] == "unknown_action"
        assert ask(b'{"action": "__init__"}')["error"]["code"] == "unknown_action"
        assert ask(b"{not json")["error"]["code"] == "bad_json"
        assert ask(b"[1, 2]")["error"]["code"] == "bad_request"
        assert ask(b'{"action": "add", "values": "x"}')["error"]["code"] == "bad_request"
        assert ask(b'{"action": "fail"}')["error"]["code"] == "internal"
        assert ask(b'{"text": "' + b"a" * 5000 + b'"}')["error"]["code"] == "line_too_long"
        assert ask(b'{"action": "add", "values": [40, 2]}')["result"] == 42
    error = proc.wait_for("handler.error")
    assert error["action"] == "fail"
    assert "action failed on purpose" in error["exception"]


def test_logfmt_and_console_formats(sockd_factory: Any, short_tmp: Path) -> None:
    """logfmt gives key=value lines; console gives readable uncoloured lines off a terminal."""
    for fmt in ("logfmt", "console"):
        config = base_config(short_tmp)
        config["logging"]["format"] = fmt
        proc = sockd_factory(config, name=f"{fmt}.toml")
        line = proc.wait_line(lambda x: "server.listening" in x)
        if fmt == "logfmt":
            assert line.startswith("timestamp=")
            assert "level=info" in line and "event=server.listening" in line
            assert "address=127.0.0.1:" in line
        else:
            assert "server.listening" in line and "address=127.0.0.1:" in line
            assert "\x1b[" not in line  # no colour codes when not a terminal
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
