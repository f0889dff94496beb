"""Regenerate the README's settings and events tables and etc/sockd.toml from their one
declaration.

The section dataclasses in ``sockd/config.py`` declare every setting once, and
``sockd/logs.py`` (``EVENTS``) every log event; tests/unit/test_config.py fails when the
README's copies or the example config drift. Run
``.venv/bin/python scripts/update_readme_tables.py`` after changing either.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sockd.config import example_toml, reference_table
from sockd.logs import events_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "etc" / "sockd.toml"


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    head, sep, rest = text.partition(begin)
    if not sep or end not in rest:
        sys.exit(f"README.md has no {begin.strip()} ... {end} block")
    return head + begin + body + end + rest.split(end, 1)[1]


def write_if_changed(path: Path, text: str) -> None:
    name = path.relative_to(ROOT)
    if path.read_text() != text:
        path.write_text(text)
        print(f"{name} updated")
    else:
        print(f"{name} already matches")


def main() -> None:
    readme = README.read_text()
    readme = replace_block(readme, "settings", reference_table())
    write_if_changed(README, replace_block(readme, "events", events_table()))
    write_if_changed(EXAMPLE, example_toml())


if __name__ == "__main__":
    main()
