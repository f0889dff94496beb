"""The suite's own rules, checked: tests synchronise on events, not on fixed sleeps."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
#: A call to time.sleep (or a bare sleep imported from time) in test code.
_SLEEP = re.compile(r"\b(?:time\.)?sleep\(")


def unmarked_sleeps(root: Path) -> list[str]:
    """Every ``sleep(`` line under ``root`` not marked ``# sleep-ok`` (with the reason)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _SLEEP.search(code) and "# sleep-ok" not in line:
                found.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return found


def test_no_unmarked_sleeps_in_tests() -> None:
    """A fixed sleep in a test is a race or a waste: wait on an observable event instead,
    or mark a deliberate one ``# sleep-ok`` with the reason."""
    assert unmarked_sleeps(TESTS) == []


def test_the_sleep_check_finds_a_sleep(tmp_path: Path) -> None:
    """The check itself catches an unmarked sleep and lets a marked one through."""
    root = tmp_path / "tests"
    root.mkdir()
    call = "time." + "sleep"  # spelled apart so this file passes its own check
    (root / "test_x.py").write_text(
        f"import time\n{call}(1)\n{call}(2)  # sleep-ok: a deliberate gap\n"
    )
    assert unmarked_sleeps(root) == [f"tests/test_x.py:2: {call}(1)"]
