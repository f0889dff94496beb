"""The no-data-lost load test (bench/no_loss.py) in its short form, in both modes."""

from __future__ import annotations

import pytest

from bench.no_loss import lost, run


@pytest.mark.parametrize("mode", ["threading", "forking"])
def test_no_exchange_lost_through_reloads_and_stop(mode: str) -> None:
    """Clients through repeated SIGHUP reloads then SIGTERM: no half or wrong reply, bytes agree."""
    result = run(mode, seconds=2.5, clients=8, reload_every=0.2)
    assert result["half_replies"] == 0, result["problems"]
    assert result["wrong_replies"] == 0, result["problems"]
    assert result["exit_status"] == 0
    assert result["client_bytes_received"] == result["server_bytes_sent"]
    assert result["drain_cut"] == 0
    assert result["completed"] > 100
    assert result["reloads_applied"] >= 1
    assert not lost(result)
