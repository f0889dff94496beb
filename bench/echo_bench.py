"""sockd vs the bare standard library server, side by side in one run.

Runs the same echo handler (``sockd.handlers.EchoHandler``) under
1. a bare ``socketserver.ThreadingTCPServer`` (daemon threads, the same backlog), and
2. sockd in threading mode, logging every connection (JSON, info level) to a file,
3. the same sockd with ``max_spare_threads = 0`` (a new thread per connection, as
   ``ThreadingTCPServer`` does): shown for information, so the cost of sockd's
   accounting and logging is visible apart from the thread reuse that pays for it,
and measures, with all three running and taking turns measurement by measurement:
- request rate: persistent connections, 64-byte messages, one in flight per connection;
- connection rate: connect, one 64-byte exchange, close;
- stop latency: SIGTERM to process exit on an idle server (sockd only).
Rates on a shared machine drift by +-20% within a minute, so each round's sockd figure is
divided by the bare figure measured seconds before or after it, and the verdict uses the
median of those paired ratios (the ratio of the medians is printed too). Also printed:
server CPU time per operation. Targets: request rate >= 0.95, connection
rate >= 0.90 (for sockd as configured by default), stop < 50 ms. Exit status 1 if a target is
missed (``--no-fail`` to only report).

    .venv/bin/python bench/echo_bench.py [--seconds 3] [--rounds 3] [--clients 4]
    .venv/bin/python bench/echo_bench.py --mode forking   # sockd forking vs ForkingTCPServer

``--mode forking`` compares sockd's forking mode with a bare ``ForkingTCPServer``
(``block_on_close = False``, reaping in its loop as the standard library does): a
report, no targets (the issue sets them for threading mode).

Only loopback is used; every load loop is bounded in time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import start_bare, start_sockd

MESSAGE = b"x" * 64


def _requests(port: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    count = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(50):
                sock.sendall(MESSAGE)
                got = 0
                while got < len(MESSAGE):
                    got += len(sock.recv(4096))
            count += 50
    out.put(count)


def _connections(port: int, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                got += len(sock.recv(4096))
        count += 1
    out.put(count)


def cpu_seconds(pid: int) -> float:
    """CPU time of the server and of its reaped children (forking mode's connections)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_load(
    target: object, port: int, clients: int, seconds: float, server_pid: int
) -> tuple[float, float]:
    """Operations per second, and the server's CPU microseconds per operation."""
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=target, args=(port, seconds, out)) for _ in range(clients)]
    cpu_before = cpu_seconds(server_pid)
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 30) for _ in procs)
    cpu_used = cpu_seconds(server_pid) - cpu_before
    for p in procs:
        p.join(30)
    return total / seconds, cpu_used * 1e6 / max(total, 1)


def stop_latency_ms(tmp: Path) -> float:
    proc, _ = start_sockd(tmp, name="stop")
    began = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return (time.perf_counter() - began) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-fail", action="store_true")
    parser.add_argument("--mode", choices=["threading", "forking"], default="threading")
    args = parser.parse_args()
    forking = args.mode == "forking"
    servers: tuple[str, ...] = ("bare", "sockd") if forking else ("bare", "sockd", "sockd-no-spare")
    results: dict[str, dict[str, list[float]]] = {
        name: {"req": [], "conn": [], "req_cpu": [], "conn_cpu": []} for name in servers
    }
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="skb") as tmpdir:
        tmp = Path(tmpdir)
        for rnd in range(args.rounds):
            procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {
                "bare": start_bare(mode=args.mode),
                "sockd": start_sockd(tmp, mode=args.mode),
            }
            if not forking:
                procs["sockd-no-spare"] = start_sockd(tmp, name="nospare", max_spare_threads=0)
            # Rotate the order so that no server always runs first after a pause.
            turn = rnd % len(servers)
            order = servers[turn:] + servers[:turn]
            try:
                for metric, target in (("req", _requests), ("conn", _connections)):
                    for name in order:
                        proc, port = procs[name]
                        rate, cpu_us = run_load(target, port, args.clients, args.seconds, proc.pid)
                        results[name][metric].append(rate)
                        results[name][metric + "_cpu"].append(cpu_us)
            finally:
                for proc, _ in procs.values():
                    proc.send_signal(signal.SIGTERM)
                for proc, _ in procs.values():
                    proc.wait(60)
        stops = [stop_latency_ms(tmp) for _ in range(5)]
    ok = True
    print(
        f"echo benchmark: {args.rounds} rounds x {args.seconds:g}s, "
        f"{args.clients} client processes, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}"
    )
    if forking:
        print("  forking mode: sockd vs bare ForkingTCPServer; no targets, a report")
    else:
        print("  (sockd-no-spare: max_spare_threads = 0, a thread per connection; no target)")
    for metric, label, goal in (
        ("req", "request rate (req/s)", 0.95),
        ("conn", "connection rate (conn/s)", 0.90),
    ):
        print(f"  {label}")
        rounds = "  ".join(
            "/".join(f"{results[name][metric][rnd]:.0f}" for name in servers)
            for rnd in range(args.rounds)
        )
        print(f"    {'rounds (' + '/'.join(servers) + ')':40} {rounds}")
        bare = statistics.median(results["bare"][metric])
        bare_cpu = statistics.median(results["bare"][metric + "_cpu"])
        print(f"    {'bare':16} {bare:10.0f}/s   server CPU {bare_cpu:7.1f} us/op")
        for name in servers[1:]:
            rate = statistics.median(results[name][metric])
            cpu = statistics.median(results[name][metric + "_cpu"])
            paired = [
                mine / theirs
                for mine, theirs in zip(results[name][metric], results["bare"][metric], strict=True)
            ]
            ratio = statistics.median(paired)
            line = (
                f"    {name:16} {rate:10.0f}/s   server CPU {cpu:7.1f} us/op   "
                f"ratio {ratio:.3f} (per round {' '.join(f'{p:.2f}' for p in paired)}; "
                f"of medians {rate / bare:.3f})   CPU efficiency "
                + (
                    "n/a (the servers reap long-lived children at different times)"
                    if forking and metric == "req"
                    else f"{bare_cpu / cpu:.3f}"
                )
            )
            if name == "sockd" and not forking:
                ok &= ratio >= goal
                line += f"   target >= {goal}: {'OK' if ratio >= goal else 'MISSED'}"
            print(line)
    stop = statistics.median(stops)
    ok &= stop < 50
    print(
        f"  {'stop latency, idle (ms)':26} sockd median {stop:.1f} of {len(stops)} "
        f"(target < 50) {'OK' if stop < 50 else 'MISSED'}"
    )
    return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
