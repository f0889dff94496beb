"""WorkerPool: threads reused across tasks, unlimited concurrency, bounded spares."""

from __future__ import annotations

import contextvars
import random
import threading
import time
from collections.abc import Callable

import pytest

from sockd.workers import SPARE_NAME, WorkerPool

DEADLINE = 10.0


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
    pool = WorkerPool(max_spare=4)
    seen: list[threading.Thread] = []
    for _ in range(20):
        run_and_wait(pool, lambda: seen.append(threading.current_thread()))
        wait_until(lambda: pool.spare == 1, "the thread to wait for work")
    assert pool.started == 1
    assert len(set(seen)) == 1


def test_no_spares_means_a_thread_per_task() -> None:
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
    pool = WorkerPool(max_spare=4, keepalive=0.05)
    holder: list[threading.Thread] = []
    run_and_wait(pool, lambda: holder.append(threading.current_thread()))
    holder[0].join(DEADLINE)
    assert not holder[0].is_alive()
    assert pool.spare == 0
    run_and_wait(pool, lambda: None)  # a new thread starts for the next task
    assert pool.started == 2


def test_resize_sends_extra_spares_away() -> None:
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
