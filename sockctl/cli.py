"""The ``sockctl`` command: click commands that call the client and print a view.

Each command is three lines of intent: ask the client, pick the view (``render``) or
the raw JSON, print. Failures are never handled in a command: the client raises a
``SockctlError`` carrying its exit status, and ``SockctlGroup.invoke`` is the one place
that turns it into ``sockctl: <message>`` on stderr and that status. It is also the
edge that turns any unexpected exception into one line and exit 1 instead of a
traceback. ``sys.exit`` is left to click's ``main``.

Why not ``click.ClickException`` for these: click declares its ``exit_code`` as a class
variable, while ours depends on the instance (a daemon error is 1 or 78 by its code),
and the client stays usable without click. Usage errors remain click's own (exit 2),
except an empty ``--socket``: click's parser accepts it, so ``main`` refuses it with a
``SockctlError`` carrying exit 2, one line like every other sockctl error; and numbers
(``Seconds``, ``Count``, ``ConnectionId``), which are checked against the ranges the
daemon accepts (``sockd.protocol``) and refused locally in one line (``UsageProblem``),
so nothing the daemon would refuse is sent.

Exit statuses: 0 success, 1 the daemon refused or failed, 2 usage, 3 not running or
unreachable, 4 permission denied, 5 control-API version mismatch, 78 invalid config.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from typing import Any

import click

from sockctl import render
from sockctl.client import ControlClient, DaemonError, SockctlError, wait_until_stopped
from sockd import __version__
from sockd.protocol import (
    API_VERSION,
    CONTROL_SOCKET_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_SOCKET,
    LOG_LEVEL_ALIASES,
    LOG_LEVELS,
    LOGS_MAX_N,
    MAX_CONNECTION_ID,
    MAX_STOP_TIMEOUT,
    ErrorCode,
    ExitCode,
    relative_to_config,
)

__all__ = ["ConfigFileError", "Settings", "SockctlGroup", "main"]

#: ``stop --wait`` allows this long beyond the drain timeout the daemon announced: the
#: process still has to close its listeners, flush its logs and exit.
WAIT_GRACE_S = 10.0
#: ``--timeout`` (waiting for an answer) at most: a day, as the daemon's stop timeout.
MAX_ANSWER_TIMEOUT = 86400.0


class ConfigFileError(SockctlError):
    """A ``--config`` file sockctl must read for its socket path is unusable: exit 78.

    One line naming the file, what is wrong (for a TOML syntax error, the line and
    column) and how to do without the file (``--socket``).
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(
            f"{path}: {problem} (sockctl reads only control.socket from it; "
            "--socket PATH does without it)",
            ExitCode.CONFIG,
        )
        self.path = path
        self.problem = problem


_TOML_WHERE = re.compile(
    r"^(?P<what>.*?) ?\((?P<where>at line \d+, column \d+|at end of document)\)$"
)


def _toml_problem(exc: tomllib.TOMLDecodeError) -> str:
    """``TOML syntax error at line 4, column 10: Invalid value``, on one line.

    tomllib (3.11) puts the position at the end of its message, in parentheses; it has
    no attributes for it before Python 3.14.
    """
    text = " ".join(str(exc).split())
    match = _TOML_WHERE.match(text)
    if match is None:
        return f"TOML syntax error: {text}"
    return f"TOML syntax error {match['where']}: {match['what']}"


def socket_from_config(path: str) -> str:
    """Only ``control.socket`` from a sockd config, leniently.

    The rest of the file is not validated here: ``sockctl --config F reload`` must reach
    the daemon even when F has errors elsewhere, so the daemon itself rejects it, logs
    ``reload.rejected`` and answers with every problem. Only a file that cannot be read
    or is not TOML at all stops sockctl (exit 78), and only when the socket's path must
    come from it: with ``--socket`` the file is never parsed.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigFileError(path, f"cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, _toml_problem(exc)) from None
    control = data.get("control")
    value = control.get("socket") if isinstance(control, dict) else None
    if isinstance(value, str) and value:
        return relative_to_config(value, path)  # as sockd reads it
    return DEFAULT_CONTROL_SOCKET


@dataclass
class Settings:
    """The global options, shared by every command through the click context."""

    socket: str | None = None
    config: str | None = None
    json: bool = False
    timeout: float = 30.0

    def socket_path(self) -> str:
        """``--socket`` > ``--config``'s ``control.socket`` > $SOCKD_CONTROL_SOCKET > default."""
        if self.socket is not None:  # never empty: ``main`` refuses that
            return self.socket
        if self.config:
            return socket_from_config(self.config)
        return os.environ.get(CONTROL_SOCKET_ENV) or DEFAULT_CONTROL_SOCKET

    def client(self) -> ControlClient:
        """A client for the socket; a ``--config`` file's owner is trusted as the daemon's
        user (root and our own uid always are; see ``ControlClient``)."""
        trusted: list[int] = []
        if self.config:
            # socket_path() says what is wrong with an unreadable file, if anything
            with contextlib.suppress(OSError):
                trusted.append(os.stat(self.config).st_uid)
        return ControlClient(self.socket_path(), timeout=self.timeout, trusted_uids=trusted)


pass_settings = click.make_pass_decorator(Settings)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _error_lines(exc: SockctlError) -> list[str]:
    if isinstance(exc, DaemonError):
        return render.error_lines(
            exc.message,
            exc.errors,
            config=exc.code == ErrorCode.INVALID_CONFIG,
            dry_run=exc.details.get("dry_run") is True,
        )
    return render.error_lines(exc.message)


class UsageProblem(click.UsageError):
    """A usage error in one line (``sockctl: MESSAGE``, exit 2), like every sockctl error.

    Raised while click parses an argument, it is shown by click's own handling: this
    only replaces click's usage banner with the one line.
    """

    def show(self, file: Any = None) -> None:
        click.echo(f"sockctl: {self.format_message()}", err=file is None, file=file)


def _option_name(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    if param.opts and param.opts[0].startswith("-"):
        return max(param.opts, key=len)
    return str(param.human_readable_name)


class Seconds(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A finite number of seconds from 0 (or above 0) to ``maximum``."""

    name = "SECONDS"

    def __init__(self, maximum: float, *, zero: bool = True) -> None:
        self.maximum = maximum
        self.zero = zero

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        low = number >= 0 if self.zero else number > 0
        if not (math.isfinite(number) and low and number <= self.maximum):
            bound = "from 0" if self.zero else "above 0 and up"
            raise UsageProblem(
                f"{_option_name(param)} must be a number of seconds {bound} to "
                f"{self.maximum:g}, got {str(value)!r}",
                ctx,
            )
        return number


class Count(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """An integer from 0 to ``maximum``."""

    name = "N"

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit() and len(text) <= len(str(self.maximum))):
            number = -1
        else:
            number = int(text)
        if not 0 <= number <= self.maximum:
            raise UsageProblem(
                f"{_option_name(param)} must be an integer from 0 to {self.maximum}, "
                f"got {str(value)!r}",
                ctx,
            )
        return number


class ConnectionId(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A connection id as ``sockctl connections`` lists it: an integer from 0 to 2**63-1."""

    name = "ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()):
            raise UsageProblem(
                f"expected a connection id (a non-negative integer), got {str(value)!r}", ctx
            )
        if len(text) > len(str(MAX_CONNECTION_ID)) or int(text) > MAX_CONNECTION_ID:
            raise UsageProblem(
                f"expected a connection id (an integer up to {MAX_CONNECTION_ID}), "
                f"got {str(value)[:40]!r}",
                ctx,
            )
        return int(text)


class LogLevel(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A log level, any case, or an alias (``warn``); converted to its canonical name."""

    name = "LEVEL"

    def get_metavar(self, *args: Any, **kwargs: Any) -> str:
        # (param) in click 8.1, (param, ctx) in 8.2: the choices either way
        return "{" + "|".join(LOG_LEVELS) + "}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        level = LOG_LEVEL_ALIASES.get(text, text)
        if level not in LOG_LEVELS:
            what = param.name if isinstance(param, click.Argument) else _option_name(param)
            raise UsageProblem(
                f"{what or 'level'} must be one of {', '.join(LOG_LEVELS)} "
                f"(or {', '.join(LOG_LEVEL_ALIASES)}), "
                f"got {str(value)[:40]!r}",
                ctx,
            )
        return level


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``COMMAND --json``: the same switch as ``sockctl --json COMMAND``."""
    if value:
        ctx.ensure_object(Settings).json = True


def _json_option() -> click.Option:
    return click.Option(
        ["--json"],
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print the raw JSON answer instead of a view (as sockctl --json).",
    )


class SockctlGroup(click.Group):
    """The command group; its ``invoke`` is where exceptions become exit statuses.

    Every command also takes ``--json`` after its name (``sockctl status --json``),
    added here so no command can miss it.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any("--json" in param.opts for param in cmd.params):
            cmd.params.append(_json_option())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SockctlError as exc:
            settings = ctx.find_object(Settings)
            if isinstance(exc, DaemonError) and settings is not None and settings.json:
                _emit_json(exc.as_json())  # scripts get the daemon's error object too
            for line in _error_lines(exc):
                click.echo(f"sockctl: {line}", err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise  # click's own handling: usage errors, explicit exits, Ctrl-C, EPIPE
        except Exception as exc:  # the edge: a bug must still not show a traceback
            click.echo(
                f"sockctl: unexpected error: {type(exc).__name__}: {exc} (a bug in sockctl)",
                err=True,
            )
            raise click.exceptions.Exit(ExitCode.FAILURE) from None


@click.group(
    cls=SockctlGroup,
    # Subcommands inherit this from the group's context: -h works everywhere, as in sockd.
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=(
        "Exit status: 0 success, 1 the daemon refused or failed, 2 usage, 3 sockd not "
        "running or unreachable, 4 permission denied, 5 control-API version mismatch, "
        "78 invalid configuration."
    ),
)
@click.option(
    "--socket",
    metavar="PATH",
    help=f"Control socket (default: ${CONTROL_SOCKET_ENV}, else {DEFAULT_CONTROL_SOCKET}).",
)
@click.option(
    "--config",
    metavar="PATH",
    help="Read the control socket's path from this sockd config file.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the raw JSON answer instead of a view."
)
@click.option(
    "--timeout",
    type=Seconds(MAX_ANSWER_TIMEOUT, zero=False),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the daemon to answer.",
)
@click.option(
    "--color/--no-color",
    default=None,
    help="Colour the output (default: when writing to a terminal and $NO_COLOR is unset).",
)
@click.version_option(
    __version__,
    prog_name="sockctl",
    message=f"%(prog)s %(version)s (control API v{API_VERSION})",
)
@click.pass_context
def main(
    ctx: click.Context,
    *,  # click passes options by name
    socket: str | None,
    config: str | None,
    as_json: bool,
    timeout: float,
    color: bool | None,
) -> None:
    """Manage a running sockd through its control socket."""
    if socket == "":  # would otherwise read as "not given" and quietly use the default
        raise SockctlError("--socket needs a path, got an empty string", ExitCode.USAGE)
    if color is None and os.environ.get("NO_COLOR"):
        color = False
    ctx.color = color
    ctx.obj = Settings(socket=socket, config=config, json=as_json, timeout=timeout)


@main.command()
@pass_settings
def status(settings: Settings) -> None:
    """Show the daemon's state, uptime, listeners and counters."""
    answer = settings.client().status()
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.status_view(answer, color=True))


class PeerNetwork(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """``--peer``: one address (``10.1.2.3``, ``::1``) or a network (``10.0.0.0/8``)."""

    name = "ADDRESS|CIDR"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        try:
            return ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            self.fail(
                f"expected an address or a network like 10.0.0.0/8, got {value!r}", param, ctx
            )


def _peer_host(peer: str) -> str:
    """``"[::1]:5000"`` -> ``"::1"``, ``"10.0.0.1:5000"`` -> ``"10.0.0.1"``."""
    host = peer.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _matching(
    conns: list[Any],
    peer: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
    listen: str | None,
) -> list[Any]:
    def wanted(conn: Any) -> bool:
        if listen is not None and conn["listen"] != listen:
            return False
        if peer is None:
            return True
        try:
            address = ipaddress.ip_address(_peer_host(conn["peer"]))
        except ValueError:
            return False
        # A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d: match either form.
        mapped = getattr(address, "ipv4_mapped", None)
        return address in peer or (mapped is not None and mapped in peer)

    return [conn for conn in conns if wanted(conn)]


PEER_OPTION = click.option(
    "--peer",
    type=PeerNetwork(),
    help="Only connections from this address or network (10.0.0.0/8, 2001:db8::/32).",
)


@main.command()
@PEER_OPTION
@click.option("--listen", metavar="HOST:PORT", help="Only connections to this listen address.")
@pass_settings
def connections(
    settings: Settings,
    peer: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
    listen: str | None,
) -> None:
    """List open connections: peer, age, bytes in and out."""
    answer = settings.client().connections()
    answer["connections"] = _matching(answer["connections"], peer, listen)
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.connections_table(answer["connections"]))


@main.command()
@click.argument("connection_id", metavar="[ID]", type=ConnectionId(), required=False)
@PEER_OPTION
@pass_settings
def kick(
    settings: Settings,
    connection_id: int | None,
    peer: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
) -> None:
    """Close the connection ID, or every connection from --peer (see `connections`)."""
    if (connection_id is None) == (peer is None):
        raise click.UsageError("give a connection ID or --peer, not both and not neither")
    client = settings.client()
    if peer is None:
        answer = client.close_connection(connection_id or 0)
        if settings.json:
            _emit_json(answer)
        else:
            click.echo(render.closed_view(answer))
        return
    closed: list[int] = []
    for conn in _matching(client.connections()["connections"], peer, None):
        try:
            closed.append(client.close_connection(conn["id"])["closed"])
        except DaemonError as exc:
            if exc.code != "not_found":  # gone by itself meanwhile: nothing to do
                raise
    if settings.json:
        _emit_json({"closed": closed, "peer": str(peer)})
    elif closed:
        for conn_id in closed:
            click.echo(render.closed_view({"closed": conn_id}))
    if not closed:
        raise SockctlError(f"no open connection from {peer}", ExitCode.FAILURE)


@main.command("config")
@pass_settings
def show_config(settings: Settings) -> None:
    """Print the daemon's effective configuration, as TOML."""
    answer = settings.client().config()
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.config_view(answer))


@main.command()
@click.option(
    "--dry-run",
    is_flag=True,
    help="Only validate the daemon's config file and show what would change.",
)
@pass_settings
def reload(settings: Settings, dry_run: bool) -> None:
    """Re-read the config file and apply it; print what changed.

    A rejected config lists every problem and exits 78; the daemon keeps running
    with its current configuration. --dry-run applies nothing (like supervisorctl's
    reread): binding added addresses is only tried by a real reload.
    """
    answer = settings.client().reload(dry_run=dry_run)
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.reload_view(answer))


@main.command()
@click.option(
    "--timeout",
    "drain_timeout",
    type=Seconds(MAX_STOP_TIMEOUT),
    metavar="SECONDS",
    help="Wait this long for open connections, 0 to 86400 (default: the daemon's "
    "shutdown_timeout).",
)
@click.option("--wait", is_flag=True, help="Return only once the daemon has exited.")
@pass_settings
def stop(settings: Settings, drain_timeout: float | None, wait: bool) -> None:
    """Stop gracefully, letting open connections finish.

    A daemon systemd started is stopped too, with a warning: systemd sees a clean exit
    and Restart= will not bring it back; `systemctl stop` is the way there.
    """
    client = settings.client()
    answer = client.stop(drain_timeout)
    warning = render.supervisor_warning(
        answer.get("supervisor"), client.peer_pid, os.environ.get("MAINPID")
    )
    if warning:
        click.echo(f"sockctl: warning: {warning}", err=True)
    if not settings.json:
        click.echo(render.stop_view(answer))
    if wait:
        limit = float(answer["timeout"]) + WAIT_GRACE_S
        if not wait_until_stopped(client.path, client.peer_pid, limit):
            raise SockctlError(f"sockd is still running {limit:g}s after the stop request")
        if not settings.json:
            click.echo("sockd stopped")
    if settings.json:
        _emit_json(answer)


@main.command()
@pass_settings
def pause(settings: Settings) -> None:
    """Stop accepting new connections; open ones continue."""
    answer = settings.client().pause()
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.state_view(answer))


@main.command()
@pass_settings
def resume(settings: Settings) -> None:
    """Accept new connections again after `pause`."""
    answer = settings.client().resume()
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.state_view(answer))


@main.command("log-level")
@click.argument("level", type=LogLevel())
@pass_settings
def log_level(settings: Settings, level: str) -> None:
    """Change the log level until the next reload or restart (warn means warning)."""
    answer = settings.client().set_log_level(level)
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.log_level_view(answer))


@main.command("reopen-logs")
@pass_settings
def reopen_logs(settings: Settings) -> None:
    """Reopen the log file (after logrotate moved it)."""
    answer = settings.client().reopen_logs()
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.reopen_view(answer))


@main.command()
@pass_settings
def stats(settings: Settings) -> None:
    """Show the daemon's metrics, readable (GET /v1/stats: the numbers of /metrics)."""
    answer = settings.client().stats()
    if settings.json:
        _emit_json(answer)
    else:
        click.echo(render.metrics_view(render.stats_samples(answer)))


@main.command()
@click.option(
    "-n",
    "--lines",
    type=Count(LOGS_MAX_N),
    default=100,
    show_default=True,
    help=f"How many recent events to show (at most {LOGS_MAX_N}).",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events; Ctrl-C ends.")
@click.option(
    "--level",
    type=LogLevel(),
    default="debug",
    show_default=True,
    help="Least severe level shown (warn means warning).",
)
@pass_settings
def logs(settings: Settings, lines: int, follow: bool, level: str) -> None:
    """Show recent log events; -f follows new ones. --json: one JSON object per line.

    Events come from the daemon's in-memory ring buffer, whatever its log output.
    -f waits for new events however long the daemon is quiet (--timeout applies only
    to its answer's start), and ends with Ctrl-C or when the daemon closes the stream
    (said on stderr): both exit 0. A stream that breaks off (the daemon was killed)
    exits 1.
    """
    events = settings.client().logs(n=lines, level=level, follow=follow)
    ndjson = settings.json
    try:
        for event in events:
            if ndjson:
                click.echo(json.dumps(event, ensure_ascii=False))
            else:
                click.echo(render.log_line(event, color=True))
    except KeyboardInterrupt:
        return  # Ctrl-C is how a follow ends: not an error, nothing to say
    finally:
        events.close()  # closes the connection: the daemon stops streaming
    if follow:
        # A follow only ends by itself when the daemon ends it: cleanly (the stream's
        # last chunk) when it stops. A stream that breaks off raised a ProtocolError.
        click.echo("sockctl: sockd closed the log stream (stopped?)", err=True)


def sockd_command() -> list[str] | None:
    """How to run the ``sockd`` that came with this sockctl, or None if there is none.

    The ``sockd`` script next to the interpreter running sockctl (the same virtualenv or
    prefix, so the same version and the same handler imports), else the first ``sockd``
    on ``$PATH``.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "sockd")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("sockd")
    return [found] if found else None


def _check_problems(stderr: str, path: str) -> list[str]:
    """The problems in ``sockd --check-config``'s stderr (``sockd: PATH: problem``)."""
    problems = []
    for line in stderr.splitlines():
        text = line.removeprefix("sockd: ")
        text = text.removeprefix(f"{os.path.abspath(path)}: ")
        if text.strip():
            problems.append(text)
    return problems


@main.command()
@click.argument("path", metavar="[CONFIG]", required=False)
@pass_settings
def check(settings: Settings, path: str | None) -> None:
    """Validate a sockd config file offline: runs `sockd --check-config`.

    Relays its output and exit status, as `nginx -t` does: 0 valid, 78 invalid (every
    problem on its own line). The sockd used is the one next to sockctl's Python, else
    the first on $PATH; exit 1 when there is none. No daemon needs to run.

    CONFIG defaults to --config, else /etc/sockd/sockd.toml.
    """
    target = path or settings.config or DEFAULT_CONFIG_PATH
    command = sockd_command()
    if command is None:
        raise SockctlError(
            "cannot check: no sockd executable next to sockctl's Python "
            f"({os.path.dirname(sys.executable)}) or on $PATH"
        )
    try:
        done = subprocess.run(  # noqa: S603 -- our own sockd, a list argv, no shell
            [*command, "--check-config", "--config", target],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise SockctlError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    if settings.json:
        problems = _check_problems(done.stderr, target) if done.returncode else []
        _emit_json({"path": target, "ok": done.returncode == 0, "problems": problems})
    else:
        click.echo(done.stdout, nl=False)
        click.echo(done.stderr, nl=False, err=True)
    if done.returncode:
        raise click.exceptions.Exit(done.returncode)
