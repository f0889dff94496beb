"""Pure formatting of control-API answers for people: text in, text out, no I/O.

Everything here is a function of its arguments (the clock and the local time zone are
parameters too), so the views are tested directly. Colour is applied with
``click.style`` only when the caller asks for it; ``click.echo`` strips it again when
the output is not a terminal. Views aim at 80 columns: labels are aligned, durations
and byte counts are humanised, and raw values stay available through ``--json``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

import click

from sockctl.client import (
    Change,
    Closed,
    ConfigDump,
    Connection,
    LogEvent,
    LogLevelResult,
    ReloadResult,
    ReopenResult,
    StateResult,
    Stats,
    Status,
    StopResult,
)

__all__ = [
    "Sample",
    "closed_view",
    "config_view",
    "connections_table",
    "dropped_notice",
    "error_lines",
    "human_bytes",
    "human_duration",
    "log_level_view",
    "log_line",
    "metrics_view",
    "reload_view",
    "reopen_view",
    "state_view",
    "stats_samples",
    "status_view",
    "stop_view",
    "timestamp",
    "toml_value",
]

_STATE_COLOURS = {
    "running": "green",
    "starting": "cyan",
    "paused": "yellow",
    "reloading": "cyan",
    "draining": "yellow",
    "stopped": "red",
}
_LEVEL_STYLES: dict[str, dict[str, Any]] = {
    "debug": {"fg": "blue"},
    "info": {"fg": "green"},
    "warning": {"fg": "yellow"},
    "error": {"fg": "red"},
    "critical": {"fg": "red", "bold": True},
}
#: Fields a log line shows in its fixed columns rather than as ``key=value``.
_LOG_FIXED = ("timestamp", "ts", "time", "level", "event")


def _style(text: str, color: bool, **styles: Any) -> str:
    return click.style(text, **styles) if color else text


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# --- units ----------------------------------------------------------------------------


def human_bytes(count: float) -> str:
    """``120 B``, ``1.2 KiB``, ``3.4 GiB``: binary units, one decimal above bytes."""
    if count < 1024:
        return f"{count:g} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def human_duration(seconds: float) -> str:
    """``250ms``, ``3.2s``, ``42s``, ``3m 12s``, ``2h 5m``, ``3d 4h``: two units at most."""
    if seconds < 0 or math.isnan(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _parse_time(value: object) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def timestamp(value: object, tz: tzinfo | None = None) -> str:
    """An ISO timestamp as ``2026-11-27 10:00:00 UTC`` in ``tz`` (None: local time)."""
    parsed = _parse_time(value)
    if parsed is None:
        return str(value)
    return parsed.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z").strip()


# --- values as TOML -------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """A value as a TOML literal (JSON string escapes are valid TOML basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if value is None:
        return '""'  # TOML has no null; sockd reads "" as "not set" for optional keys
    return json.dumps(str(value))


# --- views ----------------------------------------------------------------------------


def _fields(rows: Sequence[tuple[str, str]], indent: str = "  ", widest: int = 24) -> list[str]:
    """``label: value`` rows with values in one column; a label wider than ``widest``
    keeps its value right after it rather than pushing every row past 80 columns."""
    width = max((len(label) for label, _ in rows if len(label) <= widest), default=0) + 1
    return [f"{indent}{label + ':':<{width}} {value}" for label, value in rows]


def status_view(status: Status, color: bool = False, tz: tzinfo | None = None) -> str:
    """``sockctl status``: a headline with the state, then aligned fields."""
    state = status["state"]
    headline = f"sockd {status['version']} (pid {status['pid']}): " + _style(
        state, color, fg=_STATE_COLOURS.get(state), bold=True
    )
    counts = status["connections"]
    since = timestamp(status["started_at"], tz)
    config = status["config_path"] or "(defaults)"
    rows = [
        ("uptime", f"{human_duration(status['uptime_s'])}, since {since}"),
        ("mode", status["mode"]),
        ("handler", status["handler"]),
        ("listen", ", ".join(status["listen"]) or "-"),
        ("config", f"{config} (generation {status['generation']})"),
        ("log level", status["log_level"]),
        (
            "connections",
            f"{counts['active']} active, {counts['total']} total, {counts['refused']} refused",
        ),
    ]
    supervisor = status.get("supervisor")
    if supervisor:  # absent (an older daemon) or None (started by hand): no row
        rows.insert(1, ("supervisor", str(supervisor)))
    extra: list[str] = []
    last = status["last_reload"]
    if last:
        result = last["result"]
        summary = f"{result} at {timestamp(last['at'], tz)} (generation {last['generation']}"
        if result == "applied":
            summary += f", {_plural(len(last.get('changes', [])), 'change')})"
        else:
            summary += f", {_plural(len(last.get('errors', [])), 'error')})"
            summary = _style(summary, color, fg="red")
        rows.append(("last reload", summary))
        extra = [f"    {error}" for error in last.get("errors", [])]
    return "\n".join([headline, *_fields(rows), *extra])


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def connections_table(connections: Sequence[Connection]) -> str:
    """``sockctl connections``: one aligned row per connection, numbers right-aligned.

    Unknown values (no pid in threading mode, no byte counts without TCP_INFO) read ``-``.
    """
    if not connections:
        return "no open connections"
    rows = [
        (
            str(c["id"]),
            c["peer"],
            c["listen"],
            human_duration(c["age_s"]),
            "-" if c["bytes_in"] is None else human_bytes(c["bytes_in"]),
            "-" if c["bytes_out"] is None else human_bytes(c["bytes_out"]),
            "-" if c["pid"] is None else str(c["pid"]),
        )
        for c in connections
    ]
    table = _table(("ID", "PEER", "LISTEN", "AGE", "IN", "OUT", "PID"), rows, {0, 3, 4, 5, 6})
    return f"{table}\n{_plural(len(connections), 'connection')}"


def config_view(dump: ConfigDump) -> str:
    """``sockctl config``: the effective settings as TOML, aligned per section.

    The output is itself a valid sockd config file, so it can be diffed against or
    copied into ``sockd.toml``.
    """
    where = dump["path"] or "no config file, defaults"
    lines = [f"# {where} (generation {dump['generation']}), effective values"]
    for section, table in dump["config"].items():
        if not isinstance(table, Mapping):
            lines.append(f"{_toml_key(section)} = {toml_value(table)}")
            continue
        lines.append(f"\n[{_toml_key(section)}]")
        keys = [_toml_key(str(k)) for k in table]
        width = max((len(k) for k in keys), default=0)
        for key, value in zip(keys, table.values(), strict=True):
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{key:<{width}} = {toml_value(value)}")
    return "\n".join(lines)


def _changed(value: Any) -> str:
    return "(not set)" if value is None else toml_value(value)


def _change_lines(changes: Iterable[Change]) -> list[str]:
    return [f"  {c['key']}: {_changed(c['old'])} -> {_changed(c['new'])}" for c in changes]


def reload_view(result: ReloadResult) -> str:
    """``sockctl reload`` when applied: the generation and every ``key: old -> new``."""
    changes = result["changes"]
    if result["result"] == "valid":  # a dry run
        if not changes:
            return "dry run: the config file is valid and changes nothing"
        count = _plural(len(changes), "change")
        head = f"dry run: the config file is valid; a reload would apply {count}:"
        return "\n".join([head, *_change_lines(changes)])
    if not changes:
        return f"reload applied: generation {result['generation']}, no changes"
    head = f"reload applied: generation {result['generation']}, {_plural(len(changes), 'change')}"
    return "\n".join([head, *_change_lines(changes)])


def error_lines(
    message: str, errors: Sequence[str] = (), config: bool = False, dry_run: bool = False
) -> list[str]:
    """An error as lines for stderr: the message, then each problem indented.

    ``config`` marks a rejected reload (``invalid_config``), which leaves the daemon as
    it was: the headline says so once, with the number of problems, and the problems
    follow. The daemon's own message says the same in other words (``reload rejected:
    the configuration has 2 problems; ...``), so it is not repeated after it; it is
    shown only when the answer lists no problems, as then it is all there is.
    """
    head = message
    if config and errors:
        count = _plural(len(errors), "problem")
        head = (
            f"dry run: the config file has {count}; nothing was applied:"
            if dry_run
            else f"reload rejected, sockd keeps its current configuration ({count}):"
        )
    return [head, *(f"  {error}" for error in errors)]


def supervisor_warning(
    supervisor: str | None, daemon_pid: int | None, mainpid: str | None = None
) -> str | None:
    """What ``sockctl stop`` says before stopping a daemon systemd supervises, if anything.

    systemd sees that stop as a clean exit: the unit goes inactive and ``Restart=``
    does not bring it back. Nothing is said when sockctl is the unit's own command
    (``ExecStop=``: systemd sets ``$MAINPID`` to the daemon's pid), nor by a daemon too
    old to report its supervisor.
    """
    if supervisor != "systemd" or (daemon_pid is not None and mainpid == str(daemon_pid)):
        return None
    return (
        "sockd runs under systemd: use systemctl stop sockd (or sockd@NAME), or "
        "systemd will not restart it (Restart= sees a clean exit); stopping it anyway"
    )


def stop_view(result: StopResult) -> str:
    """``sockctl stop``: what the daemon is draining and for how long at most."""
    if not result["active"]:
        return "sockd is stopping: no open connections"
    active = _plural(result["active"], "open connection")
    limit = human_duration(result["timeout"])
    return f"sockd is {result['state']}: waiting up to {limit} for {active} to finish"


def state_view(result: StateResult) -> str:
    """``sockctl pause`` / ``resume``: the state the daemon is now in."""
    state = result["state"]
    if state == "paused":
        return "sockd is paused: new connections wait, open ones continue"
    if state == "running":
        return "sockd is running: accepting new connections"
    return f"sockd is {state}"


def log_level_view(result: LogLevelResult) -> str:
    """``sockctl log-level``: before and after, and how long it lasts."""
    return (
        f"log level: {result['previous']} -> {result['level']} (until the next reload or restart)"
    )


def reopen_view(result: ReopenResult) -> str:
    """``sockctl reopen-logs``."""
    if result["reopened"]:
        return f"reopened the log output: {result['output']}"
    return f"nothing to reopen: logs go to {result['output']}"


def closed_view(result: Closed) -> str:
    """``sockctl kick``."""
    return f"closed connection {result['closed']}"


# --- metrics --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of a metric (``GET /v1/stats``), with its labels."""

    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """``--json`` shape: numbers stay numbers, except NaN and infinities (strings)."""
        value: Any = self.value
        if math.isnan(self.value) or math.isinf(self.value):
            value = str(self.value)
        elif self.value.is_integer():
            value = int(self.value)
        return {"name": self.name, "labels": self.labels, "value": value}


def stats_samples(stats: Stats) -> list[Sample]:
    """Every sample of a ``GET /v1/stats`` answer, flat, in the daemon's order."""
    return [
        Sample(metric["name"], float(sample["value"]), dict(sample["labels"]))
        for metric in stats["metrics"]
        for sample in metric["samples"]
    ]


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"


def _bytes(value: float) -> str:
    return human_bytes(value)


def _seconds(value: float) -> str:
    return human_duration(value)


#: Known metrics: label shown, how the value reads. Unknown ones are listed raw after.
_KNOWN_METRICS: dict[str, tuple[str, Any]] = {
    "sockd_info": ("sockd", None),
    "sockd_uptime_seconds": ("uptime", _seconds),
    "sockd_connections_open": ("connections open", _number),
    "sockd_connections_total": ("connections total", _number),
    "sockd_connections_refused_total": ("connections refused", _number),
    "sockd_bytes_received_total": ("bytes received", _bytes),
    "sockd_bytes_sent_total": ("bytes sent", _bytes),
    "sockd_handler_errors_total": ("handler errors", _number),
    "sockd_accept_errors_total": ("accept errors", _number),
    "sockd_throttled_total": ("throttled", _number),
    "sockd_threads_started_total": ("threads started", _number),
    "sockd_threads_spare": ("spare threads", _number),
    "sockd_children_killed_total": ("children killed", _number),
    "sockd_reloads_total": ("reloads", _number),
}


def _labels_text(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def metrics_view(samples: Sequence[Sample]) -> str:
    """``sockctl stats``: known sockd metrics by name, labelled ones broken down.

    A labelled counter shows its total, then each label value that is not 0 in
    parentheses (``reloads: 3 (applied: 2, rejected: 1)``); anything unknown follows in
    raw form.
    """
    by_name: dict[str, list[Sample]] = {}
    for sample in samples:
        by_name.setdefault(sample.name, []).append(sample)
    rows: list[tuple[str, str]] = []
    for name, (label, fmt) in _KNOWN_METRICS.items():
        group = by_name.pop(name, [])
        if not group:
            continue
        if fmt is None:  # an info metric: its labels are the value
            rows.append((label, "; ".join(_labels_text(s.labels) for s in group)))
        elif len(group) == 1 and not group[0].labels:
            rows.append((label, fmt(group[0].value)))
        else:
            # Zero series (sockd exports every known reason from the start) are noise here.
            parts = [
                f"{', '.join(s.labels.values()) or '-'}: {fmt(s.value)}" for s in group if s.value
            ]
            total = sum(s.value for s in group)
            rows.append((label, f"{fmt(total)} ({', '.join(parts)})" if parts else fmt(total)))
    for name, group in by_name.items():
        for sample in group:
            shown = f"{name}{{{_labels_text(sample.labels)}}}" if sample.labels else name
            rows.append((shown, _number(sample.value)))
    if not rows:
        return "no metrics"
    return "\n".join(_fields(rows, indent=""))


# --- logs -----------------------------------------------------------------------------


def _log_value(value: Any) -> str:
    if isinstance(value, str):
        if value and not re.search(r'[\s"=]', value):
            return value
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def log_line(event: LogEvent, color: bool = False, tz: tzinfo | None = None) -> str:
    """``HH:MM:SS.mmm LEVEL    event key=value ...``, in ``tz`` (None: local time).

    Multi-line string fields (a traceback in ``exception``) follow on indented lines
    instead of being escaped into one unreadable value.
    """
    stamp = next((event[k] for k in ("timestamp", "ts", "time") if k in event), None)
    parsed = _parse_time(stamp)
    if parsed is not None:
        clock = parsed.astimezone(tz).strftime("%H:%M:%S.%f")[:-3]
    else:
        clock = str(stamp or "-").ljust(12)
    if event.get("event") == "logs.dropped":
        return dropped_notice(event, clock, color)
    level = str(event.get("level", "-")).lower()
    level_text = _style(f"{level.upper():<8}", color, **_LEVEL_STYLES.get(level, {}))
    parts = [
        _style(clock, color, dim=True),
        level_text,
        _style(str(event.get("event", "")), color, bold=True),
    ]
    trailing: list[str] = []
    for key, value in event.items():
        if key in _LOG_FIXED:
            continue
        if isinstance(value, str) and "\n" in value:
            trailing.append(_style(f"  {key}:", color, fg="cyan"))
            trailing.extend(f"    {line}" for line in value.rstrip("\n").splitlines())
            continue
        parts.append(_style(key, color, fg="cyan") + "=" + _log_value(value))
    return "\n".join([" ".join(parts), *trailing])


def dropped_notice(event: LogEvent, clock: str = "", color: bool = False) -> str:
    """The one line ``logs -f`` shows where the daemon dropped events it could not send.

    ``logs.dropped`` is not a logged event but the stream's own note: this reader fell
    behind (the daemon keeps a bounded queue per follower and drops the oldest).
    """
    missed = event.get("missed")
    count = f"{missed:,}" if isinstance(missed, int) else "some"
    noun = "event" if missed == 1 else "events"
    text = f"-- {count} log {noun} missed here: this stream fell behind sockd's log --"
    return " ".join(
        part for part in (_style(clock, color, dim=True), _style(text, color, fg="yellow")) if part
    )
