"""PeerRates: the token buckets behind server.rate_per_ip, driven by explicit times."""

from __future__ import annotations

from sockd.admission import PeerRates


def test_a_burst_then_the_rate() -> None:
    """rate_burst connections at once, then one per 1/rate seconds."""
    rates = PeerRates()
    allowed = [rates.allow("a", 2.0, 3, 100.0) for _ in range(5)]
    assert allowed == [True, True, True, False, False]
    assert not rates.allow("a", 2.0, 3, 100.4)  # 0.8 tokens: not yet
    assert rates.allow("a", 2.0, 3, 100.6)  # 1.2 tokens
    assert not rates.allow("a", 2.0, 3, 100.6)


def test_refusals_take_no_token() -> None:
    """A client hammering while refused is not pushed further back."""
    rates = PeerRates()
    for _ in range(3):
        assert rates.allow("a", 1.0, 3, 0.0)
    for i in range(100):
        assert not rates.allow("a", 1.0, 3, 0.5 + i * 0.001)
    assert rates.allow("a", 1.0, 3, 1.0)  # exactly one token by now


def test_peers_have_separate_buckets() -> None:
    """One peer at its limit does not hold back another."""
    rates = PeerRates()
    assert [rates.allow("a", 1.0, 1, 0.0), rates.allow("a", 1.0, 1, 0.0)] == [True, False]
    assert rates.allow(b"\x20\x01\x0d\xb8", 1.0, 1, 0.0)  # an IPv6 prefix key


def test_full_buckets_are_forgotten() -> None:
    """Memory stays bounded under a flood from many addresses: refilled buckets go."""
    rates = PeerRates()
    for i in range(1000):
        rates.allow(f"10.0.{i // 256}.{i % 256}", 10.0, 5, 0.0)
    assert len(rates) == 1000
    rates.allow("10.9.9.9", 10.0, 5, 2.0)  # all the others are full again by t=0.1
    assert len(rates) == 1
