"""sockctl: the management CLI of sockd, speaking its control API over a Unix socket.

Split by owner: ``client`` (the typed control-API client and its exceptions; no
printing), ``render`` (pure formatting of answers for people) and ``cli`` (the click
commands, and the one place where exceptions become exit statuses). From ``sockd`` it
imports only the shared vocabulary (``sockd.protocol``) and the version: everything
else goes through the control channel, and ``sockctl check`` runs ``sockd
--check-config`` rather than importing the daemon and the user's handler
(``tests/unit/test_sockctl_imports.py`` checks it).
"""

from sockd import __version__

__all__ = ["__version__"]
