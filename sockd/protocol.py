"""Vocabulary shared by the daemon and ``sockctl``: API version, error codes, exit codes.

This is a leaf module: it imports nothing from the package, so ``sockctl`` can use it
without pulling in the daemon. Presentation (messages, tables) lives elsewhere; this
module only fixes the names and numbers other tools depend on.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

#: Bumped on any incompatible change to an endpoint's request or response shape.
API_VERSION: Final = 1
API_PREFIX: Final = "/v1"
#: Every control response carries this header; ``sockctl`` refuses to talk to a daemon
#: whose value differs from its own ``API_VERSION``.
API_VERSION_HEADER: Final = "X-Sockd-Api-Version"

DEFAULT_CONTROL_SOCKET: Final = "/run/sockd/control.sock"
CONTROL_SOCKET_ENV: Final = "SOCKD_CONTROL_SOCKET"
#: Bodies larger than this are refused with 413 before they are read.
MAX_REQUEST_BODY: Final = 64 * 1024

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


class State(StrEnum):
    """What the daemon is doing, as ``GET /v1/status`` reports it."""

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    RELOADING = "reloading"
    DRAINING = "draining"
    STOPPED = "stopped"


class ErrorCode(StrEnum):
    """Stable codes in ``{"error": {"code": ..., "message": ...}}`` bodies."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TIMEOUT = "timeout"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INVALID_CONFIG = "invalid_config"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ExitCode(IntEnum):
    """Exit statuses of ``sockd`` and ``sockctl``, in the LSB/``systemctl`` tradition."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_RUNNING = 3
    PERMISSION = 4
    VERSION_MISMATCH = 5
    CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus=78 stops a restart loop
