"""sockd: run a ``socketserver`` request handler as a production service.

The package is split by owner: ``config`` (settings), ``logs`` (structlog set-up),
``server`` (our socketserver subclasses and connection accounting), ``handlers``
(built-in handlers), ``control`` (the control channel), ``systemd`` (notify, listen
fds, journal), ``daemon`` (lifecycle) and ``cli`` (the ``sockd`` command).
"""

__version__ = "0.1.0"
