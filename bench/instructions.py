"""CPU instructions per connection, sockd vs bare socketserver: a noise-free comparison.

Rates on a shared 2-core machine move by +-15% from run to run; instruction counts
under ``valgrind --tool=callgrind`` do not. Each server runs twice under callgrind,
serving 100 and then 600 short connections (connect, one 64-byte echo, close); the
difference divided by 500 is the cost of one connection, start-up excluded. sockd is
measured with its canonical ``conn.close`` line (info) and without (warning), and with
``max_spare_threads = 0`` (a new thread per connection, as ``ThreadingTCPServer`` does).

    .venv/bin/python bench/instructions.py          # needs valgrind (apt-get install valgrind)

Only loopback; bounded by the connection counts. Takes a few minutes (valgrind is slow).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import REPO, bare_command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def instructions(kind: str, connections: int, level: str, spare: int | None = None) -> int:
    """Total instructions of one server process that served ``connections``."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ski") as tmpdir:
        tmp = Path(tmpdir)
        port = 0  # the bare server picks its own and prints it
        if kind == "bare":
            cmd = bare_command()
        else:
            port = _free_port()
            config = tmp / "s.toml"
            config.write_text(
                f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
                + (f"max_spare_threads = {spare}\n" if spare is not None else "")
                + f'[logging]\nlevel = "{level}"\noutput = "{tmp}/log"\n'
                f'[control]\nsocket = "{tmp}/c.sock"\n'
            )
            cmd = [sys.executable, "-m", "sockd", "--config", str(config)]
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE if kind == "bare" else subprocess.DEVNULL,
            cwd=REPO,
        )
        if kind == "bare":
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"{kind} did not start under valgrind") from None
                time.sleep(0.2)  # start-up polling (valgrind starts slowly)
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(b"x" * 64)
                sock.recv(100)
        proc.send_signal(signal.SIGINT if kind == "bare" else signal.SIGTERM)
        _, err = proc.communicate(timeout=600)
    found = re.search(rb"Collected : (\d+)", err)
    if not found:
        raise SystemExit(f"no instruction count from valgrind for {kind}")
    return int(found.group(1))


def per_connection(kind: str, level: str = "info", spare: int | None = None) -> float:
    return (instructions(kind, 600, level, spare) - instructions(kind, 100, level, spare)) / 500


def main() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    bare = per_connection("bare")
    full = per_connection("sockd", "info")
    quiet = per_connection("sockd", "warning")
    fresh = per_connection("sockd", "info", spare=0)
    print("CPU instructions per connection (connect, one 64 B echo, close):")
    print(f"  bare socketserver                    {bare:9.0f}")
    print(f"  sockd, conn.close line (info)        {full:9.0f}   {full / bare:.2f}x")
    print(f"  sockd, no per-connection line (warn) {quiet:9.0f}   {quiet / bare:.2f}x")
    print(f"  sockd, conn.close, max_spare_threads=0 {fresh:7.0f}   {fresh / bare:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
