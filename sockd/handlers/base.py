"""The handler base class: ``SockdHandler``, a ``BaseRequestHandler`` that sockd equips.

Owns what a handler gets from sockd beyond socketserver's ``request``,
``client_address`` and ``server``: its options, its logger, the drain flag, and
``input_pending``. All are set in the handler's own constructor, from what
socketserver passes it: the accepted socket carries its ``Connection``
(``request.sockd_conn``) and the listener (``server``) its hub, whose drain flag is
one ``Event`` per hub. Nothing is injected into the handler from outside, so a
handler's ``__init__``, ``setup()``, ``handle()`` and ``finish()`` run as socketserver
documents them.

May import ``sockd.connections`` only (the listeners never import this module: they
construct whatever handler class is configured, with socketserver's three arguments).
"""

from __future__ import annotations

import functools
import socketserver
import threading
from typing import Any

import structlog

from sockd.connections import Connection, input_pending

_FALLBACK_LOG: Any = structlog.get_logger()


class SockdHandler(socketserver.BaseRequestHandler):
    """Base for handlers that want more than ``self.request``.

    Under sockd, before ``setup()`` runs:
    - ``self.options``: the ``[server.handler_options]`` table in force at accept time
      (a copy per connection);
    - ``self.log``: a structlog logger bound to this connection (conn_id, peer_addr,
      peer_port, listen; pid in forking mode), created on first use;
    - ``self.draining``: a ``threading.Event`` set when a graceful stop begins, so a
      long-lived handler can finish early. The rule sockd's own handlers follow: at a
      drain, whatever the client already sent is answered; a connection ends at the
      drain only at a request boundary with nothing pending to read
      (``if self.draining.is_set() and not self.input_pending(): break``). A connection
      taken from the listen queue at a stop starts with the flag already set, and its
      client's request is usually waiting in the socket.
    Run by a bare socketserver, the defaults apply (empty options, a plain logger, a
    drain flag of the handler's own that is never set). A plain ``BaseRequestHandler``
    runs unchanged under sockd; it just does not get these. An override of
    ``__init__`` must call this one before socketserver's (``super().__init__``).
    """

    def __init__(self, request: Any, client_address: Any, server: socketserver.BaseServer) -> None:
        conn: Connection | None = getattr(request, "sockd_conn", None)
        if conn is not None:
            # Accepted by sockd: the server is one of its listeners, sharing the hub.
            self._sockd_conn = conn
            self.options = conn.options
            self.draining = server.hub.draining  # type: ignore[attr-defined]
        super().__init__(request, client_address, server)

    # Made on first use, per instance, only where sockd did not set them (a bare
    # socketserver, a test calling the handler directly): a per-instance value, so no
    # mutable default is shared by every handler.
    @functools.cached_property
    def options(self) -> dict[str, Any]:
        return {}

    @functools.cached_property
    def draining(self) -> threading.Event:
        return threading.Event()

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        """Problems with ``handler_options``, found when the config is loaded.

        Override to validate your options: each returned string becomes a config error
        ``server.handler_options: <string>`` (exit 78 at start, a rejected reload later).
        """
        return []

    def input_pending(self) -> bool:
        """Whether the client sent bytes not read from ``self.request`` yet (or closed).

        Never waits. It sees the socket only: bytes already in a buffered reader of your
        own (``makefile``) are yours to check first.
        """
        return input_pending(self.request)

    _sockd_conn: Connection | None = None
    _log_override: Any = None

    @property
    def log(self) -> Any:
        if self._log_override is not None:
            return self._log_override
        conn = self._sockd_conn
        return conn.log if conn is not None else _FALLBACK_LOG

    @log.setter
    def log(self, value: Any) -> None:
        self._log_override = value
