"""sockctl imports nothing of sockd but the shared vocabulary and the version."""

from __future__ import annotations

import subprocess
import sys


def test_sockctl_cli_loads_only_the_protocol_of_sockd() -> None:
    """`import sockctl.cli` loads exactly `sockd` and `sockd.protocol` of the sockd package."""
    code = "import sockctl.cli, sys; print(sorted(m for m in sys.modules if m.startswith('sockd')))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "['sockd', 'sockd.protocol']"
