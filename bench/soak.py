"""Soak: hundreds of thousands of short connections; resources must come back to baseline.

For each mode, sockd serves ``--connections`` short connections (connect, one 64-byte
echo, close) from several client processes, logging every connection (JSON, info) to
a file. Open descriptors, threads, children and RSS of the daemon are sampled
throughout. Targets: after all connections, RSS within 10% of its value after the first
10,000, and descriptors, threads and children back at their baseline (threading mode
keeps finished threads for the next connection: the threads left must be exactly the
spare ones /metrics reports, at most ``max_spare_threads``). Exit 1 if missed.

    .venv/bin/python bench/soak.py [--connections 200000] [--mode both] [--clients 4]

Only loopback; bounded by the connection count.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import children, fds, rss_kb, threads
from servers import REPO, start_sockd

sys.path.insert(0, str(REPO))
from sockctl.client import ControlClient

MESSAGE = b"s" * 64


def _client(port: int, count: int, done: mp.Value) -> None:  # type: ignore[type-arg]
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                chunk = sock.recv(4096)
                if not chunk:
                    raise SystemExit("server closed early")
                got += len(chunk)
        with done.get_lock():
            done.value += 1


def sample(pid: int) -> dict[str, int]:
    return {
        "rss_kb": rss_kb(pid),
        "fds": fds(pid),
        "threads": threads(pid),
        "children": len(children(pid)),
    }


def spare_threads(control: str) -> int:
    for line in ControlClient(control, timeout=10).metrics().splitlines():
        if line.startswith("sockd_threads_spare "):
            return int(float(line.split()[1]))
    raise SystemExit("sockd_threads_spare missing from /metrics")


def settle(pid: int, baseline: dict[str, int], control: str, timeout: float = 30) -> dict[str, int]:
    """Wait until handler threads/children have wound down (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        now = sample(pid)
        now["spare"] = spare_threads(control)
        busy_threads = now["threads"] - now["spare"]
        if time.monotonic() > deadline or not (
            now["fds"] > baseline["fds"] or busy_threads > baseline["threads"] or now["children"]
        ):
            return now
        time.sleep(0.1)  # polling /proc for the end state


def soak(mode: str, total: int, clients: int) -> bool:
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="sks") as tmpdir:
        proc, port = start_sockd(Path(tmpdir), mode, mode=mode, max_children=64)
        control = f"{tmpdir}/{mode}.sock"
        pid = proc.pid
        baseline = sample(pid)
        done = mp.Value("q", 0)
        per = total // clients
        procs = [mp.Process(target=_client, args=(port, per, done)) for _ in range(clients)]
        began = time.monotonic()
        for p in procs:
            p.start()
        at_10k: dict[str, int] | None = None
        peak = dict(baseline)
        samples = 0
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)  # sampling cadence
            now = sample(pid)
            samples += 1
            peak = {k: max(peak[k], now[k]) for k in now}
            if at_10k is None and done.value >= 10_000:
                at_10k = now
        for p in procs:
            p.join()
        elapsed = time.monotonic() - began
        end = settle(pid, baseline, control)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert at_10k is not None
    growth = (end["rss_kb"] - at_10k["rss_kb"]) / at_10k["rss_kb"]
    ok = (
        growth <= 0.10
        and end["fds"] <= baseline["fds"]
        and end["threads"] - end["spare"] <= baseline["threads"]
        and end["spare"] <= 64
        and end["children"] == 0
    )
    print(
        f"{mode:9} {'OK' if ok else 'LEAK'}: {done.value} connections in {elapsed:.0f}s "
        f"({done.value / elapsed:.0f}/s), {samples} samples\n"
        f"          RSS KiB baseline {baseline['rss_kb']}, after 10k {at_10k['rss_kb']}, "
        f"peak {peak['rss_kb']}, end {end['rss_kb']} (growth after 10k {growth:+.1%}, "
        f"target <= +10%)\n"
        f"          fds {baseline['fds']} -> peak {peak['fds']} -> {end['fds']}; "
        f"threads {baseline['threads']} -> peak {peak['threads']} -> {end['threads']} "
        f"({end['spare']} spare); "
        f"children peak {peak['children']} -> {end['children']}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=200_000)
    parser.add_argument("--mode", choices=["threading", "forking", "both"], default="both")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    modes = ["threading", "forking"] if args.mode == "both" else [args.mode]
    results = [soak(mode, args.connections, args.clients) for mode in modes]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
