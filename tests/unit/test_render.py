"""sockctl's views: pure functions from control-API answers to text."""

from __future__ import annotations

import math
import tomllib
from datetime import UTC
from typing import Any

import click
import pytest

from sockctl import render
from sockctl.client import ConfigDump, Connection, ReloadResult, Stats, Status
from sockd.protocol import METRICS, METRICS_BY_NAME, MetricKind, Stat

STATUS: Status = {
    "api_version": 1,
    "pid": 4242,
    "version": "0.1.0",
    "state": "running",
    "started_at": "2026-11-27T10:00:00.000000Z",
    "uptime_s": 12.5,
    "mode": "threading",
    "handler": "sockd.handlers:EchoHandler",
    "listen": ["127.0.0.1:9000", "[::1]:9000"],
    "config_path": "/etc/sockd/sockd.toml",
    "generation": 1,
    "log_level": "info",
    "connections": {"active": 3, "total": 120, "refused": 0},
    "last_reload": None,
}


def _conn(**overrides: Any) -> Connection:
    conn: Connection = {
        "id": 17,
        "peer": "127.0.0.1:51234",
        "listen": "127.0.0.1:9000",
        "started_at": "2026-11-27T10:00:00Z",
        "age_s": 192.0,
        "bytes_in": 120,
        "bytes_out": 1_300_000,
        "pid": None,
    }
    conn.update(overrides)  # type: ignore[typeddict-item]  # test data, keys are valid
    return conn


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1229, "1.2 KiB"),
        (1_300_000, "1.2 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**5, "3072.0 TiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    """Byte counts use binary units with one decimal above plain bytes."""
    assert render.human_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (3.21, "3.2s"),
        (42.9, "42s"),
        (192, "3m 12s"),
        (7500, "2h 5m"),
        (3 * 86400 + 4 * 3600 + 5, "3d 4h"),
        (-1, "-"),
        (math.nan, "-"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    """Durations show at most two units, and nonsense shows as a dash."""
    assert render.human_duration(seconds) == text


def test_timestamp_in_a_given_zone() -> None:
    """ISO timestamps read as date, time and zone; unparsable ones pass through."""
    assert render.timestamp("2026-11-27T10:00:00.5Z", UTC) == "2026-11-27 10:00:00 UTC"
    assert render.timestamp("yesterday", UTC) == "yesterday"


def test_status_view_fields_are_aligned() -> None:
    """The status view has a headline, then every label's value in one column."""
    text = render.status_view(STATUS, tz=UTC)
    lines = text.splitlines()
    assert lines[0] == "sockd 0.1.0 (pid 4242): running"
    assert "  uptime:      12s, since 2026-11-27 10:00:00 UTC" in lines
    assert "  listen:      127.0.0.1:9000, [::1]:9000" in lines
    assert "  config:      /etc/sockd/sockd.toml (generation 1)" in lines
    assert len({len(line) - len(line.split(": ", 1)[1].lstrip()) for line in lines[1:]}) == 1
    assert all(len(line) <= 80 for line in lines)


def test_status_view_shows_a_rejected_reload_with_its_errors() -> None:
    """A rejected last reload is summarised and each of its errors listed."""
    status: Status = {
        **STATUS,
        "last_reload": {
            "at": "2026-11-27T10:05:00Z",
            "result": "rejected",
            "generation": 1,
            "changes": [],
            "errors": ["server.mode: expected a mode", "server.bogus: unknown key"],
        },
    }
    lines = render.status_view(status, tz=UTC).splitlines()
    assert lines[-3] == (
        "  last reload: rejected at 2026-11-27 10:05:00 UTC (generation 1, 2 errors)"
    )
    assert lines[-2:] == ["    server.mode: expected a mode", "    server.bogus: unknown key"]


def test_status_view_colours_the_state_only_when_asked() -> None:
    """Colour is opt-in: the state is styled with it and plain without."""
    assert "\x1b[" not in render.status_view(STATUS)
    coloured = render.status_view(STATUS, color=True)
    assert click.style("running", fg="green", bold=True) in coloured


def test_connections_table_aligns_and_humanises() -> None:
    """Columns line up, numbers are right-aligned, pid null reads as a dash."""
    rows = [_conn(), _conn(id=1234, peer="[2001:db8::1]:40000", bytes_in=5, pid=99)]
    lines = render.connections_table(rows).splitlines()
    assert lines[0].split() == ["ID", "PEER", "LISTEN", "AGE", "IN", "OUT", "PID"]
    assert lines[1].startswith("  17  127.0.0.1:51234 ")
    assert lines[1].endswith("3m 12s  120 B  1.2 MiB    -")
    assert lines[2].startswith("1234  [2001:db8::1]:40000")
    assert lines[2].endswith("3m 12s    5 B  1.2 MiB   99")
    assert lines[-1] == "2 connections"
    assert all(len(line) <= 80 for line in lines)


def test_connections_table_unknown_byte_counts() -> None:
    """Byte counts the daemon could not read (null) show as a dash."""
    lines = render.connections_table([_conn(bytes_in=None, bytes_out=None)]).splitlines()
    assert lines[1].split()[-4:] == ["12s", "-", "-", "-"]


def test_connections_table_empty() -> None:
    """No connections is a sentence."""
    assert render.connections_table([]) == "no open connections"


def test_config_view_is_valid_toml() -> None:
    """The config view parses as TOML to the same values, unset keys left as comments."""
    dump: ConfigDump = {
        "path": "/etc/sockd/sockd.toml",
        "generation": 3,
        "config": {
            "server": {
                "listen": ["127.0.0.1:9000"],
                "reuse_port": False,
                "shutdown_timeout": 30.0,
                "handler_options": {"greeting": 'say "hi"', "odd key": 1},
            },
            "control": {"mode": "0660", "group": None},
        },
    }
    text = render.config_view(dump)
    assert text.splitlines()[0] == "# /etc/sockd/sockd.toml (generation 3), effective values"
    assert 'listen           = ["127.0.0.1:9000"]' in text
    assert "# group is not set" in text
    parsed = tomllib.loads(text)
    assert parsed["server"] == dump["config"]["server"]
    assert parsed["control"] == {"mode": "0660"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (3, "3"),
        (2.5, "2.5"),
        (math.inf, "inf"),
        ("a\nb", '"a\\nb"'),
        ([1, "x"], '[1, "x"]'),
        ({}, "{}"),
        ({"a": 1}, "{ a = 1 }"),
        (None, '""'),
    ],
)
def test_toml_value(value: Any, text: str) -> None:
    """Values print as TOML literals."""
    assert render.toml_value(value) == text


def test_reload_view_lists_changes() -> None:
    """An applied reload lists `key: old -> new`, with unset values named."""
    text = render.reload_view(
        {
            "result": "applied",
            "generation": 2,
            "changes": [
                {"key": "logging.level", "old": "info", "new": "debug"},
                {"key": "control.group", "old": None, "new": "ops"},
            ],
        }
    )
    assert text.splitlines() == [
        "reload applied: generation 2, 2 changes",
        '  logging.level: "info" -> "debug"',
        '  control.group: (not set) -> "ops"',
    ]


def test_reload_view_without_changes() -> None:
    """A reload of an unchanged file says so."""
    answer: ReloadResult = {"result": "applied", "generation": 4, "changes": []}
    assert render.reload_view(answer) == "reload applied: generation 4, no changes"


def test_error_lines_for_a_rejected_reload() -> None:
    """A rejected reload's error says once that the daemon kept its config, then lists problems."""
    message = (
        "reload rejected: the configuration has 2 problems; the daemon keeps running as before"
    )
    assert render.error_lines(message, ["a: x", "b: y"], config=True) == [
        "reload rejected, sockd keeps its current configuration (2 problems):",
        "  a: x",
        "  b: y",
    ]
    assert render.error_lines(message, ["a: x"], config=True)[0] == (
        "reload rejected, sockd keeps its current configuration (1 problem):"
    )
    assert render.error_lines("plain") == ["plain"]


def test_error_lines_for_a_rejected_reload_without_problems() -> None:
    """A rejection that lists no problems shows the daemon's own message, unprefixed."""
    message = "reload rejected: the daemon keeps running as before"
    assert render.error_lines(message, [], config=True) == [message]


def test_small_views() -> None:
    """Stop, pause/resume, log-level, reopen and kick read as sentences."""
    assert render.stop_view({"state": "draining", "timeout": 5.0, "active": 1}) == (
        "sockd is draining: waiting up to 5.0s for 1 open connection to finish"
    )
    assert render.stop_view({"state": "draining", "timeout": 5.0, "active": 0}) == (
        "sockd is stopping: no open connections"
    )
    assert render.state_view({"state": "paused"}).startswith("sockd is paused")
    assert render.state_view({"state": "draining"}) == "sockd is draining"
    assert render.log_level_view({"level": "debug", "previous": "info"}).startswith(
        "log level: info -> debug"
    )
    assert render.reopen_view({"reopened": False, "output": "stdout"}) == (
        "nothing to reopen: logs go to stdout"
    )
    assert render.closed_view({"closed": 3}) == "closed connection 3"


def stats(*rows: tuple[str, dict[str, str], float]) -> Stats:
    """A ``GET /v1/stats`` answer holding these samples (name, labels, value), in order."""
    metrics: list[Stat] = []
    for name, labels, value in rows:
        if not metrics or metrics[-1]["name"] != name:
            spec = METRICS_BY_NAME.get(name)
            kind: MetricKind = spec.kind if spec else "gauge"
            metrics.append({"name": name, "kind": kind, "help": "", "samples": []})
        metrics[-1]["samples"].append({"labels": labels, "value": value})
    return {"metrics": metrics}


STATS = stats(
    ("sockd_connections_open", {}, 3),
    ("sockd_connections_refused_total", {"reason": "limit"}, 4),
    ("sockd_connections_refused_total", {"reason": "denied"}, 1),
    ("sockd_bytes_sent_total", {}, 1300000),
    ("sockd_info", {"version": "0.1.0", "mode": "forking"}, 1),
    ("process_open_fds", {}, 12),
    ("weird_metric", {"path": 'a "quoted" \\ value'}, 0.5),
)


def test_stats_samples() -> None:
    """A stats answer flattens to its samples in order, with names, labels and values."""
    samples = render.stats_samples(STATS)
    assert [s.name for s in samples] == [
        "sockd_connections_open",
        "sockd_connections_refused_total",
        "sockd_connections_refused_total",
        "sockd_bytes_sent_total",
        "sockd_info",
        "process_open_fds",
        "weird_metric",
    ]
    assert samples[1].labels == {"reason": "limit"}
    assert samples[3].value == 1_300_000
    assert samples[-1].labels == {"path": 'a "quoted" \\ value'}
    assert samples[0].as_json() == {"name": "sockd_connections_open", "labels": {}, "value": 3}
    assert render.Sample("x", math.inf).as_json()["value"] == "inf"


def test_metrics_view() -> None:
    """Known metrics get names and units, labelled ones a breakdown, unknown ones follow."""
    lines = render.metrics_view(render.stats_samples(STATS)).splitlines()
    assert lines == [
        "sockd:               version=0.1.0, mode=forking",
        "connections open:    3",
        "connections refused: 5 (limit: 4, denied: 1)",
        "bytes sent:          1.2 MiB",
        "process_open_fds:    12",
        'weird_metric{path=a "quoted" \\ value}: 0.5',
    ]
    assert render.metrics_view([]) == "no metrics"


def test_metrics_view_labels_sockd_thread_and_throttle_metrics() -> None:
    """sockd's thread and throttle metrics read by label, like its other metrics, not raw."""
    answer = stats(
        ("sockd_throttled_total", {"reason": "max_connections"}, 2),
        ("sockd_threads_started_total", {}, 5),
        ("sockd_threads_spare", {}, 1),
    )
    lines = render.metrics_view(render.stats_samples(answer)).splitlines()
    assert lines == [
        "throttled:       2 (max_connections: 2)",
        "threads started: 5",
        "spare threads:   1",
    ]


def test_metrics_view_leaves_zero_reasons_out_of_the_breakdown() -> None:
    """sockd exports every reason from the start; stats shows only those that happened."""
    answer = stats(
        ("sockd_connections_refused_total", {"reason": "denied"}, 1),
        ("sockd_connections_refused_total", {"reason": "max_connections"}, 0),
        ("sockd_reloads_total", {"result": "applied"}, 0),
        ("sockd_reloads_total", {"result": "rejected"}, 0),
    )
    lines = render.metrics_view(render.stats_samples(answer)).splitlines()
    assert lines == ["connections refused: 1 (denied: 1)", "reloads:             0"]


def test_metrics_view_knows_every_catalogued_metric() -> None:
    """Every metric in sockd.protocol's catalogue reads by a label in stats, none raw."""
    answer = stats(*((spec.name, {}, 1) for spec in METRICS))
    shown = render.metrics_view(render.stats_samples(answer))
    assert "sockd_" not in shown


def test_reload_view_of_a_dry_run() -> None:
    """A dry run says it applied nothing, with the changes a reload would make."""
    none: Any = {"result": "valid", "generation": 4, "changes": []}
    assert render.reload_view(none) == "dry run: the config file is valid and changes nothing"
    some: Any = {
        "result": "valid",
        "generation": 4,
        "changes": [{"key": "server.max_connections", "old": 0, "new": 10}],
    }
    assert render.reload_view(some).splitlines() == [
        "dry run: the config file is valid; a reload would apply 1 change:",
        "  server.max_connections: 0 -> 10",
    ]
    assert render.error_lines("x", ["a: b"], config=True, dry_run=True) == [
        "dry run: the config file has 1 problem; nothing was applied:",
        "  a: b",
    ]


def test_log_line_plain() -> None:
    """A log event reads `HH:MM:SS.mmm LEVEL event key=value`, quoting where needed."""
    event = {
        "timestamp": "2026-11-27T10:00:01.250000Z",
        "level": "warning",
        "event": "conn.close",
        "id": 17,
        "reason": "idle timeout",
        "bytes_in": 0,
        "tags": ["a", "b"],
        "peer": None,
    }
    assert render.log_line(event, tz=UTC) == (
        '10:00:01.250 WARNING  conn.close id=17 reason="idle timeout" bytes_in=0 '
        'tags=["a","b"] peer=null'
    )


def test_log_line_epoch_and_missing_timestamps() -> None:
    """Epoch-second timestamps work; a missing one shows a dash in the same width."""
    assert render.log_line({"ts": 0.5, "level": "info", "event": "x"}, tz=UTC) == (
        "00:00:00.500 INFO     x"
    )
    assert render.log_line({"level": "info", "event": "x"}) == "-            INFO     x"


def test_log_line_puts_tracebacks_below() -> None:
    """A multi-line field follows on indented lines instead of one escaped value."""
    event = {
        "timestamp": "2026-11-27T10:00:01Z",
        "level": "error",
        "event": "handler.error",
        "exception": "Traceback (most recent call last):\n  boom\nValueError: x\n",
    }
    assert render.log_line(event, tz=UTC).splitlines() == [
        "10:00:01.000 ERROR    handler.error",
        "  exception:",
        "    Traceback (most recent call last):",
        "      boom",
        "    ValueError: x",
    ]


def test_log_line_colour() -> None:
    """With colour the level is styled by severity and the text is otherwise the same."""
    event = {"timestamp": "2026-11-27T10:00:01Z", "level": "error", "event": "e", "k": "v"}
    coloured = render.log_line(event, color=True, tz=UTC)
    assert click.style("ERROR   ", fg="red") in coloured
    assert click.unstyle(coloured) == render.log_line(event, tz=UTC)
