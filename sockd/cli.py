"""The ``sockd`` command: parse options, validate the config, run the daemon.

``sys.exit`` happens here and nowhere else. Exit statuses: 0 clean stop, 1 runtime
failure (address in use, control socket taken), 2 usage error, 78 invalid configuration
(``EX_CONFIG``; the systemd unit's ``RestartPreventExitStatus=78`` stops a restart loop).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

import click

from sockd import __version__
from sockd.config import DEFAULT_CONFIG_PATH, load
from sockd.errors import ConfigError, SockdError
from sockd.protocol import API_VERSION, ExitCode


def _fail(message: str, code: int) -> None:
    click.echo(f"sockd: {message}", err=True)
    sys.exit(code)


def _config_failed(error: ConfigError, config_path: str) -> NoReturn:
    """Every problem on its own line, then EX_CONFIG (78)."""
    for problem in error.problems:
        click.echo(f"sockd: {config_path}: {problem}", err=True)
    sys.exit(ExitCode.CONFIG)


def import_path_from_working_directory() -> None:
    """Let handler modules import from the directory the command starts in.

    As ``python -m``, gunicorn and uvicorn do; appended, so the standard library and
    installed packages always win over a same-named file there (it never shadows
    ``email`` or ``random``); absolute, so it stays right after --daemon changes to "/".
    A process-wide change, so it belongs to the command line (``sockd`` and ``sockctl
    check``), not to loading settings, which tests and tools call too.
    """
    try:
        here = os.getcwd()
    except OSError:  # the directory was removed: nothing to import from there
        return
    if here not in sys.path:
        sys.path.append(here)


def _exit_now(status: int) -> None:
    """Exit without the interpreter's module teardown, which takes ~25 ms here.

    Everything sockd writes is already on its descriptors; exit handlers registered by
    the user's handler code still run.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    metavar="PATH",
    help="TOML configuration file.",
)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit (0 or 78).")
@click.option("--daemon", "detach", is_flag=True, help="Detach from the terminal (no systemd).")
@click.option("--pidfile", metavar="PATH", help="With --daemon: write and lock this pid file.")
@click.version_option(
    __version__,
    prog_name="sockd",
    # The shape sockctl prints too: name, version, the control API it serves.
    message=f"%(prog)s %(version)s (control API v{API_VERSION})",
)
def main(config_path: str, check_config: bool, detach: bool, pidfile: str | None) -> None:
    """Run a socketserver request handler as a production service."""
    # Usage first, in one line, before the config is read. A detached daemon without a pid
    # file could only be found through its control socket: init scripts, monitors and
    # start-stop-daemon need the file, so --daemon asks for one rather than guessing a
    # path (the right directory differs between root and other users).
    if not check_config:
        if detach and not pidfile:
            _fail("--daemon needs --pidfile PATH (e.g. /run/sockd.pid)", ExitCode.USAGE)
        if pidfile and not detach:
            _fail("--pidfile goes with --daemon", ExitCode.USAGE)
    import_path_from_working_directory()
    # Absolute, so a reload re-reads the same file after --daemon has changed to "/".
    config_path = os.path.abspath(config_path)
    try:
        config = load(config_path)
    except ConfigError as exc:
        _config_failed(exc, config_path)
    if check_config:
        click.echo(f"{config_path}: OK")
        sys.exit(ExitCode.OK)
    if detach:
        from sockd.detach import run_detached

        try:
            sys.exit(run_detached(config, pidfile))
        except ConfigError as exc:
            _config_failed(exc, config_path)
        except SockdError as exc:
            _fail(str(exc), ExitCode.FAILURE)
    from sockd.daemon import Daemon

    try:
        daemon = Daemon(config)
        _exit_now(daemon.run())
    except ConfigError as exc:
        _config_failed(exc, config_path)
    except SockdError as exc:
        _fail(str(exc), ExitCode.FAILURE)
    except OSError as exc:
        _fail(f"{exc.strerror or exc}", ExitCode.FAILURE)
