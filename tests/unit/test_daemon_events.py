"""A ``Daemon`` driven by events on its queue, in process, its loops not started: the one
door into the lifecycle (issue 10 item 1)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import structlog

from sockd import daemon as daemon_module
from sockd import logs
from sockd.config import load
from sockd.control import BackendConflict, BackendUnavailable
from sockd.daemon import (
    Daemon,
    KickEvent,
    LogLevelEvent,
    PauseEvent,
    ReloadEvent,
    ReopenEvent,
    StopEvent,
    ValidatedEvent,
)
from sockd.protocol import State


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A Daemon built from a small config, logging to a file; structlog restored after."""
    path = tmp_path / "sockd.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\n'
        f'[logging]\noutput = "{tmp_path / "log"}"\n'
        f'[control]\nsocket = "{tmp_path / "ctl.sock"}"\n'
    )
    built = Daemon(load(str(path)))
    built.state = State.RUNNING  # as after _start(), without binding anything
    yield built
    # Six descriptors each, closed: the suite's later tests count theirs.
    for closeable in (built._waker, built.acceptor._waker, built.acceptor._selector):
        closeable.close()
    os.close(built.logs.sink.fd)
    structlog.reset_defaults()
    logs._active = None


def _answer(reply: Future[Any]) -> Any:
    assert reply.done(), "the main loop did not answer"
    return reply.result(timeout=0)


def test_every_event_kind_has_a_handler() -> None:
    """Each event class names, by its kind, a ``_handle_<kind>`` method of the daemon."""
    events = (StopEvent, ReloadEvent, ReopenEvent, PauseEvent, LogLevelEvent, KickEvent)
    for cls in (*events, ValidatedEvent):
        assert dataclasses.is_dataclass(cls)
        assert callable(getattr(Daemon, f"_handle_{cls.kind}", None)), cls


def test_pause_queued_after_a_stop_is_refused_and_changes_nothing(daemon: Daemon) -> None:
    """A pause and a resume handled after a stop are answered 409 and leave the pause alone."""
    pause: Future[dict[str, Any]] = Future()
    resume: Future[dict[str, Any]] = Future()
    daemon._post(StopEvent("control"))
    daemon._post(PauseEvent(True, pause))
    daemon._post(PauseEvent(False, resume))
    daemon._handle_events()
    for reply, verb in ((pause, "paused"), (resume, "resumed")):
        with pytest.raises(BackendConflict, match=f"draining; it cannot be {verb}"):
            _answer(reply)
    assert daemon.paused is False
    assert daemon.state == State.RUNNING  # the drain, not a pause, writes the next state


def test_pause_then_stop_in_one_batch_is_answered_in_order(daemon: Daemon) -> None:
    """A pause queued before a stop is applied and answered; the stop is still in force."""
    pause: Future[dict[str, Any]] = Future()
    stop: Future[StopEvent] = Future()
    daemon._post(PauseEvent(True, pause))
    daemon._post(StopEvent("control", 3.0, stop))
    daemon._handle_events()
    assert _answer(pause) == {"state": "paused"}
    assert daemon.state == State.PAUSED
    assert daemon.acceptor.paused is True
    assert _answer(stop).timeout == 3.0


def test_log_level_and_kick_answer_through_the_queue(daemon: Daemon) -> None:
    """A log-level change answers its level and the previous one; kicking an unknown id is False."""
    level: Future[dict[str, Any]] = Future()
    kick: Future[bool] = Future()
    daemon._post(LogLevelEvent("debug", level))
    daemon._post(KickEvent(12345, kick))
    daemon._handle_events()
    assert _answer(level) == {"level": "debug", "previous": "info"}
    assert daemon.logs.level_name == "debug"
    assert _answer(kick) is False


def test_a_command_the_main_loop_does_not_answer_is_unavailable(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend method whose event nobody handles in time raises BackendUnavailable (503)."""
    monkeypatch.setattr(daemon_module, "COMMAND_WAIT", 0.01)
    with pytest.raises(BackendUnavailable, match="did not answer the pause"):
        daemon.pause()
    with pytest.raises(BackendUnavailable, match="did not answer the log-level change"):
        daemon.set_log_level("debug")
    assert daemon.paused is False  # nothing changed: only the main thread writes it


def test_events_left_at_exit_are_told_the_daemon_stopped(daemon: Daemon) -> None:
    """What is still queued when run() ends is answered 503, not left to time out."""
    pause: Future[dict[str, Any]] = Future()
    daemon._post(PauseEvent(True, pause))
    daemon._refuse_waiting()
    with pytest.raises(BackendUnavailable, match="stopped"):
        _answer(pause)
