"""Threading mode's spare threads against the real daemon: reused, fresh, bounded, live."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sockctl.client import ControlClient
from tests.conftest import base_config, connect, metric, recv_line, render_config

DEADLINE = 10.0


def wait_metric(ctl: ControlClient, name: str, want: float) -> None:
    deadline = time.monotonic() + DEADLINE
    while (got := metric(ctl, name)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed {got}, expected {want}")
        time.sleep(0.005)  # sleep-ok: polling /metrics with a deadline


def ask(address: tuple[str, int]) -> dict[str, Any]:
    with connect(address) as sock:
        reply: dict[str, Any] = json.loads(recv_line(sock))
        return reply


def alive(pid: int, tids: set[int]) -> set[int]:
    """Which of these threads of ``pid`` still exist."""
    return tids & {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def wait_alive(pid: int, tids: set[int], count: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while len(alive(pid, tids)) != count:
        assert time.monotonic() < deadline, f"{alive(pid, tids)} still alive, expected {count}"
        time.sleep(0.005)  # sleep-ok: polling /proc with a deadline


def test_a_thread_serves_one_connection_after_another(sockd_factory: Any, short_tmp: Path) -> None:
    """Sequential connections share one thread, named after each connection in turn,
    and none sees a context variable an earlier connection set."""
    proc = sockd_factory(base_config(short_tmp, handler="tests.handlers:WhoAmI"))
    (address,) = proc.wait_ready()
    ctl = ControlClient(str(short_tmp / "ctl.sock"), timeout=10)
    replies = []
    for _ in range(10):
        replies.append(ask(address))
        wait_metric(ctl, "sockd_threads_spare", 1)
    assert metric(ctl, "sockd_threads_started_total") == 1
    assert len({r["native_id"] for r in replies}) == 1
    assert [r["thread"] for r in replies] == [f"conn-{i}" for i in range(1, 11)]
    assert [r["visits"] for r in replies] == [0] * 10
    assert len(proc.wait_count("conn.close", 10)) == 10


def test_max_spare_threads_zero_starts_a_thread_per_connection(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """max_spare_threads = 0: every connection gets a thread of its own, none waits."""
    proc = sockd_factory(
        base_config(short_tmp, handler="tests.handlers:WhoAmI", max_spare_threads=0)
    )
    (address,) = proc.wait_ready()
    ctl = ControlClient(str(short_tmp / "ctl.sock"), timeout=10)
    for _ in range(5):
        assert ask(address)["visits"] == 0
    proc.wait_count("conn.close", 5)
    assert metric(ctl, "sockd_threads_started_total") == 5
    assert metric(ctl, "sockd_threads_spare") == 0


def test_reload_trims_spare_threads_and_forking_lets_them_all_go(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """A reload lowering max_spare_threads ends the extra spare threads at once; a switch
    to forking ends them all, and the next connection is served by a child."""
    config = base_config(short_tmp, handler="tests.handlers:WhoAmI")
    proc = sockd_factory(config)
    (address,) = proc.wait_ready()
    pid = proc.proc.pid
    ctl = ControlClient(str(short_tmp / "ctl.sock"), timeout=10)
    # Three connections open at once need three threads; all wait afterwards.
    socks = [connect(address) for _ in range(3)]
    replies = [json.loads(recv_line(sock)) for sock in socks]
    tids = {r["native_id"] for r in replies}
    assert len(tids) == 3
    for sock in socks:
        sock.close()
    wait_metric(ctl, "sockd_threads_spare", 3)
    assert alive(pid, tids) == tids

    config["server"]["max_spare_threads"] = 1
    proc.config_path.write_text(render_config(config))
    changes = ctl.reload()["changes"]
    assert [c["key"] for c in changes] == ["server.max_spare_threads"]
    assert metric(ctl, "sockd_threads_spare") == 1
    wait_alive(pid, tids, 1)

    config["server"]["mode"] = "forking"
    proc.config_path.write_text(render_config(config))
    ctl.reload()
    assert metric(ctl, "sockd_threads_spare") == 0
    wait_alive(pid, tids, 0)
    mark = proc.mark()
    assert ask(address)["visits"] == 0
    closed = proc.wait_for("conn.close", start=mark)
    assert closed["pid"] != pid  # served by a forked child now
