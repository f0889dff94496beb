"""Fixtures that boot a real systemd per test (see box.py) and report what it logged on failure.

``box``: a booted Box with the project bound in, stopped after the test.
``box_factory``: ``box_factory(**Box kwargs)`` boots more (or differently bound) boxes.
``packaged_box``: a box with sockd's packaging installed (user, /etc/sockd, the units).
Tests using them are skipped, with the reason, only when not root or nspawn is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from .box import Box, unavailable_reason


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item so fixtures can tell a failed test at teardown."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


def _report(box: Box) -> None:
    """Print the box's journal and console (shown with the failure by pytest)."""
    print(f"===== journal of box {box.name} (last 200 lines) =====")
    print("\n".join(box.last_journal.splitlines()[-200:]))


@pytest.fixture
def box_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Box]]:
    """Boot boxes on demand; every one is stopped at teardown, whatever happened."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[Box] = []

    def make(**kwargs: Any) -> Box:
        box = Box(**kwargs)
        made.append(box)
        return box.start()

    yield make
    for box in made:
        console = box.console_log
        box.stop()
        if _failed(request):
            _report(box)
            print(f"===== console of box {box.name} (last 50 lines) =====")
            print("\n".join(console.splitlines()[-50:]))


@pytest.fixture
def box(box_factory: Callable[..., Box]) -> Box:
    """A freshly booted box with the project and venv bound read-only."""
    return box_factory()


@pytest.fixture
def packaged_box(box: Box) -> Box:
    """A box with the sockd user, /etc/sockd and sockd's unit files (commands from the venv)."""
    box.install_packaging()
    return box
