"""sockd: run a ``socketserver`` request handler as a production service.

The package is split by owner: ``config`` (settings), ``logs`` (structlog set-up),
serving in ``listeners`` (our socketserver subclasses), ``acceptor`` (the accept
loop), ``admission`` (access rules, rates, capacity, timeouts) and ``connections``
(accounting, the canonical line), ``handlers`` (the handler base class and built-in
handlers), ``control`` (the control channel), ``systemd`` (notify, listen
fds, journal), ``daemon`` (lifecycle) and ``cli`` (the ``sockd`` command).
"""

__version__ = "0.1.0"
