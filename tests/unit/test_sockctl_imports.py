"""One shared vocabulary: sockctl imports nothing of sockd but ``sockd.protocol`` and the
version, and the control API's documentation agrees with what that module declares."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sockd.protocol import METRICS, STATUS_OF, ErrorCode

REPO = Path(__file__).resolve().parents[2]


def test_sockctl_cli_loads_only_the_protocol_of_sockd() -> None:
    """`import sockctl.cli` loads exactly `sockd` and `sockd.protocol` of the sockd package."""
    code = "import sockctl.cli, sys; print(sorted(m for m in sys.modules if m.startswith('sockd')))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "['sockd', 'sockd.protocol']"


def _doc_table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading`` in docs/control-api.md."""
    text = (REPO / "docs" / "control-api.md").read_text()
    after = text[text.index(heading) :]
    rows = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # the header and the --- line


def test_docs_list_every_metric_of_the_catalogue() -> None:
    """docs/control-api.md's /metrics table names each catalogued metric with its kind."""
    documented: dict[str, str] = {}
    for cell, kind, *_ in _doc_table("### `GET /metrics`"):
        for name in re.findall(r"`(sockd_\w+)", cell):
            documented[name] = kind
    assert documented == {spec.name: spec.kind for spec in METRICS}


def test_docs_list_the_status_of_every_error_code() -> None:
    """docs/control-api.md's error table gives each code the status sockd.protocol does."""
    documented = {code.strip("`"): int(status) for code, status, *_ in _doc_table("## Errors")}
    assert documented == {str(code): status for code, status in STATUS_OF.items()}
    assert set(STATUS_OF) == set(ErrorCode)
