"""The conn.close fast path renders exactly what the generic renderer would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sockd import logs
from sockd.config import LoggingConfig
from sockd.connections import Connection, TrafficStats, log_close
from sockd.handlers import EchoHandler


@pytest.fixture(autouse=True)
def _restore_logging() -> Any:
    """Each test installs a LogSystem; put structlog and sockd.logs back afterwards."""
    yield
    import structlog

    structlog.reset_defaults()
    logs._active = None


class _Sock:
    def fileno(self) -> int:
        return -1


def _conn(peer: tuple[str, int], pid: int | None) -> Connection:
    conn = Connection(7, _Sock(), peer, "[::1]:9000", peer[0], EchoHandler, {}, None)  # type: ignore[arg-type]
    conn.pid = pid
    return conn


@pytest.mark.parametrize("pid", [None, 4242])
@pytest.mark.parametrize("stats", [TrafficStats(5, 6, 0), None])
@pytest.mark.parametrize("peer", [("127.0.0.1", 5000), ("fe80::1%eth0", 1)])
def test_fast_line_equals_generic_line(
    tmp_path: Path, pid: int | None, stats: TrafficStats | None, peer: tuple[str, int]
) -> None:
    """Same keys, same order, same values as logs.emit() with the JSON renderer."""
    out = tmp_path / "log"
    system = logs.LogSystem(LoggingConfig("info", "json", str(out), 100, "sockd"))
    conn = _conn(peer, pid)
    assert logs.json_line_sink() is system
    log_close(conn, stats, "kicked")
    fields: dict[str, Any] = conn.context()
    fields.update(
        duration_ms=0.5,
        bytes_in=stats.bytes_in if stats else None,
        bytes_out=stats.bytes_out if stats else None,
        ended="kicked",
    )
    logs.emit(logs.INFO, "conn.close", fields)
    fast, generic = (json.loads(line) for line in out.read_text().splitlines())
    for event in (fast, generic):
        event.pop("timestamp")
        event.pop("duration_ms")
    assert list(fast) == list(generic)
    assert fast == generic
    ring = system.ring.history(10)
    assert ring[0]["event"] == "conn.close" and ring[0]["conn_id"] == 7  # the ring parses it


def test_fast_path_off_for_other_formats(tmp_path: Path) -> None:
    """logfmt output (or a level above info) takes the generic path."""
    logs.LogSystem(LoggingConfig("info", "logfmt", str(tmp_path / "log"), 100, "sockd"))
    assert logs.json_line_sink() is None
    logs.LogSystem(LoggingConfig("warning", "json", str(tmp_path / "log2"), 100, "sockd"))
    assert logs.json_line_sink() is None
