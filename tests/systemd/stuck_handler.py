"""A handler that wedges the whole sockd process, for the watchdog test under systemd.

Importable by the daemon as ``tests.systemd.stuck_handler:GilHog`` when ``/work/main`` (the
project, bound into the box at the same path) is on its ``PYTHONPATH``.

A handler that merely blocks (``time.sleep``, a ``recv`` that never returns) only ties up
its own thread: the serving loop keeps accepting and feeding the watchdog, as it should.
What does hang a Python daemon is a handler that never gives the interpreter back -- a
long call into C code that holds the GIL, like a C extension stuck in a loop. Then no
other thread runs: not the serving loop (no ``WATCHDOG=1``), not the main loop, not even
the Python-level signal handlers. That is the hang the watchdog exists for.
"""

from __future__ import annotations

import socketserver

#: Iterations of a C loop that never checks for a GIL drop request: years, i.e. forever.
FOREVER = 10**18


class GilHog(socketserver.BaseRequestHandler):
    """Echoes; a request starting with ``hang`` makes it hold the GIL until the process dies."""

    def handle(self) -> None:
        data = self.request.recv(4096)
        if data.startswith(b"hang"):
            # sum() over a range runs entirely in C and never releases the GIL.
            sum(range(FOREVER))
        self.request.sendall(data)
