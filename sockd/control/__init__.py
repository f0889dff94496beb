"""The control channel: a small HTTP/1.1 + JSON API on a Unix stream socket.

Shaped like its client (``sockctl``: client, render, cli), one concern per module, imports
in one direction (the leaves import nothing from the package; ``handler`` uses the
leaves; ``server`` composes them all):

- ``api``: the backend protocol the daemon implements, the endpoints (validate, call the
  backend, return the answer or raise ``APIError``), the routes, the error shape. The
  endpoint table is in its docstring.
- ``access``: peer credentials (``SO_PEERCRED``), roles, per-role budgets.
- ``http``: HTTP/1.1 framing: the deadline reader, the writer, chunked streaming.
- ``socketfile``: the socket's directory and file (StrictModes check, mode and group).
- ``handler``: one request from parse to answer.
- ``server``: ``ControlServer``, its socketserver, the fork hook, the fd reserve.

It knows nothing about how the daemon does any of it: a backend method that must run on
the main thread blocks there, not here. This module only re-exports what the daemon and
the tests use.
"""

from sockd.config import REDACTED
from sockd.control.access import CONNECTION_BUDGET, FOLLOWER_BUDGET, MAX_CONNECTIONS, Peer, Policy
from sockd.control.api import (
    BackendConflict,
    BackendUnavailable,
    ControlBackend,
    LogSubscription,
    ReloadOutcome,
)
from sockd.control.handler import FOLLOW_POLL
from sockd.control.http import HEAD_LIMIT, WRITE_TIMEOUT
from sockd.control.server import CLOSE_GRACE, ControlServer
from sockd.protocol import LOGS_MAX_N

__all__ = [
    "CLOSE_GRACE",
    "CONNECTION_BUDGET",
    "FOLLOWER_BUDGET",
    "FOLLOW_POLL",
    "HEAD_LIMIT",
    "LOGS_MAX_N",
    "MAX_CONNECTIONS",
    "REDACTED",
    "WRITE_TIMEOUT",
    "BackendConflict",
    "BackendUnavailable",
    "ControlBackend",
    "ControlServer",
    "LogSubscription",
    "Peer",
    "Policy",
    "ReloadOutcome",
]
