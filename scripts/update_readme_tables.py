"""Regenerate the README's settings and events tables from their one declaration.

``sockd/config.py`` (``SETTINGS``) and ``sockd/logs.py`` (``EVENTS``) declare every
setting and log event once; tests/unit/test_config.py fails when the README's copies
drift. Run ``.venv/bin/python scripts/update_readme_tables.py`` after changing either.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sockd.config import reference_table
from sockd.logs import events_table

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    head, sep, rest = text.partition(begin)
    if not sep or end not in rest:
        sys.exit(f"README.md has no {begin.strip()} ... {end} block")
    return head + begin + body + end + rest.split(end, 1)[1]


def main() -> None:
    text = README.read_text()
    updated = replace_block(text, "settings", reference_table())
    updated = replace_block(updated, "events", events_table())
    if updated != text:
        README.write_text(updated)
        print("README.md tables updated")
    else:
        print("README.md tables already match")


if __name__ == "__main__":
    main()
