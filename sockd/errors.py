"""The daemon's exception hierarchy: one base, one type per layer.

Leaf module. Every message is written for an operator reading a terminal or a log:
it names the thing (a config key, an address, a path) and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence


class SockdError(Exception):
    """Base of every error sockd raises on purpose."""


class ConfigError(SockdError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[str], path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(self.problems))


class StartupError(SockdError):
    """The daemon could not start (address in use, control socket taken, ...)."""


class ControlError(SockdError):
    """The control channel could not be set up or reconfigured."""
