"""``python -m sockd`` runs the ``sockd`` command."""

from sockd.cli import main

main()
