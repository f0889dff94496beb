"""Concurrency capacity: many idle connections held at once, each still answering.

Threading mode: sockd and a bare ``socketserver.ThreadingTCPServer`` (same echo
handler) each hold ``--connections`` concurrent idle connections in the same run; every
connection must still echo afterwards. Memory per idle connection is the growth of the
server's PSS divided by the connection count. Target: sockd within 1.25x of bare.
Forking mode: sockd holds ``--children`` connections (its max_children); each child's
PSS is reported. Exit 1 if a target is missed.

    .venv/bin/python bench/capacity.py [--connections 5000] [--children 64]

Only loopback; the connection counts bound everything.
"""

from __future__ import annotations

import argparse
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import children, pss_kb, threads
from servers import start_bare, start_sockd


def echo(sock: socket.socket) -> bool:
    sock.sendall(b"!")
    return sock.recv(1) == b"!"


def hold(port: int, count: int, pid: int, forking: bool) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections, each proven served; return them and the server's threads."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        socks.append(sock)
    answered = sum(echo(s) for s in socks)  # every connection is really being served
    if answered != count:
        raise SystemExit(f"only {answered} of {count} connections answered")
    deadline = time.monotonic() + 30
    expected = count if forking else count + 1
    while time.monotonic() < deadline:
        held = len(children(pid)) if forking else threads(pid)
        if held >= expected:
            return socks, held
        time.sleep(0.1)  # polling /proc until every handler is up
    return socks, len(children(pid)) if forking else threads(pid)


def measure_threading(name: str, proc: subprocess.Popen[bytes], port: int, n: int) -> float:
    idle = pss_kb(proc.pid)
    socks, held = hold(port, n, proc.pid, forking=False)
    loaded = pss_kb(proc.pid)
    still = sum(echo(s) for s in socks)
    for s in socks:
        s.close()
    per = (loaded - idle) * 1024 / n
    print(
        f"  {name:6} PSS idle {idle:7d} KiB, with {n} connections {loaded:8d} KiB "
        f"-> {per / 1024:6.1f} KiB per connection; {held} threads; {still}/{n} still answer"
    )
    if still != n:
        raise SystemExit(f"{name}: {n - still} connections stopped answering")
    return per


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--children", type=int, default=64)
    parser.add_argument("--no-fail", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections * 2 + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    print(
        f"capacity: {args.connections} idle connections (threading), "
        f"{args.children} children (forking)"
    )
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="skc") as tmpdir:
        tmp = Path(tmpdir)
        results = {}
        for name in ("bare", "sockd"):
            proc, port = (
                start_bare(4096)
                if name == "bare"
                else start_sockd(tmp, "t", request_queue_size=4096)
            )
            try:
                results[name] = measure_threading(name, proc, port, args.connections)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(120)
        ratio = results["sockd"] / results["bare"]
        ok = ratio <= 1.25
        print(
            f"  sockd/bare memory per idle connection: {ratio:.2f} (target <= 1.25) "
            f"{'OK' if ok else 'MISSED'}"
        )
        proc, port = start_sockd(
            tmp, "f", mode="forking", max_children=args.children, request_queue_size=4096
        )
        try:
            socks, held = hold(port, args.children, proc.pid, forking=True)
            kids = children(proc.pid)
            sizes = sorted(pss_kb(k) for k in kids)
            parent = pss_kb(proc.pid)
            print(
                f"  forking: {held} children for {len(socks)} connections; child PSS KiB "
                f"min {sizes[0]} median {sizes[len(sizes) // 2]} max {sizes[-1]}; parent {parent}"
            )
            ok &= held == args.children
            for s in socks:
                s.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return 0 if ok or args.no_fail else 1


if __name__ == "__main__":
    sys.exit(main())
