"""Worked examples of handlers that sockd runs (importable as ``examples.<name>``)."""
