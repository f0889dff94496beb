"""The socketserver tutorials' file service (list, get, put) on ``JSONActionHandler``.

``server`` holds the handler sockd runs; ``client`` is a small command that talks to it.
"""
