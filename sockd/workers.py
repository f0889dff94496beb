"""Threads that serve one connection after another, for ``mode = "threading"``.

``ThreadingMixIn`` starts a new thread for every connection and throws it away after.
Starting a thread costs ~140 µs of CPU here (stack mapping, clone, and the start-up
handshake that blocks the accepting thread until the new one runs) — as much as the
rest of a short connection's server-side work. So a thread that finished a connection
waits, up to ``max_spare`` of them and for about ``SPARE_KEEPALIVE`` seconds, to be
handed the next one (Apache's MaxSpareThreads, Java's cached thread pool; every
production Python server reuses threads). Concurrency is unlimited as before: with no
spare thread waiting, a new one starts at once.

Each connection runs in a fresh ``contextvars.Context``, as it would in a new thread,
so context variables never leak from one connection to the next. What belongs to the
OS thread does carry over: ``threading.local`` values, ``sys.settrace``/``setprofile``
hooks, the thread's identity, signal mask and scheduling settings. The README tells
handler authors; ``server.max_spare_threads = 0`` restores a new thread per connection.

Imports nothing from sockd: the pool knows tasks, not connections.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

#: Seconds a spare thread waits for a connection before it exits.
SPARE_KEEPALIVE: Final = 60.0
#: The name of a thread waiting for its next connection (it takes the connection's
#: name, like ``conn-17``, while serving one), so a thread dump tells them apart.
SPARE_NAME: Final = "spare-thread"

_Task = tuple[Callable[..., object], tuple[Any, ...], str]


class WorkerPool:
    """Runs each task on a waiting spare thread, or on a new thread when none waits.

    Invariant, kept under ``_lock``: ``spare`` is the number of threads waiting for a
    task minus the tasks already queued for them. A submitter takes one (``spare -= 1``)
    before queueing, so a queued task always has a thread that will take it; a waiting
    thread whose keepalive ran out leaves only if it can take itself off the count.
    """

    def __init__(self, max_spare: int, keepalive: float = SPARE_KEEPALIVE) -> None:
        self.max_spare = max_spare
        self.keepalive = keepalive
        self.spare = 0
        #: Threads started over the process's life (a reuse rate: connections / this).
        self.started = 0
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., object], args: tuple[Any, ...], name: str) -> None:
        """Run ``fn(*args)`` in a thread named ``name``: a spare one, or a new one."""
        task = (fn, args, name)
        with self._lock:
            if self.spare > 0:
                self.spare -= 1
                self._tasks.put(task)
                return
            self.started += 1
        # The thread empties the list: Thread's own reference to its arguments would
        # otherwise keep the first connection's objects alive as long as the thread.
        thread = threading.Thread(target=self._serve, args=([task],), name=name, daemon=True)
        try:
            thread.start()
        except BaseException:  # RuntimeError: can't start new thread
            with self._lock:
                self.started -= 1
            raise

    def resize(self, max_spare: int) -> None:
        """Change how many threads may wait; send the ones over the new limit away."""
        with self._lock:
            self.max_spare = max_spare
            excess = self.spare - max_spare
            if excess > 0:
                self.spare -= excess
                for _ in range(excess):
                    self._tasks.put(None)

    def _serve(self, first: list[_Task]) -> None:
        me = threading.current_thread()
        task: _Task | None = first.pop()
        while task is not None:
            fn, args, me.name = task
            task = None
            # A fresh context per connection, as a new thread would have.
            contextvars.Context().run(fn, *args)
            del fn, args  # nothing of the last connection stays alive while waiting
            me.name = SPARE_NAME
            task = self._next_task()

    def _next_task(self) -> _Task | None:
        """Wait for the next task; None when this thread should exit instead."""
        with self._lock:
            if self.spare >= self.max_spare:
                return None
            self.spare += 1
        while True:
            try:
                return self._tasks.get(timeout=self.keepalive)
            except queue.Empty:
                pass
            with self._lock:
                if self.spare > 0:
                    self.spare -= 1  # nobody counted on this thread: leave
                    return None
            # A submitter took a thread off the count just before the keepalive ran
            # out, so a task is queued for a waiting thread; another may take it first
            # and count itself again, so wait with the keepalive again, not forever.
