"""What log followers cost the data plane: sockd with 0 vs 60 ``logs?follow=1`` streams.

Issue 9: 60 followers that never read took the daemon from 30 MB to 645 MB in 6 s, and
60 that read cut the connection rate from ~6,100/s to 200-300/s. This runs one real
sockd (threading mode, every connection logged as JSON at info to a file, as
``bench/echo_bench.py`` runs it) and measures, taking turns round by round:
- the connection rate (connect, one 64-byte echo, close; ``echo_bench``'s load) with no
  follower, then with 60 followers attached: 30 that read everything as fast as they
  can and 30 that never read past the response head (a small receive buffer, so
  their socket fills at once and the daemon's send to them blocks);
- the daemon's RSS: before the first round, and its peak while followers are attached
  (sampled every 100 ms).
Rates on a shared machine drift, so each round's "with" rate is divided by the "without"
rate measured just before it; the verdict uses the median of those ratios. Targets
(issue 9): followers cost <= 10% of the connection rate (ratio >= 0.90) and the
daemon stays <= 50 MB RSS. Exit status 1 if one is missed (``--no-fail`` to report).

    .venv/bin/python bench/followers.py [--seconds 3] [--rounds 3] [--clients 4]

The followers run in their own process, so reading 60 streams does not share the load
generator's interpreter. Only loopback and a Unix socket are used; every loop is bounded.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import signal
import socket
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from echo_bench import _connections, run_load
from procstat import rss_kb
from servers import start_sockd

FOLLOW = b"GET /v1/logs?n=0&follow=1 HTTP/1.1\r\nHost: bench\r\n\r\n"
RSS_TARGET_MB = 50.0
RATE_TARGET = 0.90


def _followers(
    path: str,
    reading: int,
    idle: int,
    ready: Any,
    stop: Any,
    out: Any,
) -> None:
    """Attach ``reading + idle`` followers; read the first ``reading`` until told to stop."""
    socks = []
    for i in range(reading + idle):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if i >= reading:  # a reader that never reads: its buffer fills at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(FOLLOW)
        socks.append(sock)
    for sock in socks:  # the head is sent once the follower is subscribed
        head = sock.recv(12)
        if head != b"HTTP/1.1 200":
            out.put(("error", f"a follower was refused: {head!r}"))
            return
    ready.set()
    readers = socks[:reading]
    for sock in readers:
        sock.setblocking(False)
    received = dropped = 0
    while not stop.is_set():
        ready_socks, _, _ = select.select(readers, [], [], 0.1)
        for sock in ready_socks:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                continue
            received += len(data)
            dropped += data.count(b'"logs.dropped"')
    out.put(("ok", (received, dropped)))
    for sock in socks:
        sock.close()


class PeakRss:
    """Samples a process's RSS every 100 ms in a thread; ``peak_mb`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
        return self.peak_kb / 1024


def measure_with_followers(
    path: str, port: int, pid: int, args: argparse.Namespace
) -> tuple[float, float, tuple[int, int]]:
    """The connection rate, the peak RSS (MB) and what the readers got, with followers."""
    ctx = mp.get_context("fork")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_followers, args=(path, args.reading, args.idle, ready, stop, out))
    proc.start()
    try:
        if not ready.wait(30):
            raise SystemExit(
                f"followers did not attach: {out.get(timeout=1) if not out.empty() else ''}"
            )
        rss = PeakRss(pid)
        rate, _cpu = run_load(_connections, port, args.clients, args.seconds, pid)
        peak = rss.stop()
        stop.set()
        status, detail = out.get(timeout=30)
        if status != "ok":
            raise SystemExit(detail)
        return rate, peak, detail
    finally:
        stop.set()
        proc.join(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reading", type=int, default=30, help="followers that read")
    parser.add_argument("--idle", type=int, default=30, help="followers that never read")
    parser.add_argument("--no-fail", action="store_true")
    args = parser.parse_args()
    without: list[float] = []
    with_: list[float] = []
    peaks: list[float] = []
    delivered: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="skf") as tmpdir:
        tmp = Path(tmpdir)
        proc, port = start_sockd(tmp)
        path = str(tmp / "sockd.sock")
        try:
            start_rss = rss_kb(proc.pid) / 1024
            for _ in range(args.rounds):
                rate, _cpu = run_load(_connections, port, args.clients, args.seconds, proc.pid)
                without.append(rate)
                rate, peak, got = measure_with_followers(path, port, proc.pid, args)
                with_.append(rate)
                peaks.append(peak)
                delivered.append(got)
            end_rss = rss_kb(proc.pid) / 1024
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    ratios = [w / wo for w, wo in zip(with_, without, strict=True)]
    ratio = statistics.median(ratios)
    peak = max(peaks)
    print(
        f"followers benchmark: {args.rounds} rounds x {args.seconds:g}s, {args.clients} client "
        f"processes, {args.reading} reading + {args.idle} never-reading followers, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    print(
        "  connection rate (conn/s), per round without/with followers: "
        + "  ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(without, with_, strict=True))
    )
    print(
        f"  median without {statistics.median(without):.0f}/s, "
        f"with {statistics.median(with_):.0f}/s;"
        f" ratio {ratio:.3f} (per round {' '.join(f'{r:.2f}' for r in ratios)})"
        f"   target >= {RATE_TARGET}: {'OK' if ratio >= RATE_TARGET else 'MISSED'}"
    )
    mb = [round(received / 2**20, 1) for received, _ in delivered]
    notices = [dropped for _, dropped in delivered]
    print(
        f"  the {args.reading} readers received {mb} MB in all per round, "
        f"logs.dropped notices among them {notices}"
    )
    print(
        f"  daemon RSS: {start_rss:.1f} MB at start, peak {peak:.1f} MB with followers, "
        f"{end_rss:.1f} MB at the end   target <= {RSS_TARGET_MB:g} MB: "
        f"{'OK' if peak <= RSS_TARGET_MB else 'MISSED'}"
    )
    ok = ratio >= RATE_TARGET and peak <= RSS_TARGET_MB
    return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
