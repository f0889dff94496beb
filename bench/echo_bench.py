"""sockd vs the bare standard library server, side by side in one run.

Runs the same echo handler (``sockd.handlers.EchoHandler``) under
1. a bare ``socketserver.ThreadingTCPServer`` (daemon threads, the same backlog), and
2. sockd in threading mode, logging every connection (JSON, info level) to a file,
and measures, alternating the two servers round by round so machine noise hits both:
- request rate: persistent connections, 64-byte messages, one in flight per connection;
- connection rate: connect, one 64-byte exchange, close;
- stop latency: SIGTERM to process exit on an idle server (sockd only).
Prints each figure, the sockd/bare ratio, and the server CPU time per operation (less
sensitive than rates to what else the machine is doing). Targets: request rate >= 0.95, connection
rate >= 0.90, stop < 50 ms. Exit status 1 if a target is missed (``--no-fail`` to only report).

    .venv/bin/python bench/echo_bench.py [--seconds 3] [--rounds 3] [--clients 4]

Only loopback is used; every load loop is bounded in time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import statistics
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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {
        "bare": {"req": [], "conn": [], "req_cpu": [], "conn_cpu": []},
        "sockd": {"req": [], "conn": [], "req_cpu": [], "conn_cpu": []},
    }
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="skb") as tmpdir:
        tmp = Path(tmpdir)
        for rnd in range(args.rounds):
            order = ["bare", "sockd"] if rnd % 2 == 0 else ["sockd", "bare"]
            for name in order:
                proc, port = start_bare() if name == "bare" else start_sockd(tmp)
                try:
                    for metric, target in (("req", _requests), ("conn", _connections)):
                        rate, cpu_us = run_load(target, port, args.clients, args.seconds, proc.pid)
                        results[name][metric].append(rate)
                        results[name][metric + "_cpu"].append(cpu_us)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
        stops = [stop_latency_ms(tmp) for _ in range(5)]
    ok = True
    print(
        f"echo benchmark: {args.rounds} rounds x {args.seconds:g}s, "
        f"{args.clients} client processes, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}"
    )
    for metric, label, target in (
        ("req", "request rate (req/s)", 0.95),
        ("conn", "connection rate (conn/s)", 0.90),
    ):
        bare = statistics.median(results["bare"][metric])
        sockd = statistics.median(results["sockd"][metric])
        ratio = sockd / bare
        verdict = "OK" if ratio >= target else "MISSED"
        ok &= ratio >= target
        rounds = "  ".join(
            f"{b:.0f}/{s:.0f}"
            for b, s in zip(results["bare"][metric], results["sockd"][metric], strict=True)
        )
        print(f"  {'rounds (bare/sockd)':26} {rounds}")
        bare_cpu = statistics.median(results["bare"][metric + "_cpu"])
        sockd_cpu = statistics.median(results["sockd"][metric + "_cpu"])
        print(
            f"  {'server CPU per op (us)':26} bare {bare_cpu:10.1f}   sockd {sockd_cpu:10.1f}   "
            f"efficiency {bare_cpu / sockd_cpu:.3f} (bare CPU / sockd CPU)"
        )
        print(
            f"  {label:26} bare {bare:10.0f}   sockd {sockd:10.0f}   "
            f"ratio {ratio:.3f}  (target >= {target}) {verdict}"
        )
    stop = statistics.median(stops)
    ok &= stop < 50
    print(
        f"  {'stop latency, idle (ms)':26} sockd median {stop:.1f} of {len(stops)} "
        f"(target < 50) {'OK' if stop < 50 else 'MISSED'}"
    )
    return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
