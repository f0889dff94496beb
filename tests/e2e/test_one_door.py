"""Issue 10 item 1, one door into the lifecycle: every state-changing control command is an
event on the main loop's queue, so commands racing a stop are ordered with it.

Runs the real ``sockd`` as a subprocess on loopback and waits on what it says (a log line,
an answer, an exit) with a deadline.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sockctl.client import ControlClient, DaemonError
from sockd.protocol import ErrorCode
from tests.conftest import DEADLINE, base_config, connect

#: Threads hammering pause/resume, and calls each makes before (then after) the stop.
HAMMERS = 4
BEFORE_STOP = 10
AFTER_STOP = 20


def test_pause_racing_a_stop_never_leaves_the_daemon_paused_while_draining(
    sockd_factory: Any, short_tmp: Path
) -> None:
    """Pauses and resumes hammered from threads while a stop begins: once the stop is answered
    each is refused 409, the daemon says "draining", and no pause or resume is logged after
    server.stopping."""
    proc = sockd_factory(
        base_config(short_tmp, handler="tests.handlers:Silent", shutdown_timeout=30)
    )
    (address,) = proc.wait_ready()
    held = connect(address)  # holds the drain open until the test closes it
    proc.wait_for("test.blocked")
    path = str(short_tmp / "ctl.sock")
    warmed_up = threading.Barrier(HAMMERS + 1, timeout=DEADLINE)
    stop_answered = threading.Event()
    lock = threading.Lock()
    #: (sent after the stop was answered, "ok" or the error code)
    calls: list[tuple[bool, str]] = []
    failures: list[BaseException] = []

    def hammer(index: int) -> None:
        client = ControlClient(path, timeout=DEADLINE)
        made = after_stop = 0
        deadline = time.monotonic() + DEADLINE
        try:
            while after_stop < AFTER_STOP and time.monotonic() < deadline:
                after = stop_answered.is_set()
                command = client.pause if (made + index) % 2 == 0 else client.resume
                try:
                    command()
                    outcome = "ok"
                except DaemonError as exc:
                    outcome = exc.code
                with lock:
                    calls.append((after, outcome))
                made += 1
                after_stop += after
                if made == BEFORE_STOP:
                    warmed_up.wait()  # the stop goes out while every thread is mid-hammer
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            warmed_up.abort()

    threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(HAMMERS)]
    for thread in threads:
        thread.start()
    warmed_up.wait()
    mark = proc.mark()
    answer = ControlClient(path, timeout=DEADLINE).stop()
    stop_answered.set()
    assert answer["state"] == "draining"
    for thread in threads:
        thread.join(DEADLINE)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)
    after = [outcome for sent_after, outcome in calls if sent_after]
    assert len(after) == HAMMERS * AFTER_STOP
    assert set(after) == {ErrorCode.CONFLICT}, "a pause or resume after the stop was not refused"
    assert ControlClient(path, timeout=DEADLINE).status()["state"] == "draining"
    stopping = proc.wait_for("server.stopping", start=mark)
    logged = list(proc.events)
    after_stopping = logged[logged.index(stopping) + 1 :]
    late = [
        e["event"] for e in after_stopping if e.get("event") in ("server.paused", "server.resumed")
    ]
    assert not late, f"logged after server.stopping: {late}"
    held.close()
    assert proc.wait_exit() == 0
