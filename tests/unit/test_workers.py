"""WorkerPool: threads reused across tasks, unlimited concurrency, bounded spares."""

from __future__ import annotations

import contextvars
import gc
import queue
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sockd.workers import SPARE_NAME, WorkerPool

DEADLINE = 10.0


@pytest.fixture(autouse=True)
def _no_threads_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every pool a test makes sends its spare threads away at the end."""
    pools: list[WorkerPool] = []
    real_init = WorkerPool.__init__

    def tracked_init(self: WorkerPool, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(WorkerPool, "__init__", tracked_init)
    yield
    for pool in pools:
        pool.resize(0)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)  # sleep-ok: polling an observable state with a deadline


def run_and_wait(pool: WorkerPool, fn: Callable[[], object], name: str = "t") -> None:
    done = threading.Event()

    def task() -> None:
        try:
            fn()
        finally:
            done.set()

    pool.submit(task, (), name)
    assert done.wait(DEADLINE)


def meet(threads: list[threading.Thread], barrier: threading.Barrier) -> None:
    """Record the running thread, then wait until every task of the batch runs."""
    threads.append(threading.current_thread())
    barrier.wait()


def test_a_finished_thread_serves_the_next_task() -> None:
    """Tasks one after another all run on the one thread started for the first."""
    pool = WorkerPool(max_spare=4)
    seen: list[threading.Thread] = []
    for _ in range(20):
        run_and_wait(pool, lambda: seen.append(threading.current_thread()))
        wait_until(lambda: pool.spare == 1, "the thread to wait for work")
    assert pool.started == 1
    assert len(set(seen)) == 1


def test_no_spares_means_a_thread_per_task() -> None:
    """max_spare=0 is ThreadingMixIn: a new thread per task, gone when it ends."""
    pool = WorkerPool(max_spare=0)
    seen: list[threading.Thread] = []
    for _ in range(5):
        run_and_wait(pool, lambda: seen.append(threading.current_thread()))
        seen[-1].join(DEADLINE)
        assert not seen[-1].is_alive()
    assert pool.started == 5
    assert len(set(seen)) == 5
    assert pool.spare == 0


def test_concurrency_is_not_limited_by_max_spare() -> None:
    """Ten tasks that can only finish together all run at once with max_spare=2."""
    pool = WorkerPool(max_spare=2)
    barrier = threading.Barrier(11, timeout=DEADLINE)
    threads: list[threading.Thread] = []
    for i in range(10):
        pool.submit(
            lambda: (threads.append(threading.current_thread()), barrier.wait()), (), f"c{i}"
        )
    barrier.wait()
    assert pool.started == 10
    # Once all are done only max_spare of them stay; the rest exit.
    wait_until(lambda: sum(t.is_alive() for t in threads) == 2, "extra threads to exit")
    assert pool.spare == 2


def test_thread_takes_the_task_name_then_the_spare_name() -> None:
    """A thread is named after the task it runs and SPARE_NAME while it waits."""
    pool = WorkerPool(max_spare=1)
    names: list[str] = []
    holder: list[threading.Thread] = []

    def record() -> None:
        holder.append(threading.current_thread())
        names.append(holder[-1].name)

    run_and_wait(pool, record, "conn-7")
    wait_until(lambda: pool.spare == 1, "the thread to wait")
    assert names == ["conn-7"]
    assert holder[0].name == SPARE_NAME
    run_and_wait(pool, record, "conn-8")
    assert names == ["conn-7", "conn-8"]
    assert holder[0] is holder[1]


def test_each_task_starts_with_fresh_context_variables() -> None:
    """A context variable set by one task is unset for the next on the same thread."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    pool = WorkerPool(max_spare=1)
    seen: list[str] = []

    def first() -> None:
        seen.append(var.get())
        var.set("leaked")

    run_and_wait(pool, first)
    wait_until(lambda: pool.spare == 1, "the thread to wait")
    run_and_wait(pool, lambda: seen.append(var.get()))
    assert pool.started == 1  # the same thread ran both
    assert seen == ["unset", "unset"]


def test_spare_threads_leave_after_the_keepalive() -> None:
    """A spare thread with nothing to do exits after the keepalive."""
    pool = WorkerPool(max_spare=4, keepalive=0.05)
    holder: list[threading.Thread] = []
    run_and_wait(pool, lambda: holder.append(threading.current_thread()))
    holder[0].join(DEADLINE)
    assert not holder[0].is_alive()
    assert pool.spare == 0
    run_and_wait(pool, lambda: None)  # a new thread starts for the next task
    assert pool.started == 2


def test_resize_sends_extra_spares_away() -> None:
    """Lowering max_spare makes the waiting threads over the new limit exit."""
    pool = WorkerPool(max_spare=8)
    barrier = threading.Barrier(5, timeout=DEADLINE)
    threads: list[threading.Thread] = []
    for i in range(4):
        pool.submit(
            lambda: (threads.append(threading.current_thread()), barrier.wait()), (), f"c{i}"
        )
    barrier.wait()
    wait_until(lambda: pool.spare == 4, "four spares")
    pool.resize(1)
    assert pool.spare == 1
    wait_until(lambda: sum(t.is_alive() for t in threads) == 1, "three threads to exit")
    pool.resize(0)
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert pool.spare == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_thread_killed_by_its_task_does_not_lose_later_tasks() -> None:
    """SystemExit ends the thread, as in a plain thread; it never counts as a spare."""
    pool = WorkerPool(max_spare=2)
    holder: list[threading.Thread] = []

    def dies() -> None:
        holder.append(threading.current_thread())
        raise SystemExit

    pool.submit(dies, (), "dies")
    wait_until(lambda: bool(holder), "the task to run")
    holder[0].join(DEADLINE)
    assert not holder[0].is_alive()
    assert pool.spare == 0
    for _ in range(3):
        run_and_wait(pool, lambda: None)  # would time out if queued for the dead thread


@pytest.mark.parametrize("keepalive", [0.0005, 0.002])
def test_keepalive_races_never_lose_or_repeat_a_task(keepalive: float) -> None:
    """Submissions land right as spare threads give up: every task runs exactly once."""
    pool = WorkerPool(max_spare=3, keepalive=keepalive)
    ran: list[int] = []
    lock = threading.Lock()
    all_done = threading.Semaphore(0)
    rng = random.Random(1234)  # noqa: S311 - jitter, not secrets
    count = 2000

    def task(i: int) -> None:
        with lock:
            ran.append(i)
        all_done.release()

    for i in range(count):
        pool.submit(task, (i,), f"t{i}")
        if rng.random() < 0.05:
            time.sleep(rng.uniform(0, keepalive * 2))  # sleep-ok: jitter to hit the race
    for _ in range(count):
        assert all_done.acquire(timeout=DEADLINE)
    assert sorted(ran) == list(range(count))
    assert 0 <= pool.spare <= 3


def test_a_thread_keeps_nothing_of_its_last_task_while_waiting() -> None:
    """A spare thread holds no reference to its tasks' arguments (sockets, connections)."""

    class Payload:
        pass

    pool = WorkerPool(max_spare=1)
    refs = []
    for _ in range(3):
        payload = Payload()
        refs.append(weakref.ref(payload))
        done = threading.Event()
        pool.submit(lambda _p, d=done: d.set(), (payload,), "t")
        assert done.wait(DEADLINE)
        del payload
        wait_until(lambda: pool.spare == 1, "the thread to wait")
    assert pool.started == 1
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]


def test_a_thread_that_cannot_start_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the OS refuses a thread the error reaches the caller and started stays right."""
    pool = WorkerPool(max_spare=1)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pool.submit(lambda: None, (), "t")
    monkeypatch.undo()
    assert pool.started == 0
    run_and_wait(pool, lambda: None)
    assert pool.started == 1


class _RaceQueue:
    """The pool's queue, pausing one chosen thread at the two points of the race."""

    def __init__(self) -> None:
        self.inner: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.victim: threading.Thread | None = None
        self.expired = threading.Event()  # the victim's keepalive ran out
        self.go_on = threading.Event()  # let it look at the spare count
        self.rewaiting = threading.Event()  # it is about to wait again
        self.gate = threading.Event()  # let it wait

    def put(self, item: Any) -> None:
        self.inner.put(item)

    def get(self, timeout: float | None = None) -> Any:
        me = threading.current_thread()
        if me is self.victim and self.expired.is_set():
            self.rewaiting.set()
            assert self.gate.wait(DEADLINE)
        try:
            return self.inner.get(timeout=timeout)
        except queue.Empty:
            # The victim is chosen while its first wait is already running.
            if me is self.victim and not self.expired.is_set():
                self.expired.set()
                assert self.go_on.wait(DEADLINE)
            raise


def test_a_spare_whose_task_another_took_still_expires() -> None:
    """The race, forced: A's keepalive runs out as a task is queued for it (spare == 0),
    a thread B that just went spare takes that task; A must still leave after a keepalive
    instead of waiting for ever (and no task is lost)."""
    pool = WorkerPool(max_spare=2, keepalive=0.1)
    race = _RaceQueue()
    pool._tasks = race  # type: ignore[assignment]
    holder: list[threading.Thread] = []
    run_and_wait(pool, lambda: holder.append(threading.current_thread()), "a")
    race.victim = holder[0]
    assert race.expired.wait(DEADLINE)  # A timed out, has not looked at the count yet
    ran: list[str] = []
    pool.submit(lambda: ran.append("t1"), (), "t1")  # takes A off the count, queues t1
    race.go_on.set()
    assert race.rewaiting.wait(DEADLINE)  # A saw spare == 0 and waits again
    run_and_wait(pool, lambda: None, "b")  # a new thread B, then spare: it takes t1
    wait_until(lambda: ran == ["t1"], "t1 to run on B")
    race.gate.set()
    holder[0].join(DEADLINE)
    assert not holder[0].is_alive(), f"the spare thread never expired (spare={pool.spare})"
